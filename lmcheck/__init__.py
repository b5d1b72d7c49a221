"""lmcheck: probes that check a language model and its training setup.

Every probe takes a model, a tokenizer and data, and returns a :class:`Result`::

    import lmcheck
    result = lmcheck.round_trip(lmcheck.load_tokenizer("gpt2"), ["Hello, world"])
    assert result, result.explanation

Names are imported lazily, so ``import lmcheck`` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it; modules add their names here
_EXPORTS: dict[str, str] = {
    "AssetError": "lmcheck.errors",
    "ChunkStats": "lmcheck.corpus",
    "DEFAULTS": "lmcheck.defaults",
    "InputError": "lmcheck.errors",
    "LmcheckError": "lmcheck.errors",
    "ModelError": "lmcheck.errors",
    "Result": "lmcheck.results",
    "TokenTable": "lmcheck.tokens",
    "bert_from_scratch": "lmcheck.models",
    "chunk_documents": "lmcheck.corpus",
    "gpt2_from_scratch": "lmcheck.models",
    "inspect_tokens": "lmcheck.tokens",
    "load_documents": "lmcheck.corpus",
    "load_tokenizer": "lmcheck.tokens",
    "round_trip": "lmcheck.tokens",
    "split_documents": "lmcheck.corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmcheck' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
