"""Your own model, wrapped once so that every probe can call it: :func:`adapt`.

lmcheck calls three kinds of model (the model-call layer tries them in this order):

1. a Hugging Face ``transformers`` model: called as today (``input_ids``, ``attention_mask``,
   ``position_ids``, the KV cache, ``labels`` for its own loss);
2. a plain ``torch.nn.Module`` whose ``forward`` takes a ``(B, T)`` tensor of token ids and returns
   the ``(B, T, V)`` logits (a tensor, a tuple or list whose first element is the logits, or an
   object with ``.logits``): recognised without any wrapping; an ``attention_mask`` keyword is
   used where ``forward`` names one;
3. anything else, wrapped by :func:`adapt` with two small functions: one from ids (and the
   attention mask) to logits, and optionally one from a batch to the model's own training loss.

Example, a nanoGPT-style GPT whose ``forward(idx, targets=None)`` returns ``(logits, loss)``, with
the last position's logits only when ``targets`` is None and the loss over pre-shifted targets::

    model = lmcheck.adapt(
        gpt,
        logits=lambda ids: gpt(ids, ids)[0],  # with targets, every position's logits
        loss=lambda batch: gpt(batch["input_ids"][:, :-1], batch["labels"][:, 1:].contiguous())[1],
    )

(nanoGPT's loss ignores the target -1, not -100, so this loss function suits batches where every
token is supervised.)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lmcheck._validate import check_callable, check_int, describe
from lmcheck.errors import InputError

__all__ = ["AdaptedLM", "adapt"]

LogitsFunction = Callable[..., Any]  # (ids) or (ids, attention_mask) -> (B, T, V) logits
LossFunction = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]  # batch -> scalar loss


class AdaptedLM(torch.nn.Module):
    """A model that lmcheck calls through the user's functions; made by :func:`adapt`.

    The wrapped module is a submodule (``.module``), so parameters, ``train()``/``eval()`` and
    ``to(device)`` reach it; the functions are called with the tensors already on the model's
    device. The functions keep calling the module they were written for, so a deep copy of an
    adapted model still calls the original: adapt the copy instead.

    Attributes:
        module: the user's model.
        takes_mask: whether the logits function takes an attention mask (its second argument).
        context_length: the longest sequence the model takes, or None where unknown.
    """

    def __init__(self, module: torch.nn.Module, logits: LogitsFunction, loss: LossFunction | None,
                 context_length: int | None) -> None:
        super().__init__()
        self.module = module
        self.logits_function = logits
        self.loss_function = loss
        self.context_length = context_length
        self.takes_mask = _positional_arguments(logits) >= 2

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        """The logits function's output for ``input_ids`` (and the mask, where it takes one)."""
        if self.takes_mask:
            return self.logits_function(input_ids, attention_mask)
        return self.logits_function(input_ids)

    def own_loss(self, batch: Mapping[str, torch.Tensor]) -> Any:
        """The loss function's output for ``batch``; None where no loss function was given."""
        return None if self.loss_function is None else self.loss_function(batch)

    def extra_repr(self) -> str:
        return f"takes_mask={self.takes_mask}, own_loss={self.loss_function is not None}"


def adapt(module: torch.nn.Module, *, logits: LogitsFunction, loss: LossFunction | None = None,
          context_length: int | None = None) -> AdaptedLM:
    """Wrap ``module`` so that every lmcheck probe can call it.

    Args:
        module: the model (its parameters are what the training probes look at).
        logits: ``logits(ids)`` or ``logits(ids, attention_mask)``: from a ``(B, T)`` LongTensor of
            token ids (and a ``(B, T)`` mask of 1 for tokens and 0 for pads, or None) to the
            ``(B, T, V)`` logits at every position. With one argument the model takes no mask,
            and the probes that need padding report themselves not applicable.
        loss: ``loss(batch)``: the scalar loss the model trains with, from a mapping with
            ``input_ids``, ``labels`` (Hugging Face's convention: the labels *are* the inputs,
            unshifted, with -100 where a token is not supervised) and ``attention_mask`` where
            the batch has one. Optional: without it the probes use the reference loss (shifted
            cross-entropy over ``logits``), and ``loss_matches_reference`` is not applicable.
        context_length: the longest sequence the model takes, where the probes cannot read it
            from ``module.config``.

    Raises:
        InputError: ``module`` is not a torch module, or a function is not callable.
    """
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"'module' must be a torch.nn.Module (got {describe(module)})")
    check_callable(logits, "logits", "a function from (ids) or (ids, attention_mask) to (B, T, V) logits")
    if _positional_arguments(logits) < 1:
        raise InputError("'logits' must take the token ids as its first argument (got a function "
                         "that takes no positional argument)")
    if loss is not None:
        check_callable(loss, "loss", "a function from a batch (a mapping of tensors) to a scalar loss")
    if context_length is not None:
        check_int(context_length, "context_length", 1)
    return AdaptedLM(module, logits, loss, context_length)


def _positional_arguments(function: Callable[..., Any]) -> int:
    """How many positional arguments ``function`` takes (2 for ``*args``; 1 if unknowable)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return 1
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)
