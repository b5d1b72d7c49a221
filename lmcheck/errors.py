"""The exceptions lmcheck raises on misuse.

A failed check is never an exception: it is a :class:`~lmcheck.results.Result` with
``passed=False``. These exceptions mean the caller asked for something that cannot be done,
and each also subclasses the builtin a Python user would expect to catch.
"""

from __future__ import annotations

__all__ = ["AssetError", "InputError", "LmcheckError", "ModelError"]


class LmcheckError(Exception):
    """Base class of every exception lmcheck raises on purpose."""


class InputError(LmcheckError, ValueError):
    """An argument has the wrong type or value; the message names it and what was expected."""


class ModelError(LmcheckError, TypeError):
    """A model or tokenizer does not fit the probe (a causal LM given to a masked-LM probe, ...)."""


class AssetError(LmcheckError, RuntimeError):
    """An offline asset cannot be fetched or fails its checksum; the message says what to do."""


def describe(value: object) -> str:
    """A short description of ``value`` for error messages: ``'a' that is a str``."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} that is a {type(value).__name__}"
