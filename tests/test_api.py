"""The public surface: a curated top level, namespaces for the rest, and the layering."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from public import NAMESPACES, public_names

import lmcheck

# what `import lmcheck` gives, pinned: a name joins or leaves it only here
TOP_LEVEL = sorted("""
    round_trip inspect_tokens
    fill_mask mask_fill_accuracy masked_loss_at_init bidirectionality encoder_padding_invariance
    greedy_matches_generate kv_cache_matches_full causality padding_invariance batch_invariance
    loss_at_init gradient_flow params_update loss_matches_reference causal_batch memorizes batch_supervision packing_equivalence
    loss_decreases overfits generalization_gap reproducible finite_loss LossCurve
    check_loop check_trainer check_lightning SetupReport
    Result LmcheckError InputError ModelError NonFiniteError NotApplicableError AssetError GoldenMissingError
    adapt load_tokenizer load_language_model load_causal_lm load_documents chunk_documents Report
""".split())


def test_the_top_level_is_the_curated_list():
    assert lmcheck.__all__ == TOP_LEVEL
    assert len(TOP_LEVEL) <= 45


def test_every_top_level_name_is_its_namespaces_own():
    """Each top-level name is the object its home namespace exports, and that home is public."""
    for name in lmcheck.__all__:
        home = lmcheck._EXPORTS[name]
        assert home in NAMESPACES, f"{name} comes from {home}, which is not a public namespace"
        module = importlib.import_module(home)
        assert name in module.__all__, f"{home}.__all__ does not list {name}"
        assert getattr(lmcheck, name) is getattr(module, name)


def test_every_namespace_name_resolves_and_none_is_private():
    for name, value in public_names().items():
        assert not name.startswith("_"), name
        home = getattr(value, "__module__", None)
        if isinstance(home, str) and home.startswith("lmcheck."):
            assert not any(part.startswith("_") for part in home.split(".")[1:]), f"{name} comes from {home}"


ROOT = Path(lmcheck.__file__).parent
ABOVE_THE_PROBES = ("lmcheck.loops", "lmcheck.cli", "lmcheck.pytest_plugin", "lmcheck.suite", "lmcheck.tutorial",
                    "lmcheck.batteries", "lmcheck.setup")


def _imports() -> list[tuple[str, str, list[str]]]:
    """(importing module, imported module, names) for every import in lmcheck."""
    found = []
    for path in ROOT.rglob("*.py"):
        module = "lmcheck." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.append((module, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                found += [(module, alias.name, []) for alias in node.names]
    return found


def test_no_probe_imports_a_loop_a_front_end_or_the_setup_wing():
    """The layering: probes and plumbing never import the loops, the setup wing, the batteries,
    the CLI, the plugin, the ready suite or the tutorial (those may import probes, never the reverse)."""
    offenders = [f"{module} imports {imported}" for module, imported, _ in _imports()
                 if not module.startswith(ABOVE_THE_PROBES) and module != "lmcheck"
                 and imported.startswith(ABOVE_THE_PROBES)]
    assert offenders == []


def test_no_private_name_crosses_a_package_boundary():
    """An underscore name is imported only within its own package (``lmcheck.setup.*`` among
    themselves): everything else reaches a module through its public names."""
    def package(module: str) -> str:
        is_package = (ROOT / Path(*module.split(".")[1:]) / "__init__.py").is_file()
        return module if is_package else module.rpartition(".")[0]

    offenders = [f"{module} imports {name} from {imported}" for module, imported, names in _imports()
                 if imported.startswith("lmcheck") for name in names
                 if name.startswith("_") and package(imported) != package(module)]
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
