"""Training a masked language model: the masked-LM loop and chapter 2's from-scratch run.

:func:`train_masked_lm` trains any Hugging Face masked LM in place with
``DataCollatorForLanguageModeling(mlm=True)``; :func:`memorize_chunks` is chapter 2's run, a tiny
BERT trained until it has memorized a few chunks, with :data:`MEMORIZATION_RUN` its settings.
The probes that judge the result (``fill_mask``, ``mask_fill_accuracy``, ``masked_loss_at_init``)
are in ``lmcheck.masked``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple, cast

import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from lmcheck._model import model_device
from lmcheck._validate import check_number
from lmcheck.corpus import chunk_documents
from lmcheck.loops._step import adamw, optimizer_step, seeded_batches
from lmcheck.masked import check_masked_lm, example_ids
from lmcheck.models import bert_from_scratch
from lmcheck.recipes import MASKED_CPU, MaskedRunConfig

__all__ = [
    "MEMORIZATION_RUN",
    "MemorizationRun",
    "memorize_chunks",
    "train_masked_lm",
]

# Chapter 2's from-scratch run (tests, tutorial and benchmarks share it): the recipe itself is
# lmcheck.recipes.MASKED_CPU, with its measurements.
MEMORIZATION_RUN: MaskedRunConfig = MASKED_CPU

_Batch = Callable[[list[dict[str, Any]]], Mapping[str, torch.Tensor]]


def train_masked_lm(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Any,
    config: MaskedRunConfig = MASKED_CPU, *, max_grad_norm: float = 1.0, collator: _Batch | None = None,
    only_masked_logits: bool = True, **overrides: Any,
) -> list[float]:
    """Train ``model`` in place with the masked-LM objective; returns one loss per step.

    The list has ``steps`` entries: the training loss of each step, or NaN for a step whose
    batch had no scored token (the collator masked nothing), which is skipped without an
    optimizer update. The model is left in eval mode.

    Batches come from ``DataCollatorForLanguageModeling(mlm=True)``: 15% of the tokens are
    picked, 80% of those become the mask token, 10% a random token, 10% stay, and only they
    are scored. A plain PyTorch loop rather than ``Trainer`` because on a CPU it runs about twice
    as fast (measured on 2 cores, a 2-layer 128-wide GPT-2: 12.1k vs 5.8k tokens/s) and, with ``only_masked_logits``, it computes the
    vocabulary-wide output layer only at the scored positions: the same loss, about 5x less work
    for a small model whose output layer dominates.

    Args:
        examples: a ``datasets.Dataset`` with ``input_ids`` (e.g. ``chunk_documents``' chunks),
            a list of id lists, or a list of str (tokenized, truncated to the model's positions).
        config: the loop's settings (``steps``, ``lr``, ``batch_size``, ``mlm_probability``,
            ``seed``), default :data:`~lmcheck.recipes.MASKED_CPU`, with ``overrides`` applied
            (``steps=50``) and checked first. Steps are AdamW (no weight decay, gradient norm
            clipped to ``max_grad_norm``); examples are drawn in a seeded shuffled order (a fresh one each epoch), epoch
            by epoch.
        collator: replaces the default collator (e.g. whole-word masking, or a broken one for a
            negative control); it takes ``[{"input_ids": [...]}, ...]`` and returns tensors.
        only_masked_logits: compute the output layer only where ``labels != -100``; set False
            for a model whose ``get_output_embeddings()`` is not applied once to all positions.
    """
    config = MaskedRunConfig.given(config, overrides)
    steps, lr, batch_size = config.steps, config.lr, config.batch_size
    mlm_probability, seed = config.mlm_probability, config.seed
    check_number(max_grad_norm, "max_grad_norm", low=0)
    vocab = check_masked_lm(model, tokenizer)
    rows = example_ids(tokenizer, examples, model)
    collate = collator or DataCollatorForLanguageModeling(
        tokenizer, mlm=True, mlm_probability=mlm_probability, seed=seed)
    optimizer = adamw(model, lr, embedding_lr=config.embedding_lr, betas=config.betas)
    device = model_device(model)
    order = seeded_batches(len(rows), batch_size, seed)
    selected: dict[str, torch.Tensor] = {}
    hook = None
    if only_masked_logits:
        # the output layer sees only the scored rows: (B, T, H) -> (M, H), so logits are (M, V)
        output_layer = cast(torch.nn.Module, model.get_output_embeddings())  # type: ignore[operator]
        hook = output_layer.register_forward_pre_hook(
            lambda _module, args: (args[0][selected["rows"]],))
    losses: list[float] = []
    model.train()
    try:
        for _ in range(steps):
            picked = next(order).tolist()
            batch = {k: v.to(device) for k, v in collate([{"input_ids": rows[i]} for i in picked]).items()}
            labels = batch.pop("labels")  # (B, T), -100 where not scored
            selected["rows"] = labels != -100
            if not bool(selected["rows"].any()):
                losses.append(math.nan)  # the collator scored no token in this batch: no step
                continue
            # lmcheck's own BERT, called directly: with the hook its logits are (M, V), which the
            # model-call layer (one row of logits per position) rightly refuses
            logits = model(**batch).logits  # (M, V) with the hook, else (B, T, V)
            targets = labels[selected["rows"]] if only_masked_logits else labels
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
            optimizer_step(model, loss, optimizer, max_grad_norm=max_grad_norm)
            losses.append(loss.item())
    finally:
        if hook is not None:
            hook.remove()
        model.eval()
    return losses


class MemorizationRun(NamedTuple):
    """What :func:`memorize_chunks` returns."""

    model: torch.nn.Module  # trained, in eval mode
    losses: list[float]  # training loss per step (NaN for a skipped batch, see train_masked_lm)
    train_texts: list[str]  # the training chunks, decoded: cloze cases on them test memory
    heldout_texts: list[str]  # as many held-out chunks, decoded: cloze cases on them stay hard


def memorize_chunks(
    tokenizer: PreTrainedTokenizerBase, train_documents: Any, heldout_documents: Any,
    config: MaskedRunConfig = MASKED_CPU, **overrides: Any,
) -> MemorizationRun:
    """Chapter 2's from-scratch run: a tiny BERT trained until it has memorized a few chunks.

    Cuts both document sets into ``config.context_length``-token chunks with
    :func:`~lmcheck.corpus.chunk_documents`, keeps the first ``config.chunks`` of each, and
    trains ``bert_from_scratch(preset=config.preset)`` on the training ones with
    :func:`train_masked_lm`. ``overrides`` change the recipe's fields, checked first.
    """
    config = MaskedRunConfig.given(config, overrides)

    def first_chunks(documents: Any) -> list[list[int]]:
        chunks = chunk_documents(tokenizer, documents, config.context_length).dataset
        return [list(ids) for ids in chunks.select(range(min(config.chunks, len(chunks))))["input_ids"]]

    train, heldout = first_chunks(train_documents), first_chunks(heldout_documents)
    model = bert_from_scratch(tokenizer, preset=config.preset, seed=config.seed,
                              hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout)
    losses = train_masked_lm(model, tokenizer, train, config)
    decode = partial(tokenizer.batch_decode, skip_special_tokens=True)
    return MemorizationRun(model, losses, decode(train), decode(heldout))
