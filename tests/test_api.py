"""The public surface: the facade lists every public module's ``__all__`` and nothing else."""

from __future__ import annotations

import importlib
import pkgutil

import lmcheck

# modules users import directly: each __all__ lists what users call; plumbing lives in _modules
PUBLIC_MODULES = sorted(
    info.name.removeprefix("lmcheck.") for info in pkgutil.walk_packages(lmcheck.__path__, "lmcheck.")
    if not info.name.split(".")[-1].startswith("_") and not info.ispkg
    and info.name.split(".")[1] not in {"assets", "cli", "pytest_plugin", "suite", "tutorial"}
    # the assets command's, pytest's, the ready suite's and the tutorial's own surfaces
)


def test_the_facade_is_exactly_the_public_modules_all():
    exported = {}
    for name in PUBLIC_MODULES:
        module = importlib.import_module(f"lmcheck.{name}")
        for public in getattr(module, "__all__", []):
            exported[public] = f"lmcheck.{name}"
    assert exported == lmcheck._EXPORTS
    assert lmcheck.__all__ == sorted(exported)


def test_every_public_name_resolves_to_a_public_module():
    for name in lmcheck.__all__:
        value = getattr(lmcheck, name)
        home = getattr(value, "__module__", None)
        if isinstance(home, str) and home.startswith("lmcheck."):
            assert not home.split(".")[1].startswith("_"), f"{name} comes from the private {home}"


ABOVE_THE_PROBES = ("lmcheck.loops", "lmcheck.cli", "lmcheck.pytest_plugin", "lmcheck.suite", "lmcheck.tutorial")


def test_no_probe_imports_a_loop_or_a_front_end():
    """The layering: probes and plumbing never import the loops, the CLI, the plugin, the ready
    suite or the tutorial (the loops may import probes, never the reverse)."""
    import ast
    from pathlib import Path

    root = Path(lmcheck.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        module = "lmcheck." + ".".join(path.relative_to(root).with_suffix("").parts)
        if module.startswith(ABOVE_THE_PROBES) or module == "lmcheck.__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{module} imports {name}" for name in names if name.startswith(ABOVE_THE_PROBES)]
    assert offenders == []


def test_the_heap_is_frozen_only_within_the_block_and_only_where_nothing_was():
    """``heap_frozen`` (around each ``Trainer.train()`` that check_trainer runs, whose full
    ``gc.collect()`` it spares the objects that already exist) restores the collector as it was,
    and leaves a process that froze objects itself alone. In a fresh interpreter: this one's
    conftest has frozen the collected tests."""
    import subprocess
    import sys

    code = (
        "import gc\n"
        "from lmcheck._allocator import heap_frozen\n"
        "before = gc.get_freeze_count()\n"
        "with heap_frozen():\n"
        "    inside = gc.get_freeze_count()\n"
        "after = gc.get_freeze_count()\n"
        "gc.freeze()\n"
        "theirs = gc.get_freeze_count()\n"
        "with heap_frozen():\n"
        "    pass\n"
        "print(before, inside > 0, after, gc.get_freeze_count() == theirs > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "True", "0", "True"]


def test_only_the_command_and_the_tests_change_the_allocator(monkeypatch):
    """``keep_freed_blocks`` sets glibc's thresholds where there is a glibc and elsewhere does
    nothing; in lmcheck only the ``lmcheck`` command's ``main()`` calls it, never an import."""
    import ast
    import sys
    from pathlib import Path

    from lmcheck import _allocator

    assert _allocator.keep_freed_blocks() is sys.platform.startswith("linux")
    assert _allocator.release_freed_blocks() is sys.platform.startswith("linux")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _allocator.keep_freed_blocks() is False
    assert _allocator.release_freed_blocks() is False
    callers = []
    for path in Path(lmcheck.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for function in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))]:
            body = function.body if function is not tree else [
                n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
            for node in (n for statement in body for n in ast.walk(statement)):
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "keep_freed_blocks":
                    callers.append((path.name, getattr(function, "name", "<module>")))
    assert sorted(set(callers)) == [("cli.py", "main")]
