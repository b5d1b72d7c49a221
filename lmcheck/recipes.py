"""The embedded default: the one place that names the data, split, tokenizer and recipes that
``lmcheck tutorial``, the test suite and the benchmarks all use, so that they never drift apart.

:data:`DEFAULTS` names the data; each recipe is a frozen, keyword-only dataclass whose presets
are complete instances (:data:`PRETRAIN_CPU`, :data:`PRETRAIN_CPU_QUICK`, :data:`PRETRAIN_GPU`,
:data:`MASKED_CPU`); :class:`SetupBudget` is how much of a user's training the setup checks run. A recipe checks every field when it is made, so a mistyped value or an
unknown name (``PRETRAIN_CPU.replace(lrr=1e-3)``) fails at once, naming itself, before any data
is read or any model built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from lmcheck._validate import (
    check_bool,
    check_fraction,
    check_int,
    check_number,
    check_seed,
    check_str,
    describe,
)
from lmcheck.errors import InputError

__all__ = ["DEFAULTS", "MASKED_CPU", "PRETRAIN_CPU", "PRETRAIN_CPU_QUICK", "PRETRAIN_GPU", "MaskedRunConfig",
           "PretrainConfig", "SetupBudget"]

R = TypeVar("R", bound="_Recipe")

DEFAULTS: MappingProxyType[str, Any] = MappingProxyType(
    {
        # chapter 1: the tutorial's two seed sentences
        "masked_sentence": "Life is like a [MASK] of chocolates.",
        "causal_prompt": "Swimming at the beach is",
        # chapter 3: prompts of different lengths (a batch of them needs left padding), the first
        # being causal_prompt, and SmolLM2-135M-Instruct's greedy 20-token continuation of it
        # (checked with generate, every generation_config override neutralised)
        "causal_prompts": ("Swimming at the beach is", "The capital of France is", "def fibonacci(n):",
                           "Once upon a time, in a small village near the mountains, there lived"),
        "smollm2_continuation": " a great way to unwind and enjoy the beautiful scenery.\n\nThe beach is a great place",
        # data: the Wikipedia sample from the offline assets, split as the tutorial does
        "documents": "wiki-sample",
        "n_train": 50,
        "n_valid": 50,
        "split_seed": 0,
        "context_length": 128,
        # tokenizers built offline from the assets
        "causal_tokenizer": "gpt2",
        "masked_tokenizer": "bert-base-uncased",
        # seeds for model initialisation and training order
        "seed": 42,
    }
)


class _Recipe:
    """``replace`` that names an unknown field instead of a bare TypeError."""

    @classmethod
    def given(cls: type[R], config: object, overrides: Mapping[str, Any]) -> R:
        """``config`` (which must be a recipe of this kind) with ``overrides``, all checked."""
        if not isinstance(config, cls):
            raise InputError(f"'config' must be a {cls.__name__} (got {describe(config)})")
        return config.replace(**overrides)

    def replace(self: R, **changes: Any) -> R:
        """A copy with ``changes``; InputError for a field the recipe does not have."""
        names = [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise InputError(f"{unknown[0]!r} is not a setting of {type(self).__name__}; the settings "
                             f"are {', '.join(names)}")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _preset(value: object) -> None:
    if not (isinstance(value, str) and value) and not isinstance(value, Mapping):
        raise InputError(f"'preset' must be a preset name or a mapping of model settings (got {value!r})")


def _every(value: object, argument: str) -> None:
    if value != "epoch":
        check_int(value, argument, 1)


def _optional_int(value: object, argument: str) -> None:
    if value is not None:
        check_int(value, argument, 1)


def _check_adamw(embedding_lr: object, betas: object) -> None:
    """The AdamW settings both recipes share: the tables' own rate (or None) and the betas."""
    if embedding_lr is not None:
        check_number(embedding_lr, "embedding_lr", low=0)
    if not (isinstance(betas, tuple) and len(betas) == 2):
        raise InputError(f"'betas' must be a pair (beta1, beta2) (got {describe(betas)})")
    for beta in betas:
        check_number(beta, "betas", low=0, high=0.9999)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(_Recipe):
    """A causal-LM pretraining recipe: the data, the model and the loop (chapter 4)."""

    # data: chunks of the split's training and validation documents
    context_length: int  # tokens per chunk
    chunks_per_document: int | None  # the first N chunks of each document; None: all
    n_train_chunks: int | None  # then the first N of those; None: all
    n_valid_chunks: int | None
    # model: a GPT-2 built from a preset of lmcheck.models.GPT2_PRESETS (or a mapping of settings)
    preset: str | Mapping[str, int]
    dropout: float | None  # every dropout of the model; None: the preset's own
    seed: int  # initialisation, data order and dropout
    # loop: AdamW (no weight decay), gradients clipped at 1.0
    backend: str  # "lean" (a plain loop) or "trainer" (Hugging Face's Trainer)
    lr: float
    embedding_lr: float | None  # the token and position tables' own rate; None: lr
    betas: tuple[float, float]  # AdamW's
    warmup: float  # share of the steps over which the rate rises linearly from 0
    decay: str  # then "constant", or "linear" down to 0 at the last step
    batch_size: int
    max_steps: int | None  # exactly one of max_steps and max_epochs
    max_epochs: int | None
    eval_every: int | str  # steps between validation losses, or "epoch": once per epoch
    memorization_every: int | str | None  # steps between memorization checks (stopping once every
    #   training chunk is memorized), "epoch", or None: never
    prefix_length: int  # memorization: this many tokens of a chunk ...
    continuation_length: int  # ... continue this many verbatim, greedily
    bf16: bool  # bf16 autocast (on a CPU only where it is fast: measure first)
    eval_batch_size: int

    def __post_init__(self) -> None:
        check_int(self.context_length, "context_length", 1)
        for name in ("chunks_per_document", "n_train_chunks", "n_valid_chunks", "max_steps", "max_epochs"):
            _optional_int(getattr(self, name), name)
        _every(self.eval_every, "eval_every")
        if self.memorization_every is not None:
            _every(self.memorization_every, "memorization_every")
        _preset(self.preset)
        if self.dropout is not None:
            check_fraction(self.dropout, "dropout")
        check_seed(self.seed)
        check_str(self.backend, "backend", choices=("lean", "trainer"))
        check_number(self.lr, "lr", low=0)
        _check_adamw(self.embedding_lr, self.betas)
        check_fraction(self.warmup, "warmup")
        check_str(self.decay, "decay", choices=("constant", "linear"))
        check_int(self.batch_size, "batch_size", 1)
        if (self.max_steps is None) == (self.max_epochs is None):
            raise InputError(f"exactly one of 'max_steps' and 'max_epochs' must be set (got "
                             f"max_steps={self.max_steps!r}, max_epochs={self.max_epochs!r})")
        check_int(self.prefix_length, "prefix_length", 1)
        check_int(self.continuation_length, "continuation_length", 1)
        check_bool(self.bf16, "bf16")
        check_int(self.eval_batch_size, "eval_batch_size", 1)

    def steps_for(self, train_chunks: int) -> int:
        """Optimizer steps for ``train_chunks`` chunks: ``max_steps``, or epochs times batches."""
        batches = -(-train_chunks // self.batch_size)
        return self.max_steps if self.max_steps is not None else self.max_epochs * batches  # type: ignore[operator]

    def every(self, setting: int | str | None, train_chunks: int) -> int | None:
        """``eval_every`` or ``memorization_every`` in steps: "epoch" is one epoch of batches."""
        return -(-train_chunks // self.batch_size) if setting == "epoch" else setting  # type: ignore[return-value]


# Chapter 4 on a CPU: a 2-layer, 160-wide GPT-2 (the full 50,257 vocabulary) memorizes the first
# chunk of each of the 49 training documents that have one, within 20 epochs. The embedding tables
# get their own rate (4e-2) because with one rate for every parameter the loss stalled; AdamW's
# betas are (0.8, 0.95), with a short warm-up and a linear decay over the 20 epochs. The sweep
# behind these settings is benchmarks/sweep_memorization.py. bf16 is off: on a CPU without
# AVX512-BF16 it is emulated, slower than fp32.
PRETRAIN_CPU = PretrainConfig(
    context_length=128, chunks_per_document=1, n_train_chunks=None, n_valid_chunks=16,
    preset="gpt2-mini-cpu", dropout=0.0, seed=42,
    backend="lean", lr=2e-3, embedding_lr=4e-2, betas=(0.8, 0.95), warmup=0.02, decay="linear",
    batch_size=4, max_steps=None, max_epochs=20, eval_every=26,
    memorization_every=1, prefix_length=32, continuation_length=32, bf16=False, eval_batch_size=32,
)
# The same recipe on the first 4 of those chunks (`lmcheck tutorial --quick` and the default test
# suite; the 49 chunks run under `pytest -m slow`): all 4 are memorized within its 20 steps (one
# batch an epoch).
PRETRAIN_CPU_QUICK = PRETRAIN_CPU.replace(n_train_chunks=4, n_valid_chunks=4)
# Chapter 4 as the tutorial runs it (pytest -m gpu): GPT-2 124M on every chunk of the 50 training
# documents, Trainer, bf16; at most 100 epochs as in the tutorial, evaluated and checked for
# memorization once per epoch.
PRETRAIN_GPU = PretrainConfig(
    context_length=128, chunks_per_document=None, n_train_chunks=None, n_valid_chunks=None,
    preset="gpt2", dropout=0.0, seed=42,
    backend="trainer", lr=3e-4, embedding_lr=None, betas=(0.9, 0.999), warmup=0.0, decay="constant",
    batch_size=32, max_steps=None, max_epochs=100, eval_every="epoch",
    memorization_every="epoch", prefix_length=32, continuation_length=32, bf16=True, eval_batch_size=64,
)


@dataclass(frozen=True, kw_only=True)
class MaskedRunConfig(_Recipe):
    """A masked-LM memorization run (chapter 2): data, model, loop and the cloze bars."""

    chunks: int  # the first N chunks of the training (and held-out) documents
    context_length: int  # tokens per chunk
    preset: str | Mapping[str, int]  # a preset of lmcheck.models.BERT_PRESETS
    dropout: float  # every dropout of the model
    seed: int
    steps: int  # AdamW steps (no weight decay, gradient norm clipped to 1.0)
    lr: float
    embedding_lr: float | None  # the embedding tables' own rate (the tied output layer's too); None: lr
    betas: tuple[float, float]  # AdamW's
    batch_size: int
    mlm_probability: float  # share of tokens the collator picks to score
    cases: int  # cloze cases on the training and on the held-out chunks
    case_seed: int
    memorized_min: float  # accuracy the training chunks' cases must reach
    heldout_max: float  # accuracy the held-out chunks' cases must stay at or below

    def __post_init__(self) -> None:
        for name in ("chunks", "context_length", "steps", "batch_size", "cases"):
            check_int(getattr(self, name), name, 1)
        _preset(self.preset)
        check_fraction(self.dropout, "dropout")
        check_seed(self.seed)
        check_seed(self.case_seed, "case_seed")
        check_number(self.lr, "lr", low=0)
        _check_adamw(self.embedding_lr, self.betas)
        for name in ("mlm_probability", "memorized_min", "heldout_max"):
            check_fraction(getattr(self, name), name)


# Chapter 2 on a CPU: a 2-layer, 128-wide BERT (the real uncased vocabulary) trained with the
# masked-LM collator on the first 8 chunks of 64 tokens. As in chapter 4, the embedding tables get
# their own rate and AdamW betas of (0.8, 0.95). Measured on a 2-core AVX-512 CPU, cloze cases
# filled of 40 after 150 steps: 40 at 2e-3 with 1e-2 for the tables, on one thread and on two;
# neighbours 1.5e-3 / 2e-2: 40 and 40; 2e-3 / 2e-2: 40 and 38; 3e-3 / 1e-2: 39; 2e-3 / 2e-2 over
# 120 steps: 37. One rate of 3e-3 with betas (0.9, 0.999), the recipe before, needed 300 steps for
# 39 (200 steps: 36; any rate of 5e-3 or more stalled near a loss of 5). 150 steps take about 6 s
# on two threads.
MASKED_CPU = MaskedRunConfig(
    chunks=8, context_length=64, preset="bert-tiny-cpu", dropout=0.0, seed=42, steps=150, lr=2e-3,
    embedding_lr=1e-2, betas=(0.8, 0.95), batch_size=8, mlm_probability=0.15, cases=40, case_seed=0,
    memorized_min=0.9, heldout_max=0.2,
)


# ---------------------------------------------------------------- the setup checks' budget


@dataclass(frozen=True)
class SetupBudget:
    """How much of the user's training the setup checks run; checked when made.

    Attributes:
        steps: optimizer steps of the first run (gradients, accumulation, schedule).
        overfit_batches: how many micro-batches the overfitting run cycles through.
        overfit_steps: the overfitting run's budget in optimizer steps (doubled for a run whose
            loss still falls fast at the budget).
        check_every: optimizer steps between memorization checks while overfitting.
    """

    steps: int = 8
    overfit_batches: int = 4
    overfit_steps: int = 200
    check_every: int = 5

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", 1, 10_000)
        check_int(self.overfit_batches, "overfit_batches", 1, 64)
        check_int(self.overfit_steps, "overfit_steps", 1)
        check_int(self.check_every, "check_every", 1)

    @classmethod
    def of(cls, **values: int | None) -> SetupBudget:
        """The budget with the given fields, the defaults where a value is None."""
        return cls(**{name: value for name, value in values.items() if value is not None})
