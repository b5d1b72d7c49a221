"""The exceptions lmcheck raises on misuse.

A failed check is never an exception: it is a :class:`~lmcheck.results.Result` with
``passed=False``. These exceptions mean the caller asked for something that cannot be done,
and each also subclasses the builtin a Python user would expect to catch.
"""

from __future__ import annotations

import math

__all__ = [
    "AssetError",
    "InputError",
    "LmcheckError",
    "ModelError",
    "NonFiniteError",
    "check_fraction",
    "check_int",
    "check_number",
    "describe",
]


class LmcheckError(Exception):
    """Base class of every exception lmcheck raises on purpose."""


class InputError(LmcheckError, ValueError):
    """An argument has the wrong type or value; the message names it and what was expected."""


class ModelError(LmcheckError, TypeError):
    """A model or tokenizer does not fit the probe (a causal LM given to a masked-LM probe, ...)."""


class NonFiniteError(ModelError):
    """A model computed NaN or Inf (logits, a loss, a gradient) where a number was needed.

    The message says what was not finite and where (row, step, position, token id, parameter).
    A probe never lets it escape: it returns a failed :class:`~lmcheck.results.Result` with that
    message. Functions that return data rather than a verdict (``greedy_decode``, ``fill_mask``)
    raise it, since tokens or probabilities read from NaN logits mean nothing.
    """


class AssetError(LmcheckError, RuntimeError):
    """An offline asset cannot be fetched or fails its checksum; the message says what to do."""


class GoldenMissingError(LmcheckError, LookupError):
    """No golden values are recorded for this device; the message says how to record them."""


def describe(value: object) -> str:
    """A short description of ``value`` for error messages: ``'a' that is a str``."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} that is a {type(value).__name__}"


def check_int(value: object, argument: str, low: int, high: int | None = None, high_name: str = "") -> None:
    """Raise InputError unless ``value`` is an int in [low, high] (``high_name`` names the bound).

    The one integer validator of the probes and loops: ``check_int(steps, "steps", 1)``.
    """
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high  # type: ignore[operator]
    if not ok:
        bound = f"from {low} to {high_name}, {high}" if high is not None else f">= {low}"
        raise InputError(f"'{argument}' must be an int {bound} (got {describe(value)})")


def check_fraction(value: object, argument: str) -> None:
    """Raise InputError unless ``value`` is a real number from 0 to 1 (a rate or share)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise InputError(f"'{argument}' must be a number from 0 to 1 (got {describe(value)})")


def check_number(value: object, argument: str, *, low: float | None = None) -> None:
    """Raise InputError unless ``value`` is a finite real number, at least ``low`` if given.

    Tolerances and bounds go through here: a NaN tolerance would make ``diff > tol`` False for
    every difference, so that a check could never fail.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low  # type: ignore[operator]
    if not ok:
        bound = f" >= {low:g}" if low is not None else ""
        raise InputError(f"'{argument}' must be a finite number{bound} (got {describe(value)})")
