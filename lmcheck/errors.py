"""The exceptions lmcheck raises on misuse.

A failed check is never an exception: it is a :class:`~lmcheck.results.Result` with
``passed=False``. These exceptions mean the caller asked for something that cannot be done,
and each also subclasses the builtin a Python user would expect to catch.
"""

from __future__ import annotations

__all__ = [
    "AssetError",
    "GoldenMissingError",
    "InputError",
    "LmcheckError",
    "ModelError",
    "NonFiniteError",
    "NotApplicableError",
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


class NotApplicableError(ModelError):
    """The model lacks what a check needs (an attention-mask argument, a KV cache, ``generate``).

    A probe never lets it escape: it returns a not-applicable :class:`~lmcheck.results.Result`
    (neither a pass nor a failure) that keeps the reason. Functions that return data
    (``greedy_decode`` on a left-padded batch for a model that takes no mask) raise it.
    """


class AssetError(LmcheckError, RuntimeError):
    """An offline asset cannot be fetched or fails its checksum; the message says what to do."""


class GoldenMissingError(LmcheckError, LookupError):
    """No golden values are recorded for this device; the message says how to record them."""
