"""The model-call layer: the only place that calls a model and reads what it is.

Three kinds of model come in (see :mod:`lmcheck.adapters`): a Hugging Face model, a plain
``torch.nn.Module`` from ids to logits, and one wrapped by :func:`lmcheck.adapt`. Here they all
become the same few operations: logits from ids (with an attention mask, positions that skip
left pads, and the KV cache where the model has one), the model's own loss and the reference
loss, the model's device, dtype, vocabulary and context length, and eval mode that restores the
caller's mode. Every output a probe reads is checked for NaN and Inf on its way out.

A model that cannot be called as its kind promises gets one :class:`ModelError` that says what
was tried, what came back and the :func:`lmcheck.adapt` call to write, never a traceback from
inside the user's forward for a calling-convention mismatch. A check that needs what the model
lacks (a mask argument, a cache, ``generate``) gets :class:`NotApplicableError`.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from lmcheck._finite import require_finite
from lmcheck._validate import check_model, describe
from lmcheck.adapters import AdaptedLM
from lmcheck.errors import InputError, LmcheckError, ModelError, NotApplicableError

IGNORE_INDEX = -100  # labels that are not supervised (Hugging Face's and PyTorch's convention)

ADAPT_HINT = ("wrap it once: lmcheck.adapt(model, logits=lambda ids, mask: <(B, T, V) logits>, "
              "loss=lambda batch: <its training loss>)")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "block_size", "max_seq_len",
                 "max_seq_length", "context_length", "seq_len")


# ---------------------------------------------------------------- what the model is


def kind(model: torch.nn.Module) -> str:
    """``"transformers"`` (a Hugging Face model, or a PEFT model around one), ``"adapted"`` (made
    by :func:`lmcheck.adapt`) or ``"plain"``."""
    if hf_model(model) is not None:
        return "transformers"
    return "adapted" if isinstance(model, AdaptedLM) else "plain"


def hf_model(model: object) -> PreTrainedModel | None:
    """The Hugging Face model ``model`` is, or that a PEFT model (LoRA, prefix tuning, ...) wraps;
    None for anything else. A PEFT model is called, and computes its loss, as its base model."""
    if isinstance(model, PreTrainedModel):
        return model
    if type(model).__module__.startswith("peft."):
        get_base = getattr(model, "get_base_model", None)
        base = get_base() if callable(get_base) else None
        return base if isinstance(base, PreTrainedModel) else None
    return None


def takes_mask(model: torch.nn.Module) -> bool:
    """Whether the model can be given an attention mask (so pads can be skipped).

    A forward that names ``attention_mask`` takes one (an adapted model: a logits function of
    two arguments). A Hugging Face forward that has only ``**kwargs`` for it is tried once: it
    takes the mask when a mask with a pad changes the logits of the other positions (xLSTM's
    ``**kwargs`` swallow it unused; Hugging Face's own call does not complain either).
    """
    if isinstance(model, AdaptedLM):
        return model.takes_mask
    if _names(model, "attention_mask"):
        return True
    if kind(model) != "transformers" or not _accepts(model, "attention_mask"):
        return False
    return _capability(model, "mask", _mask_changes_logits)


def has_cache(model: torch.nn.Module) -> bool:
    """Whether lmcheck can drive the model's KV cache: a Hugging Face model that, called with
    ``use_cache=True``, returns a cache (``cache`` or ``past_key_values``) and takes it back for
    the next token. Found by trying once per model (two forwards of a few tokens): openai-gpt,
    RWKV (its ``state`` is not a cache it can take back as one) and RecurrentGemma return none.
    """
    return kind(model) == "transformers" and _capability(model, "cache", _cache_round_trip)


# capability -> model -> what trying found (weak keys: a model that goes away takes its entries)
_CAPABILITIES: dict[str, weakref.WeakKeyDictionary[torch.nn.Module, bool]] = {}


def _capability(model: torch.nn.Module, name: str, probe: Any) -> bool:
    found = _CAPABILITIES.setdefault(name, weakref.WeakKeyDictionary())
    if model not in found:
        with eval_mode(model), torch.no_grad():
            found[model] = bool(probe(model))
    return found[model]


def _trial_ids(model: torch.nn.Module, length: int) -> torch.Tensor:
    vocab = input_vocabulary(model) or 2
    # ids from the middle of the vocabulary: clear of the specials most tokenizers put first
    return (torch.arange(length) * 7 + vocab // 2).remainder(vocab).reshape(1, length).to(model_device(model))


def _cache_round_trip(model: torch.nn.Module) -> bool:
    ids = _trial_ids(model, 4)
    try:
        output = _call_transformers(model, ids[:, :3], torch.ones_like(ids[:, :3]), None, True)
        past = _cache_of(model, output)
        if past is None:
            return False
        _call_transformers(model, ids[:, 3:], torch.ones_like(ids), past, True)
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError, KeyError, NotImplementedError):
        return False  # a cache it cannot take back is not one lmcheck can drive
    return True


def _mask_changes_logits(model: torch.nn.Module) -> bool:
    ids = _trial_ids(model, 4)
    mask = torch.ones_like(ids)
    mask[:, 0] = 0  # the first position a pad
    try:
        plain = _logits_of(model(input_ids=ids), model, ids)
        masked = _logits_of(model(input_ids=ids, attention_mask=mask), model, ids)
    except (TypeError, ValueError, RuntimeError):
        return False
    return not torch.equal(plain[:, 1:], masked[:, 1:])


def recurrent_note(model: torch.nn.Module, *, cached: bool) -> str:
    """For a model without attention layers (a recurrent or state-space LM, such as Mamba), the
    mask convention lmcheck followed and what a failure then points at; empty for any other.
    ``cached``: the failure compares cached steps with full passes (else padded with unpadded)."""
    if any("attention" in type(m).__name__.lower() for m in model.modules()):
        return ""
    convention = ("lmcheck gives each cached step the attention mask of the whole sequence, as "
                  "generate gives an attention model" if cached else
                  "lmcheck left-pads as generate does (mask 0 at the pads, positions counted over "
                  "the real tokens) and decodes with the model's cache, each step given the whole "
                  "sequence's mask")
    return (f"; the model has no attention layer (a recurrent or state-space LM): {convention}, so a "
            f"failure after the prompt means its recurrent state takes in what the mask should keep "
            f"out (transformers' generate drops the mask for Mamba and FalconMamba, and trims it for "
            f"Mamba2)")


def can_generate(model: torch.nn.Module) -> bool:
    """Whether the model has Hugging Face's ``generate`` to compare a greedy loop with."""
    base = hf_model(model)
    return base is not None and base.can_generate() and callable(getattr(model, "generate", None))


def configured_cache(model: torch.nn.Module) -> bool:
    """Whether a call that does not say ``use_cache`` builds a KV cache: the Hugging Face
    model's ``config.use_cache`` (the Trainer sets it from its arguments, False by default)."""
    base = hf_model(model)
    return base is not None and bool(getattr(base.config, "use_cache", False))


def has_own_loss(model: torch.nn.Module) -> bool:
    """Whether the model computes its own training loss (``labels=`` or an adapted loss)."""
    if isinstance(model, AdaptedLM):
        return model.loss_function is not None
    return kind(model) == "transformers"


def _names(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` names the keyword ``name`` (``**kwargs`` is not enough)."""
    parameters = _forward_parameters(model)
    return parameters is not None and name in parameters


def _accepts(model: torch.nn.Module, name: str) -> bool:
    parameters = _forward_parameters(model)
    return parameters is not None and (name in parameters or any(
        p.kind is p.VAR_KEYWORD for p in parameters.values()))


def _forward_parameters(model: torch.nn.Module) -> Mapping[str, inspect.Parameter] | None:
    """``model.forward``'s parameters, read once per forward function (a decoding step asks at
    every token); None where the signature cannot be read."""
    forward = getattr(model.forward, "__func__", model.forward)  # one key per function, patched ones too
    cached = _SIGNATURES.get(forward)
    if cached is None and forward not in _SIGNATURES:
        try:
            cached = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            cached = None
        _SIGNATURES[forward] = cached
    return cached


_SIGNATURES: dict[Any, Mapping[str, inspect.Parameter] | None] = {}


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


def token_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that turns token ids into vectors: ``get_input_embeddings()`` where the model
    has it, else its largest ``nn.Embedding`` (a position table is smaller than the vocabulary)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        found = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        found = None
    if isinstance(found, torch.nn.Module):
        return found
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    return max(tables, key=lambda m: m.num_embeddings) if tables else None


def input_vocabulary(model: torch.nn.Module) -> int | None:
    """Rows of the model's token embedding table (ids must lie below it); None if unknown."""
    table = token_embedding(model)
    rows = getattr(table, "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    weight = getattr(table, "weight", None)  # an embedding of another class (ibert's QuantEmbedding)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def output_size(model: torch.nn.Module) -> int:
    """The number of logits per position (the output vocabulary V)."""
    embeddings = getattr(model, "get_output_embeddings", lambda: None)()
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int) and kind(model) == "transformers":
        return size
    with eval_mode(model), torch.no_grad():  # ask the model: one forward pass of two tokens
        logits, _ = model_forward(model, torch.zeros(1, 2, dtype=torch.long, device=model_device(model)),
                                  None, None, use_cache=False)
    return int(logits.shape[-1])


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter: where its inputs must go."""
    return next(model.parameters()).device


def parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's (first) parameters, which picks its tolerances."""
    return next(model.parameters()).dtype


def model_context(model: torch.nn.Module) -> tuple[int, str] | None:
    """The model's context length and where it was read (``config.n_positions``); None if unknown.

    Read from ``config`` (Hugging Face's names, nanoGPT's and litgpt's ``block_size``, ...), from
    :func:`lmcheck.adapt`'s ``context_length``, or from the wrapped module's ``config``.
    """
    if isinstance(model, AdaptedLM):
        if model.context_length is not None:
            return model.context_length, "adapt(context_length=...)"
        found = model_context(model.module)
        return None if found is None else (found[0], f"module.{found[1]}")
    config = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        context = getattr(config, key, None)
        if isinstance(context, int) and not isinstance(context, bool) and context > 0:  # XLNet's -1: no limit
            offset = _position_offset(model, context)
            if offset:
                return context - offset, (f"config.{key} = {context} less {offset}: its positions "
                                          f"are numbered from padding_idx + 1 = {offset}")
            return context, f"config.{key}"
    return None


def _position_offset(model: torch.nn.Module, context: int) -> int:
    """Positions a model's table holds below its first real position: ``padding_idx + 1`` where
    the position table has a padding row (RoBERTa and its family number positions from
    ``padding_idx + 1``, so roberta-base's 514 positions hold 512 tokens); else 0."""
    for name, module in model.named_modules():
        padding = getattr(module, "padding_idx", None)
        weight = getattr(module, "weight", None)
        rows = getattr(module, "num_embeddings", weight.shape[0] if isinstance(weight, torch.Tensor) else None)
        if name.endswith("position_embeddings") and isinstance(padding, int) and rows == context:
            return padding + 1  # an nn.Embedding, or another class of table (ibert's QuantEmbedding)
    return 0


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


@contextmanager
def in_mode(model: torch.nn.Module, training: bool) -> Iterator[None]:
    """The model in training or eval mode meanwhile; its own mode restored afterwards."""
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)


def eval_mode(model: torch.nn.Module) -> AbstractContextManager[None]:
    """Dropout off while probing; the model's own mode is restored afterwards."""
    return in_mode(model, False)


def _dropouts(model: torch.nn.Module) -> list[tuple[object, str, float]]:
    """Every dropout probability in the model, as (owner, attribute, value): ``nn.Dropout``
    modules' ``p`` and the float ``*dropout*`` attributes attention layers pass to
    ``scaled_dot_product_attention``."""
    found: list[tuple[object, str, float]] = []
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            found.append((module, "p", module.p))
            continue
        for name, value in vars(module).items():
            if "dropout" in name.lower() and isinstance(value, float) and not isinstance(value, bool):
                found.append((module, name, value))
    return found


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether any dropout in the model has a probability above 0."""
    return any(value > 0 for _, _, value in _dropouts(model))


@contextmanager
def no_dropout(model: torch.nn.Module) -> Iterator[None]:
    """Every dropout in the model set to 0 (see :func:`has_dropout`), whatever mode the model is
    put in meanwhile; put back on exit."""
    saved = _dropouts(model)
    try:
        for owner, name, _ in saved:
            setattr(owner, name, 0.0)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


# ---------------------------------------------------------------- calling it


def model_forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, past: Any,
                  *, use_cache: bool = True, what: str = "the model's logits",
                  last: int | None = None, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    """One model call on the new tokens ``ids`` (B, t); ``mask`` covers the whole sequence.
    ``positions``, the batch's own ``position_ids`` (a packed row's, restarting at each
    document), go to a Hugging Face model that takes them instead of those counted from ``mask``.

    Returns the logits (B, t, V) and the cache (None for a model without one: the caller then
    feeds the whole sequence again). With ``last``, the logits of the last ``last`` positions
    only, (B, last, V): a Hugging Face model is asked for just those (``logits_to_keep``, as
    ``generate`` does with 1), which spares the output layer's work at every other position.

    Raises:
        NonFiniteError: the logits at an unmasked position hold NaN or Inf (a pad's logits may be
            anything); the message names ``what`` and the row, position and token id.
        NotApplicableError: ``mask`` has pads but the model takes no attention mask.
        ModelError: the model cannot be called with ids, or returns no (B, t, V) logits.
    """
    if mask is not None:
        mask = mask.to(ids.device)
    if kind(model) == "transformers":
        keep = {"logits_to_keep": last} if last and _names(model, "logits_to_keep") else {}
        output = _call_transformers(model, ids, _mask_for(model, mask), past, use_cache, positions=positions, **keep)
        cache = _cache_of(model, output) if use_cache else None
        if keep:
            output = output.logits  # (B, last, V)
            ids = ids[:, -last:]  # type: ignore[operator]
    else:
        output = _call_plain(model, ids, _mask_for(model, mask))
        cache = None
    logits = _logits_of(output, model, ids)
    if last and logits.shape[1] > last:
        logits, ids = logits[:, -last:], ids[:, -last:]
    fed = ids.shape[1]
    require_finite(logits, what, ("row", "position", "token id"),
                   valid=None if mask is None else mask[:, -fed:].bool(),
                   offsets=(0, 0 if mask is None else mask.shape[1] - fed))
    return logits, cache


def _call_transformers(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, past: Any,
                       use_cache: bool, *, positions: torch.Tensor | None = None, **extra: Any) -> Any:
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": use_cache, **extra}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if _accepts(model, "position_ids"):
        if positions is None and mask is not None:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): pads do not count
        if positions is not None:
            kwargs["position_ids"] = positions.to(ids.device)[:, -ids.shape[1]:]
    if past is not None:
        kwargs[_cache_name(model)] = past
    return model(**kwargs)


def _cache_name(model: torch.nn.Module) -> str:
    # transformers 5.24 renamed past_key_values to cache (argument and output); earlier 5.x
    # releases know only past_key_values
    return "cache" if _names(hf_model(model) or model, "cache") else "past_key_values"


def _cache_of(model: torch.nn.Module, output: Any) -> Any:
    return getattr(output, _cache_name(model), None)


def _mask_for(model: torch.nn.Module, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask to give a plain or adapted model: None where it has no pads, or it takes none."""
    if mask is None or takes_mask(model):
        return mask
    if bool((mask == 0).any()):
        raise NotApplicableError(
            f"the model's forward takes no attention mask, so it cannot skip the pads of a "
            f"left-padded batch (a plain module needs an 'attention_mask' keyword; an adapted one a "
            f"logits function of (ids, mask)); the {type(model).__name__} has neither")
    return None  # all ones: nothing to skip, nothing lost


def _call_plain(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> Any:
    """``model(ids)`` (with ``attention_mask=`` where given); a convention mismatch as ModelError."""
    by_name = _ids_by_keyword(model)
    kwargs: dict[str, Any] = {} if mask is None else {"attention_mask": mask}
    tried = ("model(input_ids=ids" if by_name else "model(ids") + (", attention_mask=mask)" if kwargs else ")")
    if isinstance(model, AdaptedLM):
        tried = "the adapted logits function"
    try:
        return model(input_ids=ids, **kwargs) if by_name else model(ids, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError, KeyError) as error:
        if isinstance(error, LmcheckError):
            raise
        hint = ("fix the function given to adapt()" if isinstance(model, AdaptedLM) else ADAPT_HINT)
        raise ModelError(
            f"lmcheck called {tried} with a (B, T) = {tuple(ids.shape)} LongTensor of token ids on "
            f"{ids.device}, as it calls a plain PyTorch LM, and the call raised "
            f"{type(error).__name__}: {error}. If your model is called another way, {hint}") from error


def _ids_by_keyword(model: torch.nn.Module) -> bool:
    """Whether the ids go in as ``input_ids=``: forward names it, or takes keywords only."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    named = any(p.name == "input_ids" and p.kind is not p.POSITIONAL_ONLY for p in parameters)
    return named or (not positional and any(p.kind is p.VAR_KEYWORD for p in parameters))


def _logits_of(output: Any, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The (B, t, V) logits in ``output``: a tensor, the first element of a tuple or list, a
    mapping's or an object's ``logits``; ModelError naming what came back otherwise."""
    logits = output
    if isinstance(output, (tuple, list)) and output:
        logits = output[0]
    elif isinstance(output, Mapping) and "logits" in output:
        logits = output["logits"]
    elif not isinstance(output, torch.Tensor):
        logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ModelError(
            f"lmcheck reads a model's logits from a tensor, the first element of a tuple or list, or "
            f".logits, and the {type(model).__name__} returned {describe(output)}; {ADAPT_HINT}")
    batch, length = ids.shape
    if logits.dim() != 3 or logits.shape[0] != batch or logits.shape[1] != length:
        last_only = logits.dim() == 3 and logits.shape[:2] == (batch, 1) and length > 1
        reason = (" (the last position's only, as nanoGPT's GPT returns them when called without "
                  "targets)" if last_only else "")
        raise ModelError(
            f"the {type(model).__name__} returned logits of shape {tuple(logits.shape)} for input ids "
            f"of shape {(batch, length)}{reason}; every probe needs (B, T, V) = ({batch}, {length}, V), "
            f"one row of logits per position. {ADAPT_HINT[0].upper()}{ADAPT_HINT[1:]}"
            + ("; for a nanoGPT-style forward(idx, targets), logits=lambda ids: model(ids, ids)[0] "
               "gives every position" if last_only else ""))
    return logits


def encoder_logits(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The (B, T, V) logits of a masked LM for a tokenizer's ``inputs`` (ids, mask, token types
    where the model takes them), on the model's device; not checked for NaN (the caller names
    its texts)."""
    device = model_device(model)
    ids = inputs["input_ids"].to(device)
    mask = inputs.get("attention_mask")
    mask = None if mask is None else mask.to(device)
    if kind(model) == "transformers":
        accepted = inspect.signature(model.forward).parameters
        given = {k: v.to(device) for k, v in inputs.items() if k in accepted and k != "attention_mask"}
        output = model(**given, **({} if mask is None else _encoder_mask(model, mask)))
    else:
        output = _call_plain(model, ids, _mask_for(model, mask))
    return _logits_of(output, model, ids)


def _encoder_mask(model: torch.nn.Module, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"attention_mask": mask}`` for a model that takes one; nothing where the mask has no
    pads; NotApplicableError where it has pads the model cannot be told of (FNet takes none)."""
    if takes_mask(model):
        return {"attention_mask": mask}
    if bool((mask == 0).any()):
        raise NotApplicableError(
            f"the {type(model).__name__}'s forward takes no attention mask, so a padded batch "
            f"cannot hide its pads from the real tokens")
    return {}


# ---------------------------------------------------------------- losses


def shifted_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Shifted cross-entropy summed over the supervised tokens (position t predicts
    ``labels[t + 1]``; -100 is ignored; float32), and how many they are."""
    targets = labels[:, 1:].to(logits.device)
    total = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Summed cross-entropy over the supervised tokens, their count, and the count the shift
    would drop (``labels != -100`` before the shift, transformers #46204's mistake)."""
    if "targets" in batch:
        scores, targets = logits, batch["targets"].to(logits.device)
        unshifted = int((targets != IGNORE_INDEX).sum())
        total = F.cross_entropy(scores.float().reshape(-1, scores.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total, unshifted, unshifted
    total, count = shifted_loss_sum(logits, batch["labels"])
    return total, count, int((batch["labels"] != IGNORE_INDEX).sum())


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted cross-entropy: position t predicts ``labels[t + 1]``; -100 is ignored; the mean is
    over the supervised tokens (computed in float32)."""
    total, supervised = shifted_loss_sum(logits, labels)
    if supervised == 0:
        raise InputError("the batch's 'labels' supervise no token after the first position (all "
                         "are -100), so there is no loss to compute")
    return total / supervised


def own_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own loss on ``batch`` (``input_ids``, ``labels``, optional ``attention_mask``,
    on the model's device) and, where the same call gave them, its logits.

    Raises NotApplicableError for a model with no loss of its own.
    """
    if isinstance(model, AdaptedLM) and model.loss_function is not None:
        loss = model.own_loss(dict(batch))
        logits = None
    elif kind(model) == "transformers":
        extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "position_ids")}
        output = _call_transformers(model, batch["input_ids"], batch.get("attention_mask"), None, False,
                                    positions=batch.get("position_ids"), **extra)
        loss, logits = getattr(output, "loss", None), getattr(output, "logits", None)
    else:
        raise NotApplicableError(f"the {type(model).__name__} computes no loss of its own (a plain module "
                                 f"is called with ids only; give adapt() a loss function)")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ModelError(f"the model's own loss must be a scalar tensor (got {describe(loss)})")
    return loss.reshape(()), logits


def loss_of(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The loss the model trains with: its own where it has one, else the reference loss over
    its logits (which must be finite at unmasked positions). The loss itself is not checked: a
    training loop records a NaN step before it stops."""
    return loss_and_logits(model, batch)[0]


def loss_and_logits(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`loss_of` and the logits of the same call (None where the call gave none: a loss
    function given to ``adapt``)."""
    batch = {k: v.to(model_device(model)) for k, v in batch.items()}
    if has_own_loss(model):
        return own_loss(model, batch)
    logits, _ = model_forward(model, batch["input_ids"], batch.get("attention_mask"), None,
                              use_cache=False, what="the logits behind the loss", positions=batch.get("position_ids"))
    return reference_loss(logits, batch["labels"]), logits


def training_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], *,
                  what: str = "the loss of the batch") -> torch.Tensor:
    """:func:`loss_of`, refused with NonFiniteError (naming ``what``) if it is NaN or Inf."""
    loss = loss_of(model, batch)
    require_finite(loss, what, ())
    return loss


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
              loss: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None) -> float:
    """The mean loss over ``batches`` in eval mode, each batch weighted by its rows: ``loss(batch)``
    (on the model's device), by default :func:`training_loss` (NaN or Inf refused, naming the rows)."""
    total, rows = 0.0, 0
    device = model_device(model)
    with eval_mode(model):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            count = batch["input_ids"].shape[0]
            value = loss(batch) if loss is not None else training_loss(
                model, batch, what=f"the loss of rows {rows} to {rows + count - 1}")
            total += float(value.float()) * count
            rows += count
    return total / max(rows, 1)
