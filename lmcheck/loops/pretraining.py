"""Pretraining loops that record a :class:`~lmcheck.curves.LossCurve`: Hugging Face's
``Trainer`` (the tutorial's path) and a lean PyTorch loop (the same optimisation, less overhead).

Both train on chunks from :func:`pretraining_data`, log the training loss every step and the
validation loss every ``eval_every`` steps, stop at the first non-finite loss (naming the step),
and can stop as soon as every training chunk is memorized. :func:`pretrain_default` runs a recipe
(:class:`~lmcheck.recipes.PretrainConfig`): the embedded CPU default, the GPU test's full
tutorial configuration, or any variation of either.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import datasets
import torch
from transformers import (
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback

from lmcheck._model import eval_mode, has_dropout, loss_and_logits, loss_of, mean_loss, model_device
from lmcheck._validate import check_int, check_tokenizer, describe
from lmcheck.corpus import ChunkStats, chunk_documents, load_documents, split_documents
from lmcheck.curves import LossCurve
from lmcheck.errors import InputError, ModelError
from lmcheck.golden import GOLDEN_STEPS
from lmcheck.loops._fused_loss import linear_cross_entropy
from lmcheck.loops._step import adamw, optimizer_step, seeded_batches, warmup_then_decay
from lmcheck.models import gpt2_from_scratch, parameter_count
from lmcheck.recipes import DEFAULTS, PRETRAIN_CPU, PretrainConfig
from lmcheck.tokens import load_tokenizer
from lmcheck.training import causal_batch, check_memorization_lengths, verbatim_rows

_log = logging.getLogger(__name__)  # progress, one line per memorization check (INFO)

__all__ = [
    "LossCurveCallback",
    "PretrainRun",
    "PretrainingData",
    "StopAtMemorization",
    "causal_lm_collator",
    "check_model_fits",
    "default_recipe_curve",
    "pretrain",
    "pretrain_default",
    "pretraining_data",
    "recipe_data",
]

Collator = Callable[[list[dict[str, Any]]], Mapping[str, torch.Tensor]]
Fused = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (batch, predict=None) -> loss, argmax


@dataclass(frozen=True)
class PretrainingData:
    """Training and validation chunks, and how they were chosen."""

    train: datasets.Dataset  # columns: input_ids (context_length each), document
    valid: datasets.Dataset
    split: datasets.DatasetDict  # the documents (train, validation) the chunks come from
    train_stats: ChunkStats  # chunking of all training documents, before the subset
    valid_stats: ChunkStats
    description: str  # which training chunks, in words


def pretraining_data(
    tokenizer: PreTrainedTokenizerBase, documents: datasets.Dataset | None = None, *,
    n_train: int = 50, n_valid: int = 50, split_seed: int = 0, context_length: int = 128,
    chunks_per_document: int | None = None, n_train_chunks: int | None = None,
    n_valid_chunks: int | None = None,
) -> PretrainingData:
    """Split documents (seeded), chunk both parts, and keep a fixed subset of the chunks.

    Args:
        documents: a dataset with a ``text`` column (default: the wiki sample).
        chunks_per_document: keep only each training document's first this-many chunks (None: all).
        n_train_chunks: then keep the first this-many training chunks (None: all).
        n_valid_chunks: keep the first this-many validation chunks (None: all).

    Raises:
        InputError: fewer documents than the split asks for, or no chunk at all after chunking.
    """
    documents = load_documents(DEFAULTS["documents"]) if documents is None else documents
    split = split_documents(documents, n_train=n_train, n_valid=n_valid, seed=split_seed)
    parts: dict[str, tuple[datasets.Dataset, ChunkStats]] = {}
    for name, part in split.items():
        chunks, stats = chunk_documents(tokenizer, part, context_length)
        if stats.chunks == 0:
            raise InputError(
                f"'context_length' {context_length} gives 0 chunks from the {stats.documents} "
                f"{name} documents: every one is shorter than that ({stats.tokens_total:,} tokens "
                f"in all); use a smaller context_length or longer documents")
        parts[name] = (chunks, stats)
    train, train_stats = parts["train"]
    valid, valid_stats = parts["validation"]
    words = f"all chunks of the {n_train} training documents"
    if chunks_per_document is not None:
        seen: dict[int, int] = {}
        keep = []
        for index, document in enumerate(train["document"]):
            seen[document] = seen.get(document, 0) + 1
            if seen[document] <= chunks_per_document:
                keep.append(index)
        train = train.select(keep)
        first = "the first chunk" if chunks_per_document == 1 else f"the first {chunks_per_document} chunks"
        words = f"{first} of each training document"
    if n_train_chunks is not None and n_train_chunks < len(train):
        train = train.select(range(n_train_chunks))
        words = f"the first {n_train_chunks} of {words}"
        if chunks_per_document == 1:
            words = f"the first chunk of each of the first {n_train_chunks} training documents"
    if n_valid_chunks is not None and n_valid_chunks < len(valid):
        valid = valid.select(range(n_valid_chunks))
    description = (f"{words}: {len(train)} chunks of "
                   f"{context_length} tokens; validation: {len(valid)} chunks of the {n_valid} "
                   f"validation documents")
    return PretrainingData(train, valid, split, train_stats, valid_stats, description)


def check_model_fits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, context_length: int) -> None:
    """Raise ModelError if the model's vocabulary or positions do not fit the tokenizer and context."""
    check_tokenizer(tokenizer)
    check_int(context_length, "context_length", 1)
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError(f"'model' must be a Hugging Face PreTrainedModel with a config (got {describe(model)})")
    vocab = getattr(config, "vocab_size", None)
    if vocab != len(tokenizer):
        raise ModelError(
            f"'model' has a vocabulary of {vocab} but 'tokenizer' {tokenizer.name_or_path!r} has "
            f"{len(tokenizer)} tokens; build the model from the tokenizer "
            f"(gpt2_from_scratch(tokenizer)) so every id has an embedding row and ln(V) is right")
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if positions is not None and context_length > positions:
        raise ModelError(
            f"'context_length' {context_length} is above the model's {positions} positions; "
            f"use a context of at most {positions} or a model with more positions")


def causal_lm_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForLanguageModeling:
    """The collator :func:`pretrain` uses by default: ``DataCollatorForLanguageModeling(mlm=False)``.

    Labels are the inputs (the model shifts them), padding is labelled -100. A tokenizer without
    a pad token (GPT-2) gets a copy whose pad token is its eos token; ``tokenizer`` is unchanged.
    """
    check_tokenizer(tokenizer)
    return DataCollatorForLanguageModeling(_with_pad_token(tokenizer), mlm=False)


def _with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:  # GPT-2 has none; the collator needs one (pad = eos)
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pretrain(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: datasets.Dataset,
    valid: datasets.Dataset, config: PretrainConfig = PRETRAIN_CPU, *, collator: Collator | None = None,
    check_batch: bool = True, first_steps: int | None = None, **overrides: Any,
) -> LossCurve:
    """Train ``model`` on ``train`` chunks and record a LossCurve; the model is trained in place.

    The loop's settings come from ``config`` (default :data:`~lmcheck.recipes.PRETRAIN_CPU`)
    with ``overrides`` applied (``pretrain(..., lr=1e-3)``), all checked before any work; the
    data and model fields of the config are the caller's business here (see :func:`pretrain_default`).

    Args:
        config: ``backend`` is ``"trainer"`` (Hugging Face Trainer) or ``"lean"`` (a plain loop);
            both use the same AdamW (weight decay 0, the embedding tables at ``embedding_lr``),
            learning-rate schedule, gradient clipping at 1.0, ``collator`` (default
            :func:`causal_lm_collator`), seed and loss: the fused linear cross-entropy where it
            equals the model's own on the first batch (fp32 only), else the model's own. Every
            ``memorization_every`` steps, training stops if every training chunk is memorized
            (``prefix_length`` tokens continue ``continuation_length`` tokens verbatim).
        check_batch: refuse a first batch that fails :func:`~lmcheck.training.causal_batch`
            (a masked-LM collator, labels not the inputs, a mask that shows the future).
        first_steps: train only the recipe's first this-many steps, its schedule unchanged (the
            golden losses are the first 10 steps of the full recipe); None: the whole recipe.

    Raises:
        InputError: an unknown or mistyped setting, empty ``train`` or ``valid``, a prefix plus
            continuation longer than the chunks, or a first batch unfit for causal-LM training.
        ModelError: model and tokenizer vocabularies differ; chunks longer than the model's positions.
    """
    config = PretrainConfig.given(config, overrides)
    for argument, chunks in (("train", train), ("valid", valid)):
        if not isinstance(chunks, datasets.Dataset) or "input_ids" not in chunks.column_names or not len(chunks):
            raise InputError(f"'{argument}' must be a non-empty datasets.Dataset of chunks with an "
                             f"'input_ids' column, as pretraining_data makes (got {describe(chunks)})")
    context_length = len(train[0]["input_ids"])
    max_steps = config.steps_for(len(train))
    if first_steps is not None:
        check_int(first_steps, "first_steps", 1)
    eval_every = cast(int, config.every(config.eval_every, len(train)))
    memorization_every = config.every(config.memorization_every, len(train))
    if memorization_every is not None:
        check_memorization_lengths(config.prefix_length, config.continuation_length, context_length)
    check_model_fits(model, tokenizer, context_length)
    if getattr(model, "loss_type", "") is None and not getattr(model.config, "is_encoder_decoder", False):
        # GPT2LMHeadModel's class name maps to no loss type, so the Trainer counts tokens over the
        # unshifted labels and reports (and optimises) the loss times (T-1)/T (transformers 5.24);
        # naming the type makes it count the T-1 real targets, so both loops record the same loss.
        model.loss_type = "ForCausalLM"
    backend, lr, batch_size, bf16, seed = config.backend, config.lr, config.batch_size, config.bf16, config.seed
    prefix_length, continuation_length = config.prefix_length, config.continuation_length
    tokenizer = _with_pad_token(tokenizer)
    collator = collator or causal_lm_collator(tokenizer)
    first = collator([{"input_ids": row} for row in train[:batch_size]["input_ids"]])
    if check_batch and not (verdict := causal_batch(first)):
        raise InputError(f"'collator' makes batches unfit for causal-LM training: {verdict.explanation}")
    curve = LossCurve(metadata={
        "backend": backend, "lr": lr, "embedding_lr": config.embedding_lr, "betas": list(config.betas),
        "warmup": config.warmup, "decay": config.decay, "batch_size": batch_size, "max_steps": max_steps, "bf16": bf16,
        "seed": seed, "context_length": context_length, "train_chunks": len(train),
        "valid_chunks": len(valid), "parameters": parameter_count(model),
        "memorization": [prefix_length, continuation_length]})
    train_ids = torch.tensor(train["input_ids"])  # (N, T)
    valid_ids = torch.tensor(valid["input_ids"])  # (M, T)
    stop = StopAtMemorization(curve, train_ids, every=memorization_every, prefix_length=prefix_length,
                              continuation_length=continuation_length)
    set_seed(seed)
    started = time.perf_counter()
    # under bf16 autocast the model keeps its own loss: the fused loss keeps its logits in fp32
    fused = None if bf16 else fused_causal_loss(model, {k: v.to(model_device(model)) for k, v in first.items()})
    curve.metadata["loss"] = "fused linear cross-entropy" if fused else "the model's own"
    optimizer = adamw(model, lr, embedding_lr=config.embedding_lr, betas=config.betas)
    schedule = warmup_then_decay(optimizer, total_steps=max_steps, decay=config.decay,
                                 warmup_steps=round(config.warmup * max_steps))
    steps = max_steps if first_steps is None else min(first_steps, max_steps)
    if backend == "trainer":
        _train_with_trainer(model, tokenizer, train, valid, curve, stop, collator, config,
                            (optimizer, schedule), fused, max_steps=steps, eval_every=eval_every)
    else:
        _train_lean(model, train_ids, valid_ids, curve, stop, collator, config, (optimizer, schedule),
                    fused, max_steps=steps, eval_every=eval_every)
    curve.stop_reason = curve.stop_reason or ("non-finite loss" if curve.non_finite_step else "max_steps")
    train_seconds = curve.metadata.pop("_train_seconds", 0.0)
    tokens = curve.steps * batch_size * context_length
    curve.metadata["memorization_s"] = stop.seconds
    curve.metadata.update(wall_s=time.perf_counter() - started, train_s=train_seconds,
                          train_tokens=tokens, tokens_per_s=tokens / train_seconds if train_seconds else None,
                          device=str(model_device(model)))
    return curve


class LossCurveCallback(TrainerCallback):
    """Records the Trainer's per-step loss and each evaluation's loss into a LossCurve.

    Needs ``logging_steps=1`` and ``logging_nan_inf_filter=False`` (else NaN steps are hidden).
    Stops training at the first non-finite loss.
    """

    def __init__(self, curve: LossCurve) -> None:
        self.curve = curve
        self._began = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _synchronize()
        self._began = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _synchronize()
        seconds = self.curve.metadata.get("_train_seconds", 0.0)
        self.curve.metadata["_train_seconds"] = seconds + time.perf_counter() - self._began

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs and not self.curve.record_train(state.global_step, logs["loss"]):
            self.curve.stop_reason = "non-finite loss"
            control.should_training_stop = True

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        if metrics and "eval_loss" in metrics:
            self.curve.record_valid(state.global_step, metrics["eval_loss"])


class StopAtMemorization(TrainerCallback):
    """Stops training once every training chunk continues verbatim (checked every ``every`` steps).

    The check is teacher-forced (:func:`~lmcheck.training.verbatim_rows`): one forward pass over
    the chunks' first ``prefix_length + continuation_length`` tokens. Where the loop passes each
    training step's own argmax to :meth:`screen` (the lean loop, dropout off), a check runs only
    once every chunk was predicted verbatim at its last training step; a chunk the check then
    finds not memorized waits for its next step. The checks' time is kept in ``seconds``.
    """

    def __init__(self, curve: LossCurve, train_ids: torch.Tensor, *, every: int | None,
                 prefix_length: int, continuation_length: int) -> None:
        self.curve, self.train_ids, self.every = curve, train_ids, every
        self.prefix_length, self.continuation_length = prefix_length, continuation_length
        self.screened: torch.Tensor | None = None  # per chunk: verbatim at its last training step
        self.seconds = 0.0

    def positions(self, length: int) -> torch.Tensor:
        """(length - 1,) bools: the positions of a chunk of ``length`` tokens whose argmax the
        screen reads (those that predict the continuation)."""
        wanted = torch.zeros(length - 1, dtype=torch.bool)
        wanted[self.prefix_length - 1:self.prefix_length + self.continuation_length - 1] = True
        return wanted

    def screen(self, rows: torch.Tensor, input_ids: torch.Tensor, predicted: torch.Tensor) -> None:
        """Note which of the chunks ``rows`` (ids ``input_ids``, (B, T)) a training step predicted
        verbatim: ``predicted`` (B, T - 1) is that step's argmax at every position."""
        began = time.perf_counter()
        if self.screened is None:
            self.screened = torch.zeros(len(self.train_ids), dtype=torch.bool)
        start, end = self.prefix_length, self.prefix_length + self.continuation_length
        hits = (predicted[:, start - 1:end - 1] == input_ids[:, start:end]).all(dim=1)
        self.screened[rows] = hits.cpu()
        self.seconds += time.perf_counter() - began

    def memorized(self, model: torch.nn.Module, step: int) -> bool:
        if not self.every or step % self.every or self.curve.non_finite_step is not None:
            return False
        if self.screened is not None and not bool(self.screened.all()):
            self.curve.metadata.setdefault("screened_fraction", []).append(
                [step, float(self.screened.float().mean())])
            return False
        began = time.perf_counter()
        rows = verbatim_rows(model, self.train_ids, prefix_length=self.prefix_length,
                             continuation_length=self.continuation_length)
        self.seconds += time.perf_counter() - began
        if self.screened is not None:
            self.screened &= rows
        fraction = float(rows.float().mean())
        self.curve.metadata.setdefault("memorized_fraction", []).append([step, fraction])
        _log.info("step %d: %.1f%% of %d training chunks memorized, training loss %.4f", step,
                  100 * fraction, len(self.train_ids), self.curve.train[-1][1] if self.curve.train else float("nan"))
        if fraction >= 1.0:
            self.curve.stop_reason = "memorized"
            return True
        return False

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and self.memorized(model, state.global_step):
            control.should_training_stop = True


Optimization = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]


class _FusedLossTrainer(Trainer):
    """A Trainer whose training loss is ``fused`` (the lean loop's fused linear cross-entropy,
    already checked against the model's own loss) while it trains the unwrapped model; the
    evaluation, and a model the Trainer has wrapped, keep the model's own loss."""

    fused: Fused | None = None

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.fused is not None and model is self.model and model.training and not return_outputs:
            nothing = torch.zeros(inputs["input_ids"].shape[1] - 1, dtype=torch.bool)  # no argmax is read
            return self.fused(inputs, nothing)[0]
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def _train_with_trainer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: datasets.Dataset,
    valid: datasets.Dataset, curve: LossCurve, stop: StopAtMemorization, collator: Collator,
    config: PretrainConfig, optimization: Optimization, fused: Fused | None, *, max_steps: int,
    eval_every: int,
) -> None:
    with tempfile.TemporaryDirectory(prefix="lmcheck-trainer-") as output_dir:
        arguments = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.eval_batch_size, learning_rate=config.lr,
            max_steps=max_steps, max_grad_norm=1.0,
            logging_steps=1, logging_nan_inf_filter=False, eval_strategy="steps",
            eval_steps=eval_every, save_strategy="no", report_to="none", bf16=config.bf16,
            seed=config.seed, data_seed=config.seed, disable_tqdm=True, log_level="error",
            dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        )
        trainer = _FusedLossTrainer(  # the lean loop's optimizer, schedule and loss: both optimise alike
            model=model, args=arguments, train_dataset=train.select_columns(["input_ids"]),
            eval_dataset=valid.select_columns(["input_ids"]), data_collator=collator,  # type: ignore[arg-type]
            processing_class=tokenizer, callbacks=[LossCurveCallback(curve), stop],
            optimizers=optimization,
        )
        trainer.fused = fused
        trainer.remove_callback(PrinterCallback)  # the curve is the record; nothing is printed
        trainer.train()
        if curve.non_finite_step is None and (not curve.valid or curve.valid[-1][0] != curve.steps):
            trainer.evaluate()  # the final point of the validation curve


def _train_lean(
    model: PreTrainedModel, train_ids: torch.Tensor, valid_ids: torch.Tensor, curve: LossCurve,
    stop: StopAtMemorization, collator: Collator, config: PretrainConfig, optimization: Optimization,
    fused: Fused | None, *, max_steps: int, eval_every: int,
) -> None:
    device = model_device(model)  # the model trains where its owner put it
    model.train()
    optimizer, schedule = optimization
    bf16, eval_batch_size = config.bf16, config.eval_batch_size
    order = seeded_batches(len(train_ids), config.batch_size, config.seed)
    # the steps' argmax screens the checks; with dropout it is not the eval argmax
    screen = stop.every is not None and not has_dropout(model)
    length = train_ids.shape[1]  # the argmax only where the screen reads it
    wanted = stop.positions(length) if screen else torch.zeros(length - 1, dtype=torch.bool)
    seconds = 0.0
    for step in range(1, max_steps + 1):
        rows = next(order)
        batch = collator([{"input_ids": row.tolist()} for row in train_ids[rows]])
        batch = {k: v.to(device) for k, v in batch.items()}
        _synchronize()
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if fused is None:
                loss, predicted = _loss_and_argmax(model, batch, wanted)
            else:
                loss, predicted = fused(batch, wanted)
        if not curve.record_train(step, loss.item()):
            curve.stop_reason = "non-finite loss"  # stop before the NaN reaches the weights
            break
        optimizer_step(model, loss, optimizer)
        schedule.step()
        _synchronize()
        seconds += time.perf_counter() - began
        if screen and predicted is not None:
            stop.screen(rows, batch["input_ids"], predicted)
        memorized = stop.memorized(model, step)
        if step % eval_every == 0 or memorized or step == max_steps:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                curve.record_valid(step, _validation_loss(model, valid_ids, collator, eval_batch_size, fused))
        if memorized:
            break
    curve.metadata["_train_seconds"] = seconds


def _loss_and_argmax(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], wanted: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's loss of ``batch`` (:func:`loss_of`) and, from the same call's logits, the
    (B, T - 1) argmax at the ``wanted`` (T - 1,) positions, -1 elsewhere; None where the call
    gives no logits (a loss function given to ``adapt``). Under bf16 the argmax is the bf16
    logits': it only opens the full check, which decides."""
    loss, logits = loss_and_logits(model, batch)
    if logits is None or not bool(wanted.any()):
        return loss, None
    if logits.dim() != 3 or logits.shape[1] != batch["input_ids"].shape[1]:
        return loss, None  # not one row of logits per position
    shifted = logits.detach()[:, :-1]
    columns = wanted.to(shifted.device).nonzero().squeeze(1)
    predicted = torch.full(shifted.shape[:2], -1, dtype=torch.long, device=shifted.device)
    predicted[:, columns] = shifted[:, columns].argmax(dim=-1)
    return loss, predicted


def fused_causal_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], *,
                      rtol: float = 1e-4) -> Fused | None:
    """The model's causal-LM loss through :func:`linear_cross_entropy`, or None where that is not
    the model's own loss.

    It applies to a Hugging Face causal LM whose logits are its output layer (a bias-free
    ``nn.Linear``) over its base model's last hidden states. It is checked once, on ``batch``: the fused loss must equal
    the model's own loss within ``rtol``, or the model keeps its own (a softcap, a logit scale,
    a loss of its own all fall back this way).
    """
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    base = getattr(model, "base_model", None)
    if (not isinstance(head, torch.nn.Linear) or head.bias is not None or base is None or base is model
            or "labels" not in batch):
        return None

    def fused(batch: Mapping[str, torch.Tensor], predict: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of ``batch`` and the (B, T - 1) argmax of every row at the positions where
        ``predict`` (T - 1,) is True (None: all)."""
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)[0]
        rows, length, width = hidden.shape
        loss, predicted = linear_cross_entropy(
            hidden[:, :-1].reshape(-1, width), head.weight, batch["labels"][:, 1:].reshape(-1),
            predict=None if predict is None else predict.to(hidden.device).repeat(rows))
        return loss, predicted.view(rows, length - 1)

    with torch.no_grad(), eval_mode(model):  # eval: dropout would make the two differ
        own = loss_of(model, batch).float()
        ours = fused(batch)[0]
    if not torch.isfinite(own) or not torch.isclose(ours, own, rtol=rtol, atol=0.0):
        return None
    return fused


def _validation_loss(model: torch.nn.Module, valid_ids: torch.Tensor, collator: Collator, batch_size: int,
                     fused: Fused | None = None) -> float:
    """Mean loss over validation chunks, batched by the training collator as the Trainer does
    (through ``fused`` where the loop trains with it: the same loss without the full logits)."""
    nothing = torch.zeros(valid_ids.shape[1] - 1, dtype=torch.bool)  # no argmax wanted
    batches = (collator([{"input_ids": row.tolist()} for row in part]) for part in valid_ids.split(batch_size))
    return mean_loss(model, batches, loss=(lambda batch: fused(batch, nothing)[0]) if fused is not None
                     else (lambda batch: loss_of(model, batch)))


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # device work must finish before a clock is read


@dataclass
class PretrainRun:
    """What :func:`pretrain_default` made: the trained model, its tokenizer, data and curve, and
    the recipe it ran."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    data: PretrainingData
    curve: LossCurve
    config: PretrainConfig


def recipe_data(config: PretrainConfig, tokenizer: PreTrainedTokenizerBase,
                documents: datasets.Dataset | None = None) -> PretrainingData:
    """The chunks a recipe trains and validates on: the embedded default's split of ``documents``
    (default the wiki sample), cut and chosen as ``config`` says; :func:`pretrain_default`'s data."""
    config = PretrainConfig.given(config, {})  # a recipe, or the same error pretrain_default gives
    return pretraining_data(
        tokenizer, documents, n_train=DEFAULTS["n_train"], n_valid=DEFAULTS["n_valid"],
        split_seed=DEFAULTS["split_seed"], context_length=config.context_length,
        chunks_per_document=config.chunks_per_document, n_train_chunks=config.n_train_chunks,
        n_valid_chunks=config.n_valid_chunks)


def pretrain_default(
    config: PretrainConfig = PRETRAIN_CPU, *, tokenizer: PreTrainedTokenizerBase | None = None,
    documents: datasets.Dataset | None = None, model: PreTrainedModel | None = None,
    collator: Collator | None = None, check_batch: bool = True, first_steps: int | None = None,
    **overrides: Any,
) -> PretrainRun:
    """Run a recipe end to end: the data, the model and :func:`pretrain`.

    ``config`` is the recipe (default :data:`~lmcheck.recipes.PRETRAIN_CPU`, chapter 4's CPU
    default; :data:`~lmcheck.recipes.PRETRAIN_GPU` is the tutorial's own); ``overrides`` change
    its fields (``pretrain_default(lr=1e-3, max_steps=20)``) and are checked before the documents
    are read. ``documents`` replaces the wiki sample, ``tokenizer`` the GPT-2 tokenizer, ``model``
    the model built from the recipe's ``preset``.
    """
    config = PretrainConfig.given(config, overrides)
    tokenizer = tokenizer or load_tokenizer(DEFAULTS["causal_tokenizer"])
    data = recipe_data(config, tokenizer, documents)
    if model is None:  # the recipe's own model, on the fastest device
        dropout: dict[str, Any] = {} if config.dropout is None else dict(
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout)
        model = gpt2_from_scratch(tokenizer, preset=config.preset, seed=config.seed, **dropout)
        torch.nn.Module.to(model, "cuda" if torch.cuda.is_available() else "cpu")
    curve = pretrain(model, tokenizer, data.train, data.valid, config, collator=collator, check_batch=check_batch,
                     first_steps=first_steps)
    preset = config.preset if isinstance(config.preset, str) else dict(config.preset)  # JSON-ready
    curve.metadata.update(preset=preset, data=data.description)
    return PretrainRun(model, tokenizer, data, curve, config)


def default_recipe_curve(steps: int = GOLDEN_STEPS) -> LossCurve:
    """The recipe the shipped golden file records: chapter 4's CPU default, first ``steps`` steps
    (compared with :func:`~lmcheck.golden.matches_golden`)."""
    check_int(steps, "steps", 1)
    return pretrain_default(first_steps=steps, eval_every=steps, memorization_every=None, n_valid_chunks=1).curve
