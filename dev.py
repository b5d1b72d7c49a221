#!/usr/bin/env python3
"""Set-up and entry point for a fresh machine that has only python3 and pip.

    python3 dev.py tutorial   # make .venv if needed, install lmcheck, run `lmcheck tutorial`
    python3 dev.py test       # same environment, then run the test suite
    python3 dev.py slow       # same environment, then the slow tests (chapter 4's 49-chunk run)
    python3 dev.py matrix     # same environment, then the architecture matrix (every LM class)
    python3 dev.py bench      # same environment, then run the benchmarks
    python3 dev.py gpu        # on a CUDA machine: the gpu-marked tests, then the benchmarks,
                              # numbers and plots kept in benchmarks/results/gpu/ (commit them)
    python3 dev.py docs       # same environment, then build the docs site strictly into site/

Extra arguments go to the command (``python3 dev.py test -k chunk``). The environment is made
once and reused; it is refreshed when pyproject.toml changes. ``LMCHECK_TORCH`` picks the torch
to install first (default ``torch==2.13.0``, a CPU build where one is on disk; set it to
``torch`` for your platform's default build, e.g. with CUDA).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("LMCHECK_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
TORCH = os.environ.get("LMCHECK_TORCH", "torch==2.13.0")


def ensure_environment() -> None:
    stamp = VENV / ".lmcheck-installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if stamp.is_file() and stamp.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print(f"dev.py: creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print(f"dev.py: installing {TORCH}, then lmcheck with its test extra", flush=True)
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    # the offline assets, sha256-checked, and SmolLM2's safetensors conversion: set-up, done once
    # here rather than inside whichever test or chapter first needs them
    print("dev.py: fetching the offline assets (lmcheck assets fetch)", flush=True)
    subprocess.run([str(BIN / "lmcheck"), "assets", "fetch"], check=True)
    stamp.write_text(wanted)


def main(argv: list[str]) -> int:
    commands = {
        "tutorial": [str(BIN / "lmcheck"), "tutorial"],
        # pytest-xdist: one worker per core (at most 8), each test file whole on one worker
        # (conftest.py): faster than one process (docs/performance.md)
        "test": [str(BIN / "python"), "-m", "pytest", "-n", "auto", "--maxprocesses", "8",
                 "--dist", "loadfile", "--durations=15"],
        # one process with every core: the slow tier is one long training run and its checks
        "slow": [str(BIN / "python"), "-m", "pytest", "-m", "slow and not architectures", "--durations=15"],
        # the architecture matrix: many small models, one worker per core, tests spread one by one
        "matrix": [str(BIN / "python"), "-m", "pytest", "tests/test_architectures.py", "-m",
                   "slow and architectures", "-n", "auto", "--maxprocesses", "8", "--dist", "load",
                   "--durations=10"],
        "bench": [str(BIN / "python"), "-m", "pytest", "benchmarks", "--benchmark-only"],
        "gpu": [str(BIN / "python"), "-m", "pytest", "-m", "gpu", "-v", "-rs"],
        # the docs site (mkdocs.yml): every warning fails, the site goes to site/ (git-ignored)
        "docs": [str(BIN / "python"), "-m", "mkdocs", "build", "--strict", "--site-dir",
                 str(ROOT / "site")],
    }
    if not argv or argv[0] not in commands:
        print(f"usage: python3 dev.py {{{'|'.join(commands)}}} [args...]", file=sys.stderr)
        return 2
    ensure_environment()
    if argv[0] == "gpu":
        return gpu(commands, argv[1:])
    # mkdocs-material's banner about its successor is not a warning of this site's
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"} if argv[0] == "docs" else None
    return subprocess.run([*commands[argv[0]], *argv[1:]], cwd=ROOT, env=env).returncode


def gpu(commands: dict[str, list[str]], extra: list[str]) -> int:
    """The GPU checks and the benchmarks; numbers and plots go to benchmarks/results/gpu/."""
    out = ROOT / "benchmarks" / "results" / "gpu"  # tracked: commit what a GPU run measured
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LMCHECK_GPU_OUT": str(out)}
    tests = subprocess.run([*commands["gpu"], f"--junitxml={out / 'gpu-tests.xml'}", *extra],
                           cwd=ROOT, env=env).returncode
    bench = subprocess.run([*commands["bench"], f"--benchmark-json={out / 'benchmarks.json'}"],
                           cwd=ROOT, env=env).returncode
    return tests or bench


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
