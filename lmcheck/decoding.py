"""The tutorial's greedy loop, and the model call and input checks the causal probes share with it.

The loop is four lines: run the model, take the logits at position -1, append their argmax to
``input_ids``, extend the ``attention_mask`` by one. :func:`greedy_decode` is that loop, with or
without a KV cache, for a left-padded batch; :func:`next_token_logits` is its first step.

Below them sit the pieces :mod:`lmcheck.causal` and :mod:`lmcheck.invariance` import rather than
repeat: :func:`model_forward` (one model call, with positions that skip left pads and the cache
under either name transformers uses), :func:`eval_mode`, :func:`model_device`, the checks of a
model, ids, prompts and ``max_new_tokens`` that raise :class:`~lmcheck.errors.InputError` or
:class:`~lmcheck.errors.ModelError`, and :func:`encode_batch`, which pads prompts on the left.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmcheck._finite import require_finite
from lmcheck._validate import as_ids, as_mask, check_bool, check_model, check_tokenizer, describe
from lmcheck.errors import InputError, ModelError

__all__ = [
    "GreedyOutput",
    "as_ids",
    "check_causal_lm",
    "check_context",
    "check_max_new_tokens",
    "encode_batch",
    "eval_mode",
    "greedy_decode",
    "model_device",
    "model_forward",
    "next_token_logits",
    "pad_id",
    "prompt_list",
]


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
    cache_used = use_cache
    with eval_mode(model), torch.no_grad():
        for step in range(max_new_tokens):
            feed = ids[:, -1:] if past is not None else ids
            logits, past = model_forward(model, feed, mask, past, use_cache=use_cache,
                                         what=f"the logits at decoding step {step} (from 0)")
            cache_used = cache_used and past is not None  # no cache: the next step re-feeds all
            last = logits[:, -1, :].float()  # (B, V)
            steps.append(last.cpu())
            ids = torch.cat([ids, last.argmax(dim=-1, keepdim=True)], dim=1)  # (B, T + 1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return GreedyOutput(ids.cpu(), torch.stack(steps, dim=1), mask.cpu(), prompt_length, cache_used)



# --- shared with the probes in lmcheck.causal and lmcheck.invariance -------------------------

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


def check_max_new_tokens(value: object) -> None:
    """Raise InputError unless ``max_new_tokens`` is an int >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"'max_new_tokens' must be an int >= 1 (got {describe(value)})")


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


def prompt_list(prompts: object) -> list[str]:
    """``prompts`` (a str or a sequence of them) as a non-empty list of non-empty str."""
    items = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(items, Sequence) or not items:
        raise InputError(f"'prompts' must be a str or a non-empty list of str (got {describe(prompts)})")
    for index, text in enumerate(items):
        if not isinstance(text, str) or not text:
            raise InputError(f"'prompts[{index}]' must be a non-empty str (got {describe(text)}): "
                             "an empty prompt gives the model nothing to continue")
    return list(items)


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
