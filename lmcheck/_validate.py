"""The validators every public function uses on its arguments: one message format.

Also the small helpers that turn validated prompts into a left-padded batch (:func:`encode_batch`)
and count things in messages (:func:`count_phrase`).

Each raises :class:`~lmcheck.errors.InputError` (a wrong value) or
:class:`~lmcheck.errors.ModelError` (a model or tokenizer that does not fit) with the message
``'<argument>' must be <what was expected> (got <what came>)``, and returns the value in the form
the caller works with. No check here is an ``assert``: they run under ``python -O`` too.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmcheck.errors import InputError, ModelError

# a function named for import: package.module:function
FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

if TYPE_CHECKING:  # only for annotations: transformers is imported where first needed
    from transformers import PreTrainedTokenizerBase

SEED_MAX = 2**32 - 1  # numpy's and transformers.set_seed's bound


def describe(value: object) -> str:
    """A short description of ``value`` for error messages: ``'a' that is a str``."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = type(value).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    return f"{text} that is {article} {kind}"


def check_int(value: object, argument: str, low: int, high: int | None = None, high_name: str = "") -> int:
    """``value`` if it is an int in [low, high] (``high_name`` names the bound); else InputError."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high  # type: ignore[operator]
    if not ok:
        bound = f"from {low} to {high_name + ', ' if high_name else ''}{high}" if high is not None else f">= {low}"
        raise InputError(f"'{argument}' must be an int {bound} (got {describe(value)})")
    return value  # type: ignore[return-value]


def check_fraction(value: object, argument: str) -> float:
    """``value`` if it is a real number from 0 to 1 (a rate or share); else InputError."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise InputError(f"'{argument}' must be a number from 0 to 1 (got {describe(value)})")
    return float(value)


def check_number(value: object, argument: str, *, low: float | None = None,
                 high: float | None = None) -> float:
    """``value`` if it is a finite real number in [low, high] (each if given); else InputError.

    Tolerances and bounds go through here: a NaN tolerance would make ``diff > tol`` False for
    every difference, so that a check could never fail.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low  # type: ignore[operator]
    if ok and high is not None:
        ok = value <= high  # type: ignore[operator]
    if not ok:
        bound = (f" from {low:g} to {high:g}" if low is not None and high is not None else
                 f" >= {low:g}" if low is not None else f" <= {high:g}" if high is not None else "")
        raise InputError(f"'{argument}' must be a finite number{bound} (got {describe(value)})")
    return float(value)  # type: ignore[arg-type]


def check_seed(value: object, argument: str = "seed") -> int:
    """``value`` if it is an int seed from 0 to 2**32 - 1; else InputError."""
    return check_int(value, argument, 0, SEED_MAX, "2**32 - 1")


def check_bool(value: object, argument: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"'{argument}' must be True or False (got {describe(value)})")
    return value


def check_str(value: object, argument: str, *, choices: Collection[str] = ()) -> str:
    """``value`` if it is a non-empty str (one of ``choices`` where given); else InputError."""
    if not isinstance(value, str) or not value or (choices and value not in choices):
        expected = f"one of {', '.join(map(repr, choices))}" if choices else "a non-empty str"
        raise InputError(f"'{argument}' must be {expected} (got {describe(value)})")
    return value


def check_path(value: object, argument: str) -> Path:
    """``value`` as a Path if it is a str or os.PathLike; else InputError."""
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value):
        raise InputError(f"'{argument}' must be a path, a str or os.PathLike (got {describe(value)})")
    return Path(value)


def check_callable(value: object, argument: str, expected: str) -> Callable[..., Any]:
    if not callable(value) or isinstance(value, torch.Tensor):
        raise InputError(f"'{argument}' must be {expected} (got {describe(value)})")
    return value


def check_checkpoint(value: object, argument: str) -> tuple[Callable[[str], Any], Callable[[str], Any]]:
    """A ``(save, load)`` pair of functions of a folder; else InputError."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2 \
            or not all(callable(f) for f in value):
        raise InputError(f"'{argument}' must be (save, load): two functions of a folder, save(folder) writing the "
                         f"setup's state into it and load(folder) reading it back (got {describe(value)})")
    return value[0], value[1]


def check_factory(value: object, argument: str = "factory") -> str:
    """An importable ``package.module:function`` name; else InputError."""
    if not isinstance(value, str) or FACTORY.match(value) is None:
        raise InputError(f"'{argument}' must name the function that builds the setup as package.module:function "
                         f"(got {describe(value)})")
    return value


def check_names(value: object, argument: str) -> list[str]:
    """A collection of str (parameter names and the like) as a list; else InputError."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Collection) \
            or isinstance(value, torch.Tensor) or not all(isinstance(v, str) for v in value):
        raise InputError(f"'{argument}' must be a collection of names (str), e.g. a list or set "
                         f"(got {describe(value)})")
    return list(value)


def check_model(value: object, argument: str = "model") -> torch.nn.Module:
    """``value`` if it is a torch module with parameters that hold values; else ModelError."""
    if not isinstance(value, torch.nn.Module):
        raise ModelError(f"'{argument}' must be a torch.nn.Module (got {describe(value)})")
    first = next(value.parameters(), None)
    if first is None:
        raise ModelError(f"'{argument}' must have parameters (got a {type(value).__name__} with none)")
    if first.is_meta:
        raise ModelError(f"'{argument}' has its parameters on the meta device, which holds no values: "
                         f"load or materialise the weights first (e.g. model.to_empty(device='cpu') "
                         f"and load a state dict)")
    return value


def check_tokenizer(value: object, argument: str = "tokenizer") -> Any:
    """``value`` if it is a Hugging Face tokenizer; else InputError."""
    from transformers import PreTrainedTokenizerBase  # heavy: imported where first needed

    if not isinstance(value, PreTrainedTokenizerBase):
        raise InputError(f"'{argument}' must be a Hugging Face tokenizer, e.g. "
                         f"lmcheck.load_tokenizer('gpt2') (got {describe(value)})")
    return value


def check_tensor_data(value: torch.Tensor, argument: str) -> torch.Tensor:
    """InputError for a tensor on the meta device: it has a shape but no values to read."""
    if value.is_meta:
        raise InputError(f"'{argument}' must hold values, but it is on the meta device "
                         f"(shape {tuple(value.shape)}); create it on the CPU or the model's device")
    return value


def as_ids(value: object, argument: str, *, vocab: int | None = None, min_length: int = 1) -> torch.Tensor:
    """``value`` as a (B, T) long tensor of token ids on its own device (a 1-D one gains B = 1).

    Accepts a tensor or a (rectangular) nested list of ints. With ``vocab``, every id must lie
    in [0, vocab). InputError otherwise, naming ``argument`` and what was wrong.
    """
    if isinstance(value, torch.Tensor):
        ids = check_tensor_data(value, argument)
    else:
        if isinstance(value, (str, bytes)) or value is None or isinstance(value, (bool, float)):
            raise InputError(f"'{argument}' must be a (B, T) tensor of token ids (got {describe(value)})")
        try:
            ids = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise InputError(f"'{argument}' must be a (B, T) tensor of token ids, or rows of ints of "
                             f"equal length (got {describe(value)})") from None
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InputError(f"'{argument}' must be a (B, T) integer tensor of token ids (got {ids.dtype} "
                         f"of shape {tuple(ids.shape)})")
    if ids.shape[0] == 0 or ids.shape[1] < min_length:
        raise InputError(f"'{argument}' must hold at least {min_length} token{'s' if min_length > 1 else ''} "
                         f"per row (got shape {tuple(ids.shape)})")
    ids = ids.long()
    if vocab is not None:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            row, column = (int(i) for i in (ids == bad).nonzero()[0])
            raise InputError(f"'{argument}' must hold token ids from 0 to {vocab - 1}, the model's "
                             f"vocabulary of {vocab:,} (got id {bad} at row {row}, position {column}); "
                             f"tokenize with the model's own tokenizer")
    return ids


def as_mask(value: object, ids: torch.Tensor, argument: str = "attention_mask") -> torch.Tensor:
    """``value`` as a (B, T) long 0/1 mask with the shape of ``ids``, on ids' device."""
    if isinstance(value, torch.Tensor):
        mask = check_tensor_data(value, argument)
    else:
        if isinstance(value, (str, bytes, dict)) or value is None:
            raise InputError(f"'{argument}' must be a (B, T) tensor of 0 and 1 (got {describe(value)})")
        try:
            mask = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise InputError(f"'{argument}' must be a (B, T) tensor of 0 and 1 (got {describe(value)})") from None
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != tuple(ids.shape):
        raise InputError(f"'{argument}' must have the shape of input_ids {tuple(ids.shape)} "
                         f"(got {tuple(mask.shape)})")
    if mask.is_floating_point() and not bool(torch.isfinite(mask).all()):
        raise InputError(f"'{argument}' must hold 0 and 1 (got a non-finite value)")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError(f"'{argument}' must hold only 0 (pad) and 1 (token) (got other values)")
    return mask.long().to(ids.device)


def check_max_new_tokens(value: object) -> None:
    """Raise InputError unless ``max_new_tokens`` is an int >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"'max_new_tokens' must be an int >= 1 (got {describe(value)})")


def check_texts(value: object, argument: str, *, single: bool = True, item_hint: str = "") -> list[str]:
    """``value`` as a non-empty list of non-empty str (a lone str too, where ``single``);
    ``item_hint`` ends the message about a bad item (why it must not be empty)."""
    items = [value] if single and isinstance(value, str) else value
    if isinstance(items, (str, bytes, torch.Tensor)) or not isinstance(items, Sequence) or not items:
        what = "a str or a non-empty list of str" if single else "a non-empty list of str"
        raise InputError(f"'{argument}' must be {what} (got {describe(value)})")
    for index, text in enumerate(items):
        if not isinstance(text, str) or not text:
            raise InputError(f"'{argument}[{index}]' must be a non-empty str (got {describe(text)})"
                             + (f": {item_hint}" if item_hint else ""))
    return list(items)


def prompt_list(prompts: object) -> list[str]:
    """``prompts`` (a str or a sequence of them) as a non-empty list of non-empty str."""
    return check_texts(prompts, "prompts", item_hint="an empty prompt gives the model nothing to continue")


def pad_id(tokenizer: PreTrainedTokenizerBase, *, required_for: str) -> int:
    """The tokenizer's pad id; InputError, naming ``required_for``, if it has none."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise InputError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad token, and "
            f"{required_for} needs one to pad prompts on the left; set one first, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token (the attention mask hides the pads)")
    return pad


def encode_batch(tokenizer: PreTrainedTokenizerBase, prompts: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts and pad them on the left by hand (whatever the tokenizer's padding_side)."""
    check_tokenizer(tokenizer)
    items = prompt_list(prompts)
    encoded = [list(tokenizer(text)["input_ids"]) for text in items]
    width = max(map(len, encoded))
    if any(len(ids) != width for ids in encoded):
        lengths = sorted({len(ids) for ids in encoded})
        pad = pad_id(tokenizer, required_for=f"a batch of prompts of {lengths} tokens")
    else:
        pad = 0
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])  # (B, T)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])  # (B, T)
    return ids, mask


def count_phrase(items: Sequence[Any], noun: str) -> str:
    """``len(items)`` and ``noun``, plural unless there is one: ``"2 prompts"``, ``"1 row"``."""
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"
