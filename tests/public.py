"""lmcheck's public surface, for the tests that walk it: the top-level names and each namespace
a user imports (its ``__all__``). The setup wing's inner modules are reached through
``lmcheck.setup``; the CLI, the plugin, the ready pytest modules, the tutorial and the assets
command have their own surfaces."""

from __future__ import annotations

import importlib
from typing import Any

import lmcheck

NAMESPACES = (
    "lmcheck.adapters", "lmcheck.batteries", "lmcheck.causal", "lmcheck.cloze", "lmcheck.comparison",
    "lmcheck.corpus", "lmcheck.curves", "lmcheck.decoding", "lmcheck.errors", "lmcheck.golden",
    "lmcheck.invariance", "lmcheck.loops", "lmcheck.lora", "lmcheck.masked", "lmcheck.models", "lmcheck.packing", "lmcheck.precision", "lmcheck.recipes",
    "lmcheck.report", "lmcheck.results", "lmcheck.rl", "lmcheck.setup", "lmcheck.setup.distributed", "lmcheck.supervision",
    "lmcheck.tokens", "lmcheck.training", "lmcheck.watch",
)


def public_names() -> dict[str, Any]:
    """Every public name, top level and namespaces, with the object it names."""
    names = {name: getattr(lmcheck, name) for name in lmcheck.__all__}
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        names.update({name: getattr(module, name) for name in module.__all__})
    return names
