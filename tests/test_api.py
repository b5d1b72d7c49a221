"""The public surface: the facade lists every public module's ``__all__`` and nothing else."""

from __future__ import annotations

import importlib
import pkgutil

import lmcheck

# modules users import directly: each __all__ lists what users call; plumbing lives in _modules
PUBLIC_MODULES = sorted(
    info.name for info in pkgutil.iter_modules(lmcheck.__path__)
    if not info.name.startswith("_") and not info.ispkg
    and info.name not in {"assets", "cli", "pytest_plugin"}  # a command's and pytest's own surfaces
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
