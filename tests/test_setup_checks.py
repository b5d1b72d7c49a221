"""Negative controls of the setup checks (``lmcheck.setup``).

Each test below puts one documented training-setup bug into a tiny GPT-2 on the CPU, through a
plain loop or a ``transformers.Trainer`` (both where that is cheap), and asserts that the check
meant for it fails, with an explanation that names the bug and its source. A check that no
test can make fail proves nothing, so each bug's test is also its check's negative control;
the healthy setups at the top are the positive controls: they pass everything.

The setups come from ``tests/setups.py``: a 40-word tokenizer, a GPT-2 of a few thousand
parameters, 16 examples of 4 to 14 words ending with eos, a healthy plain loop (``setups.Loop``:
accumulation over 2 micro-batches, clipping, AdamW, a warmup) and a healthy Trainer. A test
changes one thing in them. Where the overfitting run is not the subject, its budget is cut to
a few steps (``overfit_steps=5``, so ``overfits`` then fails: that is not what is asserted).
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
)

from lmcheck.errors import InputError, ModelError
from lmcheck.results import Result
from lmcheck.setup import SETUP_CHECKS, SetupReport, check_loop, check_trainer
from tests import setups

ONLY_SOME = setups.ONLY_SOME
SHORT = {"overfit_steps": 5}  # where the overfitting run is not the subject


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return setups.tokenizer()


# ---------------------------------------------------------------- helpers


def plain(tok: PreTrainedTokenizerFast, *, fault: str | None = None, net: torch.nn.Module | None = None,
          batches: Any = None, clip: float | None = 1.0, **options: Any) -> SetupReport:
    """check_loop on ``setups.Loop`` (with ``fault``) over ``batches`` (default: the healthy
    loader), telling lmcheck the loop's scheduler and clipping norm (0: it does not clip)."""
    net = net if net is not None else setups.model(tok)
    loop = setups.Loop(net, fault=fault, max_grad_norm=clip)
    settings: dict[str, Any] = {"tokenizer": tok, "scheduler": loop.scheduler,
                                "max_grad_norm": clip if clip is not None else 0.0, **SHORT}
    settings.update(options)
    return check_loop(net, loop.step, batches if batches is not None else setups.loader(tok), **settings)


def trained_by_trainer(tok: PreTrainedTokenizerFast, folder: Path, **options: Any) -> SetupReport:
    """check_trainer on ``setups.trainer`` built with ``options``."""
    return check_trainer(setups.trainer(tok, str(folder), **options), **SHORT)


def setup_with(driver: str, tok: PreTrainedTokenizerFast, folder: Path, *, data: list[Any] | None = None,
               collate: Callable[[Any], Any] | None = None) -> SetupReport:
    """The healthy plain loop or Trainer over other examples or another collator."""
    if driver == "trainer":
        return trained_by_trainer(tok, folder, data=data, collate=collate)
    return plain(tok, batches=setups.loader(tok, data=data, collate=collate))


def fails(report: SetupReport, check: str, *phrases: str) -> None:
    """``check`` failed, the report did not pass, and the explanation holds every phrase."""
    result = report[check]
    assert result.status == "fail", f"{check} should fail: {result}"
    for phrase in phrases:
        assert phrase in result.explanation, f"{phrase!r} not in the explanation: {result.explanation}"
    assert not report.passed


def passes(report: SetupReport, check: str) -> None:
    result = report[check]
    assert result.status == "pass", f"{check} should pass: {result}"


def same(a: Any, b: Any) -> bool:
    """Deep equality of nested dicts, lists and tensors (an optimizer's state_dict)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def rebuild_plain(tok: PreTrainedTokenizerFast) -> Callable[[int], Any]:
    """A healthy rebuild(seed): the seed reaches the initialisation and the data order."""
    def rebuild(seed: int) -> Any:
        net = setups.model(tok, seed=seed)
        return net, setups.Loop(net).step, setups.loader(tok, seed=seed)
    return rebuild


# ---------------------------------------------------------------- the positive controls


def test_healthy_plain_loop_passes_every_check(tok):
    """The healthy loop (accumulation by the step's token count, clipping, a warmup stepped once
    per optimizer step, a reshuffling loader, a seeded rebuild) passes every check, the
    overfitting run included, within its default budget; it has no checkpoint functions, so
    ``resume`` is not applicable (a loop that has them: ``test_resume.py``)."""
    net = setups.model(tok)
    loop = setups.Loop(net)
    report = check_loop(net, loop.step, setups.loader(tok), tokenizer=tok, scheduler=loop.scheduler,
                        max_grad_norm=1.0, rebuild=rebuild_plain(tok))
    assert [r.name for r in report.results] == list(SETUP_CHECKS)
    assert {r.name: r.status for r in report.results} == {**dict.fromkeys(SETUP_CHECKS, "pass"), "resume": "n/a",
                                                          **ONLY_SOME}  # padded rows, not packed
    assert report.passed
    assert report.curve.stop_reason == "memorized"


def test_healthy_plain_loop_without_rebuild_is_not_applicable_for_reproducibility(tok):
    """Without ``rebuild`` the setup cannot be built with another seed: ``reproducible`` is
    n/a (not a pass, not a fail), as ``resume`` is without checkpoint functions; the other
    checks still pass."""
    report = plain(tok, overfit_steps=200)
    statuses = {r.name: r.status for r in report.results}
    assert statuses.pop("reproducible") == statuses.pop("resume") == "n/a"
    assert {name: statuses.pop(name) for name in ONLY_SOME} == ONLY_SOME
    assert set(statuses.values()) == {"pass"}
    assert report.passed


def test_healthy_trainer_passes_every_check(tok, tmp_path):
    """The healthy Trainer passes every check. Without ``rebuild``, ``reproducible`` reruns the
    Trainer with ``args.seed`` changed (the data order and dropout follow the seed), and
    ``resume``, which needs a Trainer built afresh, is not applicable."""
    report = check_trainer(setups.trainer(tok, str(tmp_path)))
    assert {r.name: r.status for r in report.results} == {**dict.fromkeys(SETUP_CHECKS, "pass"), "resume": "n/a",
                                                          **ONLY_SOME}
    assert report.setup["micro-batches per optimizer step"] == 2
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- the user's objects are left alone


def test_check_loop_leaves_the_users_objects_as_they_were(tok):
    """The runs train the user's own model with their own optimizer and scheduler; afterwards
    the weights, the ``.grad`` fields, the optimizer's and scheduler's state, the train/eval
    mode, the random generator and the batches are as they were before."""
    net = setups.model(tok)
    loop = setups.Loop(net)
    batches = setups.loader(tok)
    first = list(batches)
    for batch in first[:2]:  # one optimizer step: the optimizer has state, the scheduler moved
        loop.step(batch)
    net(**first[2]).loss.backward()  # and .grad holds something
    net.eval()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    optimizer_state = copy.deepcopy(loop.optimizer.state_dict())
    last_epoch, last_lr = loop.scheduler.last_epoch, loop.scheduler.get_last_lr()
    rng = torch.get_rng_state()
    ids = [b["input_ids"].clone() for b in first]

    check_loop(net, loop.step, first, tokenizer=tok, scheduler=loop.scheduler, max_grad_norm=1.0, **SHORT)

    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(grads[n], p.grad) for n, p in net.named_parameters())
    assert same(optimizer_state, loop.optimizer.state_dict())
    assert (loop.scheduler.last_epoch, loop.scheduler.get_last_lr()) == (last_epoch, last_lr)
    assert not net.training
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(ids, first, strict=True))


def test_check_trainer_leaves_the_trainer_as_it_was(tok, tmp_path):
    """The Trainer's own train() runs into a temporary folder: afterwards the model's weights,
    the Trainer's optimizer and scheduler (None before: made by train()), its arguments (the same
    object, unchanged), its state and callbacks are as before, and its output_dir is empty,
    though its save_strategy asks for a checkpoint at every step."""
    trainer = setups.trainer(tok, str(tmp_path))
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    args, arguments = trainer.args, trainer.args.to_dict()
    callbacks = list(trainer.callback_handler.callbacks)

    check_trainer(trainer, **SHORT)

    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.optimizer is None
    assert trainer.lr_scheduler is None
    assert trainer.args is args
    assert trainer.args.to_dict() == arguments
    assert trainer.state.global_step == 0
    assert trainer.callback_handler.callbacks == callbacks
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- accumulation


def test_loss_normalised_per_micro_batch_in_a_plain_loop(tok):
    """transformers #34191, torchtune #1875: each micro-batch's mean loss divided by k weighs a
    short micro-batch's tokens more than a long one's. ``accumulation`` compares the update at
    the first optimizer step with the gradient of the mean loss over all of its tokens, and
    recognises the sum of the micro-batch means."""
    fails(plain(tok, fault="mean_per_micro_batch"), "accumulation", "#34191", "torchtune #1875")


def test_trainer_whose_compute_loss_ignores_num_items_in_batch(tok, tmp_path):
    """transformers #34191 in a Trainer subclass: ``compute_loss`` returns the model's own mean
    loss, dropping ``num_items_in_batch``, so the Trainer divides per micro-batch means by k."""
    class MeanPerMicroBatch(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    fails(trained_by_trainer(tok, tmp_path, trainer_class=MeanPerMicroBatch), "accumulation", "#34191")


def test_loss_not_divided_by_the_accumulation_steps(tok):
    """The step backpropagates each micro-batch's mean loss as it is, without dividing by k:
    with micro-batches of unequal length that is the sum of the means, so ``accumulation``
    names both #34191 and the missing division. (No clipping here: clipping rescales the
    update and would hide the factor.)"""
    fails(plain(tok, fault="no_division_by_k", clip=None), "accumulation",
          "#34191", "not divided by the 2 accumulation steps")


@pytest.mark.parametrize("divided", [True, False])
def test_loss_not_divided_by_the_accumulation_steps_on_packed_chunks(tok, divided):
    """Packed chunks of equal length: the mean losses of two micro-batches, summed without
    dividing by 2, give twice the gradient. ``accumulation`` finds the factor k; the same
    step dividing by k passes (and says the equal counts could not show a per-micro-batch mean)."""
    ids = [i for example in setups.examples(tok) for i in example["input_ids"]]
    chunks = torch.tensor(ids[: len(ids) // 8 * 8]).view(-1, 8)
    batches = list(chunks.split(4))
    net = setups.model(tok)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
    calls = [0]

    def step(chunk: torch.Tensor) -> torch.Tensor:
        loss = net(input_ids=chunk, labels=chunk).loss
        (loss / 2 if divided else loss).backward()
        calls[0] += 1
        if calls[0] % 2 == 0:
            optimizer.step()
            optimizer.zero_grad()
        return loss.detach()

    report = check_loop(net, step, batches, tokenizer=tok, max_grad_norm=0.0, **SHORT)
    if divided:
        passes(report, "accumulation")
        assert "could not be told apart" in report["accumulation"].explanation
    else:
        fails(report, "accumulation", "2 times the gradient", "not divided by the 2 accumulation steps")


@pytest.mark.parametrize("counted_after_the_shift", [True, False])
def test_trainer_counting_tokens_before_the_shift(tok, tmp_path, counted_after_the_shift):
    """transformers #46204: the Trainer divides the summed loss by ``num_items_in_batch``,
    counted over ``labels`` before the model's shift, one token per row too many. The Trainer
    counts over ``labels[..., 1:]`` only when it recognises the model's loss as ForCausalLMLoss
    (``_loss_shifts_labels``); GPT-2's ``loss_type`` is None, so transformers 5.24 still counts
    before the shift for it. The flag is set here either way so the test does not depend on
    that. Without clipping (``max_grad_norm=0``) ``accumulation`` sees the update scaled by
    the ratio of the two counts."""
    trainer = setups.trainer(tok, str(tmp_path), max_grad_norm=0.0)
    trainer._loss_shifts_labels = counted_after_the_shift
    report = check_trainer(trainer, **SHORT)
    if counted_after_the_shift:
        passes(report, "accumulation")
    else:
        fails(report, "accumulation", "counted before the shift", "#46204")


class CountBeforeShift(GPT2LMHeadModel):
    """A GPT-2 whose own loss sums the shifted cross-entropy but divides it by the labels
    counted before the shift (transformers #46204's mistake, in the model's code)."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        output = super().forward(input_ids=input_ids, **kwargs)
        if labels is not None:
            logits = output.logits[:, :-1]
            summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                     ignore_index=-100, reduction="sum")
            output.loss = summed / (labels != -100).sum()
        return output


def test_model_loss_divided_by_the_count_before_the_shift(tok):
    """transformers #46204 in a model's own loss: ``loss_matches_reference`` computes shifted
    cross-entropy from the model's logits, finds the own loss lower, and recognises it as the
    sum divided by the count before the shift."""
    net = CountBeforeShift(setups.model(tok).config)
    report = plain(tok, net=net)
    fails(report, "loss_matches_reference", "before the shift", "#46204")


# ---------------------------------------------------------------- the batches


@pytest.mark.parametrize("driver", ["loop", "trainer"])
def test_pad_token_equal_to_eos(tok, tmp_path, driver):
    """transformers #23530: with ``pad_token = eos_token``, DataCollatorForLanguageModeling
    labels every pad -100, and with them every real eos, so the model never learns to stop.
    ``batch_supervision`` finds real (attended) eos tokens that are not supervised."""
    eos_padded = setups.tokenizer()
    eos_padded.pad_token = eos_padded.eos_token
    report = setup_with(driver, tok, tmp_path, collate=DataCollatorForLanguageModeling(eos_padded, mlm=False))
    fails(report, "batch_supervision", "end-of-sequence token(s) are not supervised", "#23530")


@pytest.mark.parametrize("driver", ["loop", "trainer"])
def test_no_eos_appended(tok, tmp_path, driver):
    """transformers #22794: a tokenizer that adds no eos; the examples are whole and padded, so
    ``batch_supervision`` expects each row to end with eos (expect_eos is inferred from the
    padding) and finds rows that do not."""
    data = [{"input_ids": tok(text)["input_ids"]} for text in setups.texts()]
    report = setup_with(driver, tok, tmp_path, data=data)
    fails(report, "batch_supervision", "do not end with eos", "#22794")


def test_bos_doubled(tok):
    """sglang #888: a chat template writes BOS and the tokenizer adds another, so every example
    starts with two. ``batch_supervision`` looks at each row's first two real tokens."""
    bos = tok.bos_token_id
    data = [{"input_ids": [bos, bos, *example["input_ids"]]} for example in setups.examples(tok)]
    report = plain(tok, batches=setups.loader(tok, data=data))
    fails(report, "batch_supervision", "start with two BOS tokens", "#888")


def test_a_row_with_every_label_ignored(tok):
    """trl #598: a completion-only collator that does not find its response template in a row
    labels all of it -100 and only warns. ``batch_supervision`` finds the row that supervises
    nothing."""
    causal = setups.collator(tok)

    def template_not_found(examples: list[Any]) -> Any:
        batch = causal(examples)
        batch["labels"][1] = -100
        return batch

    report = plain(tok, batches=setups.loader(tok, collate=template_not_found))
    fails(report, "batch_supervision", "rows supervise no token (first: row 1)", "#598")


def prompted(tok: PreTrainedTokenizerFast) -> list[dict[str, list[int]]]:
    """Examples of 8 tokens each (a 3-word prompt, a 4-word answer, eos) whose own labels
    ignore the prompt: -100 on its 3 positions."""
    pick = random.Random(0)
    out = []
    for _ in range(16):
        ids = tok(" ".join(pick.choice(setups.WORDS) for _ in range(7)))["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


@pytest.mark.parametrize("driver", ["loop", "trainer"])
@pytest.mark.parametrize("keeps_labels", [True, False])
def test_collator_that_rebuilds_labels(tok, tmp_path, driver, keeps_labels):
    """transformers #26357: DataCollatorForLanguageModeling(mlm=False) sets labels to a copy of
    input_ids, dropping the labels the examples bring: the prompt the user masked with -100 is
    trained on. Nothing in the collated batch shows it (its labels equal its inputs), so
    ``inputs_unchanged`` collates the dataset's first examples itself (through the Trainer's own
    column removal, or the DataLoader's collate_fn) and checks that every -100 of theirs survives.
    DataCollatorForSeq2Seq keeps them and passes."""
    collate = DataCollatorForSeq2Seq(tok) if keeps_labels else DataCollatorForLanguageModeling(tok, mlm=False)
    report = setup_with(driver, tok, tmp_path, data=prompted(tok), collate=collate)
    if keeps_labels:
        passes(report, "inputs_unchanged")
        assert "every -100 of the labels 8 of them bring" in report["inputs_unchanged"].explanation
    else:
        fails(report, "inputs_unchanged", "own labels ignore with -100", "#26357")


def test_loss_mask_written_into_labels_that_alias_input_ids(tok):
    """Fast-LLM #253: the labels are the input_ids tensor itself (no clone), and a loss mask
    written into them in place writes into the inputs too. Here the step masks a 2-token prompt
    with the pad id and ignores the pad id in the loss, as many loops do (-100 in the inputs
    would crash the embedding at once, a loud bug); the model then never sees the prompts.
    ``batch_supervision`` sees labels sharing memory with input_ids; ``inputs_unchanged`` sees
    the step change input_ids. lmcheck puts the ids back after each call, so the user's batches
    end as they began."""
    causal = setups.collator(tok)

    def aliasing(examples: list[Any]) -> Any:
        batch = causal(examples)
        batch["labels"] = batch["input_ids"]
        return batch

    net = setups.model(tok)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
    pad = tok.pad_token_id

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        labels[:, :2] = pad  # the loss mask over the prompt, in place
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=pad)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    batches = list(setups.loader(tok, collate=aliasing))
    ids = [b["input_ids"].clone() for b in batches]
    report = check_loop(net, step, batches, tokenizer=tok, max_grad_norm=0.0, **SHORT)
    fails(report, "batch_supervision", "labels share memory with input_ids", "Fast-LLM #253")
    fails(report, "inputs_unchanged", "changed the input_ids of batch 0 in place", "Fast-LLM #253")
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(ids, batches, strict=True))


def test_trainer_whose_labels_alias_input_ids(tok, tmp_path):
    """Fast-LLM #253 through a Trainer: the collator hands out labels that are input_ids, and a
    ``compute_loss`` override masks a 2-token prompt in them with -100 replaced by the pad id
    (as above), in place. ``batch_supervision`` sees the aliasing in the collated batches;
    ``inputs_unchanged`` compares each micro-batch's input_ids before and after the Trainer's
    training step."""
    causal = setups.collator(tok)

    def aliasing(examples: list[Any]) -> Any:
        batch = causal(examples)
        batch["labels"] = batch["input_ids"]
        return batch

    class MaskedPrompt(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["labels"][:, :2] = tok.pad_token_id  # the loss mask over the prompt, in place
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    report = trained_by_trainer(tok, tmp_path, collate=aliasing, trainer_class=MaskedPrompt)
    fails(report, "batch_supervision", "labels share memory with input_ids", "#253")
    fails(report, "inputs_unchanged", "changed the input_ids of micro-batch 1 in place", "#253")


# ---------------------------------------------------------------- the learning rate


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_scheduler_stepped_on_every_micro_batch(tok):
    """Lightning #1476: the scheduler is stepped per micro-batch, so with 2 micro-batches per
    optimizer step warmup and decay run twice too fast. ``lr_schedule`` replays the scheduler
    once per optimizer step and recognises the rates as the schedule counted in micro-batches."""
    fails(plain(tok, fault="scheduler_per_micro_batch"), "lr_schedule", "every micro-batch", "#1476")


@pytest.mark.parametrize("how", ["zero_for_100_steps", "warmup_from_0_never_stepped"])
def test_learning_rate_stuck_at_zero(tok, how):
    """A learning rate of 0 trains nothing: a schedule whose factor is 0 for the first 100
    steps, or a warmup from 0 whose scheduler is never stepped. ``lr_schedule`` fails on any
    optimizer step after the first with a rate of 0 (and, for the scheduler never stepped, on
    the rates its replay gives)."""
    net = setups.model(tok)
    loop = setups.Loop(net, fault="no_scheduler_step" if how == "warmup_from_0_never_stepped" else None)
    factor = (lambda step: 0.0 if step < 100 else 1.0) if how == "zero_for_100_steps" else (lambda step: step / 10)
    loop.scheduler = torch.optim.lr_scheduler.LambdaLR(loop.optimizer, factor)
    report = check_loop(net, loop.step, setups.loader(tok), tokenizer=tok, scheduler=loop.scheduler,
                        max_grad_norm=1.0, **SHORT)
    fails(report, "lr_schedule", "the learning rate is 0 at optimizer steps 1, 2")
    if how == "warmup_from_0_never_stepped":
        assert "LambdaLR stepped once per optimizer step gives 0.001" in report["lr_schedule"].explanation
    fails(report, "params_update", "did not change")


class AmpLoop:
    """A loop with the AMP loss scaler (the model stays float32 on the CPU: the scaling alone
    shows the bug); ``unscale_first`` is the documented order: unscale_, then clip."""

    def __init__(self, net: torch.nn.Module, unscale_first: bool) -> None:
        self.net, self.unscale_first = net, unscale_first
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
        self.scaler = torch.amp.GradScaler("cpu")

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.net(**batch).loss
        self.scaler.scale(loss).backward()
        if self.unscale_first:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        else:  # Lightning #9330: clipping the gradients still multiplied by the scale (65536)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.scaler.unscale_(self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        return loss.detach()


@pytest.mark.parametrize("unscale_first", [True, False])
def test_gradients_clipped_before_the_scaler_unscales_them(tok, unscale_first):
    """Lightning #9330: ``clip_grad_norm_`` before ``scaler.unscale_`` clips the scaled
    gradients to the norm, and unscaling then shrinks them 65536 times more: the update is far
    smaller than clipping to max_grad_norm makes it. ``accumulation`` compares the update at the
    optimizer's step (after unscaling) with the clipped reference gradient; the documented
    order passes as clipped."""
    net = setups.model(tok)
    loop = AmpLoop(net, unscale_first)
    report = check_loop(net, loop.step, setups.loader(tok), tokenizer=tok, max_grad_norm=1.0, **SHORT)
    if unscale_first:
        passes(report, "accumulation")
        assert "compared before clip_grad_norm_, which clipped it by" in report["accumulation"].explanation
    else:
        fails(report, "accumulation", "before unscale_", "#9330")


# ---------------------------------------------------------------- gradients and updates


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("input_grads", [True, False])
def test_reentrant_checkpointing_with_frozen_embeddings(tok, input_grads):
    """transformers #21381: reentrant gradient checkpointing (``use_reentrant=True``) gives no
    gradient to a checkpointed block whose inputs do not require grad, which is the case when
    the embeddings are frozen: the blocks' parameters are trainable but never trained.
    transformers 5.24 guards against it (``gradient_checkpointing_enable`` calls
    ``enable_input_require_grads()``), and then ``gradient_flow`` passes; undoing that guard
    with ``disable_input_require_grads()`` restores the state older versions left the model
    in, and ``gradient_flow`` finds the blocks without gradients at the first optimizer step."""
    net = setups.model(tok)
    net.transformer.wte.weight.requires_grad_(False)  # tied to lm_head, frozen with it
    net.transformer.wpe.weight.requires_grad_(False)
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if not input_grads:
        net.disable_input_require_grads()
    report = plain(tok, net=net)
    if input_grads:
        passes(report, "gradient_flow")
    else:
        fails(report, "gradient_flow", "transformer.h.0.ln_1.weight gets no gradient", "#21381")


def test_parameter_missing_from_the_optimizer(tok):
    """A parameter left out of the optimizer's groups gets gradients but is never updated.
    ``params_update`` compares every trainable parameter before and after the user's steps."""
    net = setups.model(tok)
    loop = setups.Loop(net)
    loop.optimizer = torch.optim.AdamW([p for n, p in net.named_parameters() if n != "transformer.ln_f.weight"],
                                       lr=1e-2, weight_decay=0.0)
    loop.scheduler = setups.warmup(loop.optimizer)
    report = check_loop(net, loop.step, setups.loader(tok), tokenizer=tok, scheduler=loop.scheduler,
                        max_grad_norm=1.0, **SHORT)
    fails(report, "params_update", "transformer.ln_f.weight", "missing from the optimizer")
    passes(report, "gradient_flow")


def test_frozen_parameter_that_changes(tok):
    """A parameter frozen after it had a gradient keeps a zero ``.grad`` under
    ``zero_grad(set_to_none=False)``, so AdamW still steps it: weight decay shrinks a weight
    meant to stay fixed. ``params_update`` fails on a frozen parameter that changed."""
    net = setups.model(tok)
    frozen = net.transformer.ln_f.weight
    frozen.grad = torch.zeros_like(frozen)
    frozen.requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = net(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return loss.detach()

    report = check_loop(net, step, setups.loader(tok), tokenizer=tok, max_grad_norm=0.0, **SHORT)
    fails(report, "params_update", "transformer.ln_f.weight is frozen (requires_grad=False) but changed")


# ---------------------------------------------------------------- evaluation


def dropout_always_on(net: torch.nn.Module) -> torch.nn.Module:
    """The hidden states reaching the head go through ``F.dropout(x, 0.1)``, whose ``training``
    defaults to True: a line of model code that forgot ``training=self.training`` (a forward
    pre-hook stands in for it here)."""
    net.lm_head.register_forward_pre_hook(lambda module, args: (F.dropout(args[0], 0.1),))
    return net


def test_dropout_left_on_in_evaluation(tok):
    """Dropout still active in eval mode makes evaluation random: ``eval_deterministic``
    evaluates twice and compares. Dropout as ``nn.Dropout`` modules, which ``model.eval()``
    turns off, passes."""
    fails(plain(tok, net=dropout_always_on(setups.model(tok))), "eval_deterministic", "dropout is still on")
    passes(plain(tok, net=setups.model(tok, dropout=0.1)), "eval_deterministic")


def test_dropout_left_on_in_the_trainers_evaluation(tok, tmp_path):
    """The same model through ``Trainer.evaluate()``, called twice."""
    report = trained_by_trainer(tok, tmp_path, net=dropout_always_on(setups.model(tok)))
    fails(report, "eval_deterministic", "Trainer.evaluate() twice gives", "dropout is still on")


# ---------------------------------------------------------------- data order


def test_loader_that_does_not_shuffle(tok):
    """``shuffle=False``: every epoch sees the examples in the same order. ``data_order``
    iterates the loader twice and compares the rows' order."""
    fails(plain(tok, batches=setups.loader(tok, shuffle=False)), "data_order", "in the same order as epoch 1")


def test_sampler_that_draws_with_replacement(tok):
    """A sampler drawing with replacement repeats some examples in an epoch and skips others;
    ``data_order`` counts each row of an epoch against the dataset."""
    data = setups.examples(tok)
    sampler = torch.utils.data.RandomSampler(data, replacement=True, generator=torch.Generator().manual_seed(0))
    batches = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler, collate_fn=setups.collator(tok))
    fails(plain(tok, batches=batches), "data_order", "repeats an example")


def test_one_shot_generator_has_no_second_epoch(tok):
    """A generator of batches can be read once: ``data_order`` is n/a, and says to pass the
    DataLoader itself."""
    report = plain(tok, batches=(batch for batch in setups.loader(tok)))
    assert report["data_order"].status == "n/a"
    assert "one-shot iterator" in report["data_order"].explanation


# ---------------------------------------------------------------- reproducibility


def test_rebuild_that_ignores_its_seed(tok):
    """torchtune #2335: the seed never reaches the setup (a hard-coded ``torch.manual_seed(0)``),
    so another seed gives the very same run. ``reproducible`` builds the setup with the seed,
    again with it, and with the next seed, and compares the first losses."""
    def rebuild(seed: int) -> Any:
        net = setups.model(tok, seed=0)
        return net, setups.Loop(net).step, setups.loader(tok, seed=0)

    fails(plain(tok, rebuild=rebuild), "reproducible", "gave the very same losses", "#2335")


def test_rebuild_with_an_unseeded_data_order(tok):
    """The examples are shuffled by ``random.Random()`` with no seed: the same seed gives
    another order, so other losses. ``reproducible`` fails on the rerun with the same seed."""
    def rebuild(seed: int) -> Any:
        net = setups.model(tok, seed=seed)
        data = setups.examples(tok)
        random.Random().shuffle(data)
        return net, setups.Loop(net).step, setups.loader(tok, data=data, shuffle=False)

    fails(plain(tok, rebuild=rebuild), "reproducible", "the same seed (rebuilt with 0) gave different losses")


@pytest.mark.parametrize("uses_seed", [True, False])
def test_trainer_rebuild_that_ignores_its_seed(tok, tmp_path, uses_seed):
    """torchtune #2335 through a Trainer built by ``rebuild(seed)``: one that passes the seed to
    the model and the arguments passes; one that ignores it fails."""
    def rebuild(seed: int) -> Trainer:
        return setups.trainer(tok, str(tmp_path / f"rebuilt-{seed}"), seed=seed if uses_seed else 0)

    report = check_trainer(setups.trainer(tok, str(tmp_path / "run")), rebuild=rebuild, **SHORT)
    if uses_seed:
        passes(report, "reproducible")
    else:
        fails(report, "reproducible", "gave the very same losses", "#2335")


# ---------------------------------------------------------------- the loss at initialisation


def test_badly_scaled_output_layer(tok):
    """An output layer 50 times too large (GPT-2 ties it to the input embeddings: both grow)
    makes the initial logits far from uniform. ``loss_at_init`` compares the loss at init with
    ln V; for a pretrained model that comparison means nothing, so ``pretrained=True`` makes it
    n/a."""
    net = setups.model(tok)
    with torch.no_grad():
        net.lm_head.weight.mul_(50)
    fails(plain(tok, net=net), "loss_at_init", "far from uniform")
    result = plain(tok, net=net, pretrained=True)["loss_at_init"]
    assert result.status == "n/a"
    assert "pretrained" in result.explanation


# ---------------------------------------------------------------- non-finite values


def test_nan_loss_never_passes(tok):
    """A step whose loss is NaN (here multiplied by NaN) trains the model into NaN. NaN compares
    false with everything, so a careless check would pass it; here the report fails, and the
    failures say which parameter's gradient was not finite, and where."""
    net = setups.model(tok)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = net(**batch).loss * float("nan")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    report = check_loop(net, step, setups.loader(tok), tokenizer=tok, max_grad_norm=0.0, **SHORT)
    fails(report, "gradient_flow", "transformer.wte.weight has a non-finite gradient: nan at index")
    fails(report, "accumulation", "not finite")
    fails(report, "overfits", "not finite")
    assert report["gradient_flow"].headroom == float("-inf")


def test_nan_weight_never_passes(tok):
    """A model holding one NaN weight: no check that reads its outputs passes, and the loss at
    init names the parameter holding it."""
    net = setups.model(tok)
    with torch.no_grad():
        net.transformer.h[0].mlp.c_fc.weight[3, 4] = float("nan")
    report = plain(tok, net=net)
    fails(report, "loss_at_init", "transformer.h.0.mlp.c_fc.weight has 1 NaN")
    for check in ("loss_matches_reference", "gradient_flow", "params_update", "accumulation", "overfits",
                  "eval_deterministic"):
        assert report[check].status == "fail", report[check]


# ---------------------------------------------------------------- misuse: clear errors


def test_bad_arguments_raise_errors_that_name_them(tok):
    """Misuse is an exception naming the argument, never a failed check."""
    net = setups.model(tok)
    step = setups.Loop(net).step
    batches = setups.loader(tok)
    with pytest.raises(InputError, match="'train_step'"):
        check_loop(net, 3, batches)
    with pytest.raises(InputError, match="'batches' must be an iterable of batches"):
        check_loop(net, step, 5)
    with pytest.raises(InputError, match="'batches' yielded no batch"):
        check_loop(net, step, [])
    with pytest.raises(ModelError, match="'model'"):
        check_loop(3, step, batches)
    with pytest.raises(InputError, match="'scheduler'"):
        check_loop(net, step, batches, scheduler=5)
    with pytest.raises(InputError, match="max_grad_norm"):
        check_loop(net, step, batches, max_grad_norm=-1.0)
    with pytest.raises(InputError, match="'trainer' must be a transformers.Trainer"):
        check_trainer(net)


def test_step_that_never_steps_an_optimizer(tok):
    """A train_step that only does forward and backward: lmcheck stops after 64 calls with an
    error naming ``train_step``, instead of waiting forever."""
    net = setups.model(tok)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = net(**batch).loss
        loss.backward()
        return loss.detach()

    with pytest.raises(InputError, match="'train_step' took 64 calls without stepping an optimizer"):
        check_loop(net, step, setups.loader(tok), **SHORT)


def test_step_that_returns_no_loss(tok):
    """A train_step that returns None: the error names ``train_step`` and what it must return."""
    net = setups.model(tok)
    loop = setups.Loop(net)

    def step(batch: dict[str, torch.Tensor]) -> None:
        loop.step(batch)

    with pytest.raises(InputError, match="'train_step' on batch 0 must return the loss"):
        check_loop(net, step, setups.loader(tok), **SHORT)


def test_rebuild_that_returns_something_else(tok):
    """``rebuild(seed)`` must return (model, train_step, batches)."""
    with pytest.raises(InputError, match="'rebuild' must return"):
        plain(tok, rebuild=lambda seed: "a model")


# ---------------------------------------------------------------- found in review: no false alarms


def test_a_gpt2_trainer_as_transformers_builds_it_shows_the_count_before_the_shift(tok, tmp_path):
    """transformers 5.24 names a model's loss after its class, and "GPT2LMHeadModel" matches no
    loss; the Trainer then counts the tokens before the shift (transformers #46204), live. The
    first run does not clip, so even a Trainer that clips (max_grad_norm=1) is seen doing it."""
    net = setups.model(tok)
    net.loss_type = None  # as GPT2LMHeadModel(config) leaves it
    report = check_trainer(setups.trainer(tok, str(tmp_path), net=net), **SHORT)
    fails(report, "accumulation", "counted before the shift", "#46204", 'model.loss_type = "ForCausalLM"')


@pytest.mark.parametrize("arguments", [{"bf16": True}, {"label_smoothing_factor": 0.1},
                                       {"lr_scheduler_type": "reduce_lr_on_plateau", "eval_strategy": "steps",
                                        "eval_steps": 5}],
                         ids=["bf16", "label_smoothing", "reduce_lr_on_plateau"])
def test_healthy_trainer_variants_raise_no_false_alarm(tok, tmp_path, arguments):
    """Mixed precision gets bf16's tolerance, label smoothing is off in the run the gradient is
    compared in, and a scheduler that follows a metric is not replayed by step count."""
    report = check_trainer(setups.trainer(tok, str(tmp_path), **arguments), **SHORT)
    for check in ("accumulation", "lr_schedule", "gradient_flow", "params_update"):
        passes(report, check)


def test_the_users_trainer_callbacks_do_not_run_during_the_checks(tok, tmp_path):
    """An EarlyStoppingCallback needs an evaluation strategy the runs turn off: it and every other
    user callback sit out lmcheck's runs, and come back afterwards."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    class Counter(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            Counter.steps += 1

    trainer = setups.trainer(tok, str(tmp_path), eval_strategy="steps", eval_steps=5, save_steps=5,
                             load_best_model_at_end=True, metric_for_best_model="eval_loss")
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=1))
    trainer.add_callback(Counter())
    before = list(trainer.callback_handler.callbacks)
    report = check_trainer(trainer, **SHORT)
    passes(report, "accumulation")
    assert Counter.steps == 0
    assert trainer.callback_handler.callbacks == before


def test_tensor_batches_bring_no_aliasing_of_lmchecks_making(tok):
    """A (B, T) tensor of ids has no labels; the labels lmcheck derives are a copy, so the
    aliasing check (Fast-LLM #253) does not fire on lmcheck's own doing."""
    net = setups.model(tok)
    step = setups.ids_step(net, torch.optim.AdamW(net.parameters(), lr=1e-2))
    rows = torch.randint(3, 40, (16, 12), generator=torch.Generator().manual_seed(0))
    report = check_loop(net, step, list(rows.split(4)), tokenizer=tok, **SHORT)
    passes(report, "batch_supervision")
    passes(report, "accumulation")


def test_rows_cut_at_max_length_need_not_end_with_eos(tok):
    """Padded rows ended on their own and must end with eos; a row as wide as the batch may have
    been truncated there (tokenized with max_length=8 here), so it is not asked to."""
    cut = [{"input_ids": e["input_ids"][:8]} for e in setups.examples(tok)]
    assert any(row["input_ids"][-1] != tok.eos_token_id for row in cut)
    report = plain(tok, batches=setups.loader(tok, data=cut, shuffle=False))
    passes(report, "batch_supervision")


def test_submodules_in_eval_mode_stay_so(tok):
    """The snapshot restores each module's train/eval flag, not only the top module's."""
    net = setups.model(tok)
    net.transformer.h[0].eval()
    plain(tok, net=net)
    assert net.training
    assert not net.transformer.h[0].training


def test_the_users_loader_generator_is_put_back(tok):
    """Reading batches for the checks advances a shuffling DataLoader's generator; it is put back,
    so the user's next epoch is the one it would have been."""
    loader = setups.loader(tok)
    before = loader.generator.get_state()
    plain(tok, batches=loader)
    assert torch.equal(loader.generator.get_state(), before)


def test_amp_steps_skipped_by_the_scaler_are_no_false_alarm(tok):
    """An AMP loop whose first optimizer steps overflow (fp16 on a GPU at the default init_scale;
    here a huge init_scale on the CPU): the scaler skips them and the gradients are zeroed, so the
    first real step holds the last k micro-batches only. The scaler, given in ``stateful``, is put
    back afterwards."""
    net = setups.model(tok)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    pending: list[Mapping[str, torch.Tensor]] = []

    def step(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pending.append(batch)
        if len(pending) < 2:
            return torch.tensor(0.0)
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in pending)
        for micro in pending:
            logits = net(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"]).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), micro["labels"][:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum") / tokens
            scaler.scale(loss).backward()
        pending.clear()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    scale = scaler.get_scale()
    report = check_loop(net, step, setups.loader(tok), tokenizer=tok, max_grad_norm=1.0, stateful=[scaler], **SHORT)
    passes(report, "accumulation")
    assert report.setup["micro-batches per optimizer step"] == 2
    assert scaler.get_scale() == scale


def test_a_streaming_train_set_gets_a_clear_error(tok, tmp_path):
    """A Trainer over an IterableDataset has no first examples to take: a clear InputError."""
    import datasets

    trainer = setups.trainer(tok, str(tmp_path))
    trainer.train_dataset = datasets.Dataset.from_list(setups.examples(tok)).to_iterable_dataset()
    with pytest.raises(InputError, match="map-style"):
        check_trainer(trainer, **SHORT)


def test_check_trainer_leaves_accelerates_gradient_state_as_it_was(tok, tmp_path):
    """accelerate's GradientState is shared by every Accelerator in the process. The Trainer's
    runs stop mid-epoch, which left their dataloader registered in it (and, stopped at an
    epoch's end, ``end_of_dataloader`` set: a later ``accelerator.accumulate`` then synced at
    every micro-batch) and its accumulation steps changed; they are put back."""
    from accelerate.state import GradientState

    trainer = setups.trainer(tok, str(tmp_path))
    before = {k: (list(v) if isinstance(v, list) else v) for k, v in GradientState._shared_state.items()}
    check_trainer(trainer, **SHORT)
    assert not GradientState().in_dataloader
    assert GradientState._shared_state == before


def test_a_setup_check_that_raises_is_an_error_and_the_report_is_kept(tok, monkeypatch, tmp_path):
    """One check raising inside lmcheck does not lose the others: it is an error result with the
    exception and where it came from, the report does not pass, and Markdown says so."""
    import lmcheck.setup.battery as battery

    def broken(*args: Any, **kwargs: Any) -> Result:
        raise RuntimeError("the schedule check broke")

    monkeypatch.setattr(battery, "lr_schedule", broken)
    report = plain(tok)
    assert [r.name for r in report.errors()] == ["lr_schedule"]
    assert "RuntimeError: the schedule check broke" in report["lr_schedule"].error
    assert "in broken" in report["lr_schedule"].error
    assert not report.passed
    assert report["gradient_flow"].status == "pass"
    assert report["accumulation"].status == "pass"
    assert "1 could not run (error)" in report.to_markdown(tmp_path / "report.md", plot=False).read_text()
