"""The model-call layer: the one place that calls a model and reads what it is.

One model call with positions that skip left pads and the cache under either name transformers
uses (:func:`model_forward`, which also refuses non-finite logits), the model's device, dtype,
input vocabulary and context length, eval mode that restores the caller's mode, and the check
that a model decodes left to right. The probes and the greedy loop import these rather than
repeat them.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import PreTrainedModel

from lmcheck._finite import require_finite
from lmcheck._validate import check_model, describe
from lmcheck.errors import InputError, ModelError


def model_forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, past: Any,
                  *, use_cache: bool = True, what: str = "the model's logits") -> tuple[torch.Tensor, Any]:
    """One model call on the new tokens ``ids`` (B, t); ``mask`` covers the whole sequence.

    Raises NonFiniteError, naming ``what`` and the row, position and token id, where the logits
    at an unmasked position hold NaN or Inf (a pad's logits may be anything).
    """
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": use_cache}
    if mask is not None:
        mask = mask.to(ids.device)
        kwargs["attention_mask"] = mask
        if _accepts(model, "position_ids"):
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): pads do not count
            kwargs["position_ids"] = positions[:, -ids.shape[1]:]
    # transformers 5.24 renamed past_key_values to cache (argument and output); earlier 5.x
    # releases know only past_key_values
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    if past is not None:
        kwargs[cache_name] = past
    output = model(**kwargs)
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ModelError(f"'model' must return an output with .logits (got {describe(output)})")
    fed = ids.shape[1]
    require_finite(logits, what, ("row", "position", "token id"),
                   valid=None if mask is None else mask[:, -fed:].bool(),
                   offsets=(0, 0 if mask is None else mask.shape[1] - fed))
    return logits, getattr(output, cache_name, None) if use_cache else None  # (B, t, V)


def _accepts(model: torch.nn.Module, name: str) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while probing; the model's own mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def check_causal_lm(model: object) -> None:
    """Raise ModelError unless ``model`` is a torch module that decodes left to right."""
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"'model' must be a torch.nn.Module causal LM (got {describe(model)})")
    check_model(model)
    if isinstance(model, PreTrainedModel) and not model.can_generate():
        raise ModelError(
            f"'model' must be a causal LM that decodes left to right (got a {type(model).__name__}, "
            "whose can_generate() is False); a masked LM predicts masked tokens from both sides: "
            "use lmcheck's masked-LM probes for it")


def input_vocabulary(model: torch.nn.Module) -> int | None:
    """Rows of the model's input embedding table (ids must lie below it); None if unknown."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    rows = getattr(embedding, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter: where its inputs must go."""
    return next(model.parameters()).device


def model_context(model: torch.nn.Module) -> tuple[int, str] | None:
    """The model's context length and where it was read (``config.n_positions``); None if unknown."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        context = getattr(config, key, None)
        if isinstance(context, int):
            return context, f"config.{key}"
    return None


def check_context(model: torch.nn.Module, prompt_length: int, max_new_tokens: int, *,
                  pads: str = "") -> None:
    """Raise InputError if the prompt plus the new tokens exceed the model's context.

    ``pads`` names padding added by the caller (``"pad_tokens=8"``) so the message can name it.
    """
    found = model_context(model)
    if found is not None and prompt_length + max_new_tokens > found[0]:
        context, where = found
        raise InputError(
            f"a prompt of {prompt_length} tokens{f' (with {pads})' if pads else ''} plus "
            f"max_new_tokens={max_new_tokens} needs {prompt_length + max_new_tokens} positions, more "
            f"than the model's context of {context} ({where}); shorten the prompt or ask for fewer "
            f"tokens")


def parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's (first) parameters, which picks its tolerances."""
    return next(model.parameters()).dtype
