"""The setup checks' memory against the user's own training, at a small size and at GPT-2 124M's
configuration, each run in a fresh process (``benchmarks/setup_memory.py``): the peak resident
set size on the CPU, and under ``-m gpu`` the CUDA peak.

The goal at 124M (and, on a GPU, at about 1B): the checks' peak at most 1.25x the user's own
training peak. The ratios and
the excess in model-sized fp32 units (4 bytes a parameter) go into ``extra_info``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("setup_memory.py")
GOAL = 1.25


def _measure(size: str, run: str) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), "--size", size, "--run", run], capture_output=True,
                          text=True, check=True, timeout=1800)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("size", ["small", "124m", pytest.param("1b", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("entry", ["loop", "trainer"])
def test_setup_checks_memory_against_the_users_training(benchmark, size, entry):
    runs: dict[str, dict] = {}

    def both() -> None:
        runs["user"] = _measure(size, f"user-{entry}")
        runs["check"] = _measure(size, f"check_{entry}")

    benchmark.pedantic(both, rounds=1, iterations=1)
    user, check = runs["user"], runs["check"]
    key = "cuda_peak_bytes" if "cuda_peak_bytes" in user else "peak_rss_bytes"
    unit = 4 * user["parameters"]
    ratio = check[key] / user[key]
    benchmark.extra_info.update(
        size=size, entry=entry, memory=key, user_peak_gib=round(user[key] / 2**30, 3),
        check_peak_gib=round(check[key] / 2**30, 3), ratio=round(ratio, 3),
        excess_units=round((check[key] - user[key]) / unit, 2), optimizer_steps=check["optimizer_steps"],
        user_seconds=user["seconds"], check_seconds=check["seconds"])
    if size in ("124m", "1b"):
        assert ratio <= GOAL, f"the checks' peak is {ratio:.2f}x the user's training, above {GOAL}x"
