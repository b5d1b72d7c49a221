"""The tutorial's greedy loop: run the model, take the logits at position -1, append their
argmax to ``input_ids``, extend the ``attention_mask`` by one, and repeat.

:func:`greedy_decode` is that loop, with or without a KV cache, for a left-padded batch;
:func:`next_token_logits` is its first step. The model call itself is in the model-call layer
(``lmcheck._model``), shared with the probes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmcheck._model import (
    check_causal_lm,
    check_context,
    eval_mode,
    has_cache,
    input_vocabulary,
    model_device,
    model_forward,
)
from lmcheck._validate import as_ids, as_mask, check_bool, check_max_new_tokens, describe
from lmcheck.errors import InputError

__all__ = ["GreedyOutput", "greedy_decode", "next_token_logits"]


@dataclass(frozen=True)
class GreedyOutput:
    """What :func:`greedy_decode` returns.

    Attributes:
        sequences: prompt and new tokens, ``(B, T + N)``.
        logits: the logits each step's argmax was taken from, float32 ``(B, N, V)``.
        attention_mask: the mask extended by one per step, ``(B, T + N)``.
        prompt_length: T.
        cache_used: True when the model returned a KV cache at every step, so each step after
            the first fed only the new token; False with ``use_cache=False`` or when the model
            returned no cache, in which case the loop re-fed the whole sequence instead.
    """

    sequences: torch.Tensor
    logits: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    cache_used: bool = False

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]  # (B, N)


def next_token_logits(model: torch.nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The logits at position -1 for each row of ``inputs`` (a tokenizer's output), ``(B, V)``."""
    check_causal_lm(model)
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise InputError(f"'inputs' must be a mapping with 'input_ids' (got {describe(inputs)})")
    ids = as_ids(inputs["input_ids"], "inputs['input_ids']", vocab=input_vocabulary(model))
    check_context(model, ids.shape[1], 0)
    mask = inputs.get("attention_mask")
    mask = None if mask is None else as_mask(mask, ids, "inputs['attention_mask']")
    with eval_mode(model), torch.no_grad():
        logits, _ = model_forward(model, ids.to(model_device(model)), mask, None)
    return logits[:, -1, :]


def greedy_decode(
    model: torch.nn.Module, input_ids: torch.Tensor | Sequence[Any], *, max_new_tokens: int,
    use_cache: bool = True, attention_mask: torch.Tensor | None = None,
) -> GreedyOutput:
    """The tutorial's loop: argmax of the logits at -1, append it, extend the mask; repeat.

    Left padding is handled as ``generate`` does: ``position_ids = cumsum(attention_mask) - 1``.
    No eos stop: exactly ``max_new_tokens`` tokens are appended to each row.

    Args:
        model: a causal LM whose output has ``.logits``.
        input_ids: ``(B, T)`` or ``(T,)`` token ids, left-padded if rows differ in length.
        max_new_tokens: tokens to append, at least 1.
        use_cache: feed only the new token with ``past_key_values`` (True) or the whole sequence.
            A model that returns no cache gets the whole sequence anyway; the output's
            ``cache_used`` says which happened.
        attention_mask: ``(B, T)``, 0 at pads; None means all ones.

    Raises:
        NonFiniteError: the logits at an unmasked position are NaN or Inf (the message names
            the step, row, position and token id): tokens read from them would mean nothing.

    Example:
        >>> out = greedy_decode(model, tokenizer("Swimming at the beach is", return_tensors="pt")
        ...                     .input_ids, max_new_tokens=2)
        >>> tokenizer.decode(out.sequences[0])
        'Swimming at the beach is a great'
    """
    check_causal_lm(model)
    ids = as_ids(input_ids, "input_ids", vocab=input_vocabulary(model))
    check_max_new_tokens(max_new_tokens)
    check_bool(use_cache, "use_cache")
    check_context(model, ids.shape[1], max_new_tokens)
    device = model_device(model)
    ids = ids.to(device)
    mask = torch.ones_like(ids) if attention_mask is None else as_mask(attention_mask, ids)
    prompt_length = ids.shape[1]
    steps: list[torch.Tensor] = []
    past = None
    use_cache = use_cache and has_cache(model)  # a cache the model cannot take back is not used
    cache_used = use_cache
    with eval_mode(model), torch.no_grad():
        for step in range(max_new_tokens):
            feed = ids[:, -1:] if past is not None else ids
            logits, past = model_forward(model, feed, mask, past, use_cache=use_cache, last=1,
                                         what=f"the logits at decoding step {step} (from 0)")
            cache_used = cache_used and past is not None  # no cache: the next step re-feeds all
            last = logits[:, -1, :].float()  # (B, V)
            steps.append(last.cpu())
            ids = torch.cat([ids, last.argmax(dim=-1, keepdim=True)], dim=1)  # (B, T + 1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return GreedyOutput(ids.cpu(), torch.stack(steps, dim=1), mask.cpu(), prompt_length, cache_used)


# --- shared with the probes in lmcheck.causal and lmcheck.invariance -------------------------


