"""Validate the user's own training setup: their step function or their Trainer, their collator,
data, optimizer, scheduler, accumulation and clipping, before a long run.

Two entry points take what the user already has and return one :class:`SetupReport`:

- :func:`check_loop` takes a plain loop: the model, ``train_step(batch)`` (their own forward,
  backward, clipping, optimizer and scheduler steps and accumulation, returning the loss) and
  their batches;
- :func:`check_trainer` takes a constructed ``transformers.Trainer``.

lmcheck runs *their* code and watches it from outside (every optimizer step is hooked, see
``lmcheck._recording``); it never substitutes its own loop. Weights, gradients, optimizer and
scheduler state and the random generators are saved first and put back after every run, and a
Trainer writes nothing to its output folder (its runs go to a temporary one, with no checkpoint).

The battery, each a :class:`~lmcheck.results.Result` whose explanation names the batch, row,
step or parameter at fault:

==========================  ====================================================================
``batch_supervision``       every real eos supervised, no empty row, pads -100, one BOS at most,
                            labels not aliasing the inputs (transformers #23530, #22794, trl #598,
                            sglang #888, Fast-LLM #253)
``causal_batch``            labels agree with the inputs; a 4-D mask shows no position its future
``inputs_unchanged``        collating and the step leave ``input_ids`` and the user's -100 labels
                            as they were (transformers #26357, Fast-LLM #253)
``loss_at_init``            near ln V for a model trained from scratch (n/a for a pretrained one)
``loss_matches_reference``  the model's own loss is shifted cross-entropy (transformers #27517,
                            #47395, #46204)
``gradient_flow``           at the user's first step every trainable parameter has a finite,
                            non-zero gradient (transformers #21381)
``params_update``           the user's steps change every trainable parameter and no frozen one
``accumulation``            the update over k micro-batches of unequal length equals the gradient
                            of one batch holding the same tokens (transformers #34191, torchtune
                            #1875, #46204; clipping before unscaling, Lightning #9330)
``lr_schedule``             the learning rate at each optimizer step is the schedule's value for
                            that optimizer step, never zero after the first (Lightning #1476)
``overfits``                a handful of the user's batches is memorized within a budget
``data_order``              each epoch a new order of the same examples, none repeated
``reproducible``            the same seed gives the same first losses, another seed other ones
                            (torchtune #2335)
``eval_deterministic``      evaluating twice gives the same loss: dropout off in evaluation
==========================  ====================================================================
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmcheck._finite import locate, non_finite_result
from lmcheck._model import (
    IGNORE_INDEX,
    eval_mode,
    kind,
    model_device,
    model_forward,
    no_dropout,
    parameter_dtype,
)
from lmcheck._recording import OptimizerStep, Recorder, Snapshot
from lmcheck._validate import (
    check_bool,
    check_callable,
    check_int,
    check_model,
    check_number,
    describe,
)
from lmcheck.curves import LossCurve
from lmcheck.errors import InputError, LmcheckError, NonFiniteError
from lmcheck.results import Result, headroom_below
from lmcheck.training import batch_supervision, causal_batch, loss_at_init, loss_matches_reference

__all__ = ["DISTRIBUTED_CHECKS", "SETUP_CHECKS", "SetupReport", "check_loop", "check_trainer"]

# The battery, in report order; every report holds one result of each name.
# Added by check_loop and check_trainer under torchrun (lmcheck.distributed).
DISTRIBUTED_CHECKS = ("grads_synchronized", "data_sharding", "rank_randomness")
SETUP_CHECKS = ("batch_supervision", "causal_batch", "inputs_unchanged", "loss_at_init",
                "loss_matches_reference", "gradient_flow", "params_update", "accumulation",
                "lr_schedule", "overfits", "data_order", "reproducible", "eval_deterministic")

# Relative L2 error allowed between the user's gradient and the reference one, by parameter
# dtype. Both sides are computed by the same model on the same tokens; in float32 on a 2-core
# x86 CPU they differed by below 1e-6 (summation order). A normalisation bug moves the gradient
# by 10% or more (a factor of k, or micro-batches weighted 2:1).
GRADIENT_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class SetupReport:
    """What :func:`check_loop` and :func:`check_trainer` found.

    Attributes:
        results: one :class:`Result` per check of :data:`SETUP_CHECKS`, in that order.
        curve: the training loss per optimizer step of the overfitting run.
        setup: what was found about the setup (kind, accumulation steps, optimizer, dtype, ...).
    """

    results: list[Result]
    curve: LossCurve
    setup: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when no check failed and at least one passed (n/a is neither)."""
        return all(r.status != "fail" for r in self.results) and any(r.passed for r in self.results)

    def __bool__(self) -> bool:
        return self.passed

    def __getitem__(self, name: str) -> Result:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no check named {name!r} in this report (checks: {', '.join(r.name for r in self.results)})")

    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "setup": self.setup, "results": [r.to_dict() for r in self.results],
                "curve": self.curve.to_dict()}

    def to_markdown(self, path: str | os.PathLike[str], *, plot: bool = True) -> Path:
        """Write a Markdown report and, with ``plot``, the loss curve beside it as
        ``<name>-loss-curve.png`` (and its numbers as ``<name>-loss-curve.json``)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        passed = sum(r.status == "pass" for r in self.results)
        skipped = sum(r.status == "n/a" for r in self.results)
        lines = [f"# lmcheck training-setup report: {'PASS' if self.passed else 'FAIL'}", "",
                 f"{passed} of {len(self.results)} checks passed"
                 + (f", {skipped} not applicable" if skipped else "") + ".", "",
                 "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_md(v)} |" for k, v in self.setup.items()]
        lines += ["", "| check | result | explanation |", "|---|---|---|"]
        lines += [f"| {r.name} | {r.status.upper()} | {_md(r.explanation)} |" for r in self.results]
        if plot and self.curve.train:
            from lmcheck.report import plot_loss_curve

            image = plot_loss_curve(self.curve, target.with_name(f"{target.stem}-loss-curve.png"),
                                    title="training loss while overfitting a handful of batches")
            lines += ["", f"![loss curve]({image.name})"]
        target.write_text("\n".join(lines) + "\n")
        return target


def _md(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------- the plain loop


def check_loop(
    model: torch.nn.Module, train_step: Callable[[Any], Any],
    batches: Iterable[Any] | Callable[[int], Iterable[Any]], *, tokenizer: Any = None,
    as_batch: Callable[[Any], Mapping[str, torch.Tensor]] | None = None,
    scheduler: Any = None, schedule: Callable[[int], float] | None = None,
    max_grad_norm: float | None = None, pretrained: bool | None = None,
    evaluate: Callable[[], float] | None = None,
    rebuild: Callable[[int], Any] | None = None, seed: int = 0,
    steps: int = 8, overfit_batches: int = 4, overfit_steps: int = 200, check_every: int = 5,
    expect_eos: bool | None = None, progress: Progress | None = None, stateful: Sequence[Any] = (),
) -> SetupReport:
    """Run the battery on a plain training loop, and leave its objects as they were.

    Args:
        model: the module ``train_step`` trains (a Hugging Face model, a plain module returning
            logits, or one wrapped by :func:`lmcheck.adapt`).
        train_step: the user's own step, called once per micro-batch as ``train_step(batch)``:
            forward, backward and, every k-th call where it accumulates, clipping, the
            optimizer's and scheduler's steps; it returns the loss (a tensor or a float).
        batches: the user's batches, as their loop gets them (a DataLoader, a list), or a
            function from the epoch number to that epoch's batches, doing what the loop does at
            the start of an epoch (``lambda e: (sampler.set_epoch(e), loader)[1]``). Each batch
            is a mapping with ``input_ids`` (``labels`` and ``attention_mask`` optional), a
            (B, T) tensor of ids, or an ``(x, y)`` pair of inputs and next-token targets
            (nanoGPT); otherwise give ``as_batch``.
        tokenizer: for the eos and BOS checks of the batches (optional).
        as_batch: turns one of the user's batches into a mapping with ``input_ids`` and either
            ``labels`` (unshifted, -100 ignored) or ``targets`` (next-token targets, as nanoGPT's
            ``y``), and ``attention_mask`` where there is padding.
        scheduler: the learning-rate scheduler ``train_step`` steps: its state is restored, and
            the learning rate at each optimizer step is compared with its value for that step.
        schedule: the expected learning rate at optimizer step i (0-based), instead of replaying
            ``scheduler``.
        max_grad_norm: the clipping norm of ``train_step``, to check the clipped update; 0 when it
            does not clip (then an update shrunk as a whole is a fault). Left None, an update
            shrunk as a whole passes as clipped.
        pretrained: skip ``loss_at_init``; default: a Hugging Face model loaded from a checkpoint.
        evaluate: the user's evaluation, returning a loss; default: lmcheck's, in eval mode.
        rebuild: ``rebuild(seed)`` builds the setup afresh (model, train_step, batches, like the
            arguments here) for the reproducibility check; without it that check is n/a.
        seed: the seed given to ``rebuild``.
        steps: optimizer steps of the first run (gradients, accumulation, schedule).
        overfit_batches: how many micro-batches the overfitting run cycles through.
        overfit_steps: the overfitting run's budget in optimizer steps.
        check_every: optimizer steps between memorization checks while overfitting.
        expect_eos: every row must end with a supervised eos; default: when rows are padded
            (whole examples, not packed chunks).
        progress: called as ``progress(phase, done, total)`` while the runs go.
        stateful: other objects ``train_step`` changes that have ``state_dict()`` and
            ``load_state_dict()`` (an AMP ``GradScaler``, an EMA of the weights): saved first and
            put back after every run, as the model, the optimizer and ``scheduler`` are.

    Under ``torchrun`` (an initialized process group of more than one rank), call it on every
    rank with the DDP-wrapped model: the accumulation reference is computed over every rank's
    micro-batches, the overfitting run stops on all ranks together, the distributed probes
    (:data:`DISTRIBUTED_CHECKS`) are added, and every rank returns the same report, a failure
    on one rank naming it.
    """
    check_model(model)
    user_model, model = model, _unwrap_parallel(model)
    batches_of_epoch = None
    if callable(batches) and not isinstance(batches, Iterable):
        batches_of_epoch = batches
        batches = _epoch_batches(batches_of_epoch, 0)
    check_callable(train_step, "train_step", "the user's step function: train_step(batch) -> loss")
    _check_options(steps, overfit_batches, overfit_steps, check_every, max_grad_norm)
    for argument, value in (("as_batch", as_batch), ("schedule", schedule), ("evaluate", evaluate),
                            ("rebuild", rebuild), ("progress", progress)):
        if value is not None:
            check_callable(value, argument, "a function")
    if scheduler is not None and not (hasattr(scheduler, "state_dict") and hasattr(scheduler, "step")):
        raise InputError(f"'scheduler' must be a learning-rate scheduler with step() and state_dict() "
                         f"(got {describe(scheduler)})")
    put_back = _loader_state(batches)  # reading batches advances a DataLoader's generator
    first = _take(batches, max(steps * 8, overfit_batches, 8), "batches")  # the runs cycle through them
    convert = _converter(as_batch)
    lm_batches = [convert(b, i) for i, b in enumerate(first[:8])]
    if isinstance(stateful, (str, bytes)) or not isinstance(stateful, Sequence) or not all(
            hasattr(item, "state_dict") and hasattr(item, "load_state_dict") for item in stateful):
        raise InputError(f"'stateful' must be a list of objects with state_dict() and load_state_dict() "
                         f"(got {describe(stateful)})")
    loop = _Loop(model, train_step, first, convert, scheduler, progress, tuple(stateful))
    setup: dict[str, Any] = {"kind": "plain loop", "model": type(model).__name__,
                             "dtype": str(parameter_dtype(model)).replace("torch.", ""),
                             "batches seen": len(first)}
    try:
        results = _battery(loop, lm_batches, tokenizer=tokenizer, schedule=schedule,
                           max_grad_norm=max_grad_norm, pretrained=pretrained, evaluate=evaluate,
                           expect_eos=expect_eos, steps=steps, overfit_batches=overfit_batches,
                           overfit_steps=overfit_steps, check_every=check_every, setup=setup,
                           collated=loop.collating(batches))
        results.append(_data_order_of_loop(batches, convert, batches_of_epoch))
        results.append(_reproducible_loop(rebuild, seed, as_batch, steps) if rebuild is not None else
                       Result.not_applicable("reproducible", "no rebuild(seed) was given, so the setup "
                                             "cannot be built again with another seed"))
        results.append(_finite_or_fail("eval_deterministic", lambda: _eval_twice(model, lm_batches, evaluate)))
        if _world_size() > 1:
            setup["world size"] = _world_size()
            results += _distributed_checks(user_model, train_step, first, batches_of_epoch, as_batch)
    finally:
        loop.snapshot.restore()
        put_back()
    return SetupReport(results=_agree(_ordered(results)), curve=loop.curve, setup=setup)


def _epoch_batches(batches_of_epoch: Callable[[int], Iterable[Any]], epoch: int) -> Iterable[Any]:
    try:
        made = batches_of_epoch(epoch)
    except LmcheckError:
        raise
    except Exception as error:  # the user's code, traceback chained
        raise InputError(f"'batches({epoch})' raised {type(error).__name__}: {error}") from error
    if made is None:
        raise InputError(f"'batches' as a function must return the batches of the epoch (got None for epoch {epoch})")
    return made


# ---------------------------------------------------------------- under torchrun


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _unwrap_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel or DataParallel: lmcheck's own forwards, the
    snapshot and the recorder use it, the user's step keeps the wrapper."""
    parallel = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, parallel) else model


def _gathered(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order; ``[value]`` in one process."""
    if _world_size() == 1:
        return [value]
    everyone: list[Any] = [None] * _world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def _agree(results: list[Result]) -> list[Result]:
    """The same results on every rank: for each check, the first failing rank's result (its
    explanation prefixed with the rank), else this rank's."""
    if _world_size() == 1:
        return results
    everyone = _gathered([r.to_dict() for r in results])
    agreed = []
    for index, result in enumerate(results):
        failing = next((rank for rank, rows in enumerate(everyone) if rows[index]["status"] == "fail"), None)
        if failing is None:
            agreed.append(result)
        else:
            row = everyone[failing][index]
            agreed.append(Result(name=result.name, passed=False, metrics={**row["metrics"], "rank": failing},
                                 explanation=f"on rank {failing}: {row['explanation']}"))
    return agreed


def _distributed_checks(model: torch.nn.Module, train_step: Callable[[Any], Any], batches: list[Any],
                        batches_of_epoch: Callable[[int], Iterable[Any]] | None, as_batch: Any) -> list[Result]:
    from lmcheck import distributed

    results = [distributed.grads_synchronized(model, train_step, batches)]
    results.append(distributed.data_sharding(batches_of_epoch, as_batch=as_batch) if batches_of_epoch is not None
                   else Result.not_applicable("data_sharding", "'batches' is not a function of the epoch, so the "
                                              "ranks' epochs cannot be compared; pass lambda e: "
                                              "(sampler.set_epoch(e), loader)[1]"))
    results.append(distributed.rank_randomness(model, batches[0], as_batch=as_batch))
    return results


class _Loop:
    """Runs the user's step on chosen batches under the recorder, from the saved state."""

    def __init__(self, model: torch.nn.Module, train_step: Callable[[Any], Any], batches: list[Any],
                 convert: Callable[[Any, int], dict[str, torch.Tensor]], scheduler: Any,
                 progress: Progress | None, stateful: tuple[Any, ...] = ()) -> None:
        self.model, self.train_step, self.batches, self.convert = model, train_step, batches, convert
        self.scheduler = scheduler
        self.progress = progress
        self.snapshot = Snapshot(model, ((scheduler,) if scheduler is not None else ()) + stateful)
        self.curve = LossCurve()
        self.changed_inputs: list[str] = []

    def run(self, optimizer_steps: int, *, batches: Sequence[int] | None = None, grad_steps: int = 0,
            phase: str = "", after_step: Callable[[int], bool] | None = None,
            dropout: bool = True) -> tuple[Recorder, list[float], list[int]]:
        """Restore the saved state, then call ``train_step`` on the batches (cycling) until
        ``optimizer_steps`` optimizer steps were taken; ``after_step(n)`` may stop the run early.
        Returns the recorder, the loss of each call and the batch index of each call."""
        self.snapshot.restore()
        recorder = Recorder(self.model, grad_steps=grad_steps, on_first_sight=self.snapshot.add)
        order = list(batches) if batches is not None else list(range(len(self.batches)))
        losses: list[float] = []
        used: list[int] = []
        limit = optimizer_steps * 64  # no optimizer step in 64 calls: the step never steps
        quiet = contextlib.nullcontext() if dropout else no_dropout(self.model)
        with recorder.active(), quiet:
            while len(recorder.steps) < optimizer_steps:
                if len(used) >= limit or (not recorder.steps and len(used) >= 64):
                    raise InputError(
                        f"'train_step' took {len(used)} calls without "
                        + ("stepping an optimizer over the model's parameters" if not recorder.steps
                           else f"reaching {optimizer_steps} optimizer steps")
                        + ": it must call optimizer.step() (every k-th call where it accumulates)")
                index = order[len(used) % len(order)]
                batch = self.batches[index]
                before = _ids_copy(batch)
                recorder.calls += 1
                done = len(recorder.steps)
                loss = self._call(batch, index)
                losses.append(loss)
                used.append(index)
                after = _ids_copy(batch)
                if before is not None and after is not None and not torch.equal(before, after):
                    if not self.changed_inputs:
                        self.changed_inputs.append(_first_difference(before, after, f"batch {index}"))
                    _put_ids_back(batch, before)  # the next call of this batch sees the user's ids
                if len(recorder.steps) > done:
                    if self.progress is not None:
                        self.progress(phase, len(recorder.steps), optimizer_steps)
                    if after_step is not None and after_step(len(recorder.steps)):
                        break
        return recorder, losses, used

    def _call(self, batch: Any, index: int) -> float:
        try:
            loss = self.train_step(batch)
        except LmcheckError:
            raise
        except Exception as error:  # the user's code: reported with the batch, traceback chained
            raise InputError(f"'train_step' raised {type(error).__name__} on batch {index}: {error}") from error
        return _loss_value(loss, f"'train_step' on batch {index}")

    def memorized(self, lm_batches: Sequence[Mapping[str, torch.Tensor]]) -> tuple[int, int]:
        return _memorized_rows(self.model, lm_batches)

    def overfit_batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        return [self.convert(b, i) for i, b in enumerate(self.batches[:count])]

    def collating(self, batches: Any) -> tuple[list[str], int, int]:
        """The first examples of a DataLoader's dataset against what its ``collate_fn`` makes of
        them: (problems, examples compared, with labels); nothing to compare without a map-style dataset."""
        dataset, collate = getattr(batches, "dataset", None), getattr(batches, "collate_fn", None)
        if getattr(batches, "batch_size", None) is None or not callable(collate) \
                or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            return [], 0, 0
        return _collating_problems(dataset, collate, lambda examples: examples)


# ---------------------------------------------------------------- the Trainer


def check_trainer(
    trainer: Any, *, pretrained: bool | None = None, rebuild: Callable[[int], Any] | None = None,
    steps: int = 8, overfit_batches: int = 4, overfit_steps: int = 200, check_every: int = 5,
    expect_eos: bool | None = None, progress: Progress | None = None,
) -> SetupReport:
    """Run the battery on a constructed ``transformers.Trainer``: its model, arguments
    (accumulation, clipping, schedule, seed), collator and datasets.

    The runs use the Trainer's own ``train()``, stopped after a few optimizer steps, with its
    outputs sent to a temporary folder, no checkpoint, no evaluation and none of the user's
    callbacks (only the flow callback); the first run also turns clipping and label smoothing
    off, so the update it compares is the plain cross-entropy gradient at its true scale; the model,
    the Trainer's attributes, its optimizer and scheduler and the random generators are put
    back afterwards. ``rebuild(seed)``, where given, builds the Trainer afresh for the
    reproducibility check (otherwise the check reruns this Trainer with ``args.seed`` changed and
    the random generators seeded with it, as the Trainer's constructor does: that reaches the data
    order and dropout, not the initialisation of the model, which is built already).
    The other arguments are :func:`check_loop`'s.
    """
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        raise InputError(f"'trainer' must be a transformers.Trainer (got {describe(trainer)})")
    if trainer.train_dataset is None:
        raise InputError("'trainer' must have a train_dataset to check (got None)")
    _check_options(steps, overfit_batches, overfit_steps, check_every, None)
    for argument, value in (("rebuild", rebuild), ("progress", progress)):
        if value is not None:
            check_callable(value, argument, "a function")
    model = check_model(trainer.model, "trainer.model")
    driver = _TrainerDriver(trainer, progress)
    args = trainer.args
    loader_batches = driver.first_batches(max(overfit_batches, 8))
    lm_batches = [_converter(None)(b, i) for i, b in enumerate(loader_batches)]
    setup: dict[str, Any] = {
        "kind": f"transformers {type(trainer).__name__}", "model": type(model).__name__,
        "dtype": str(parameter_dtype(model)).replace("torch.", ""),
        "per-device batch": args.per_device_train_batch_size,
        "gradient accumulation": args.gradient_accumulation_steps, "learning rate": args.learning_rate,
        "scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "max grad norm": args.max_grad_norm, "seed": args.seed,
    }
    try:
        results = _battery(driver, lm_batches, tokenizer=trainer.processing_class, schedule=None,
                           max_grad_norm=0.0, pretrained=pretrained,  # the first run does not clip
                           evaluate=None, expect_eos=expect_eos, steps=steps,
                           overfit_batches=overfit_batches, overfit_steps=overfit_steps,
                           check_every=check_every, setup=setup, collated=driver.collating())
        results.append(driver.data_order())
        results.append(driver.reproducible(rebuild, steps))
        results.append(_finite_or_fail("eval_deterministic", lambda: driver.eval_twice(lm_batches)))
    finally:
        driver.restore()
    if _world_size() > 1:
        setup["world size"] = _world_size()
    return SetupReport(results=_agree(_ordered(results)), curve=driver.curve, setup=setup)


class _TrainerDriver:
    """Runs a Trainer's own ``train()`` for a few steps, watched and then undone."""

    def __init__(self, trainer: Any, progress: Progress | None) -> None:
        self.trainer = trainer
        self.model = trainer.model
        self.progress = progress
        self.attributes = dict(vars(trainer))
        self.callbacks = list(trainer.callback_handler.callbacks)
        known = tuple(x for x in (trainer.optimizer, trainer.lr_scheduler) if x is not None)
        self.snapshot = Snapshot(self.model, known)
        self.overfit_examples = 0  # set by overfit_batches
        mixed = bool(trainer.args.bf16 or trainer.args.fp16)  # autocast: the user's side is rounded more
        self.gradient_rtol = GRADIENT_RTOL[torch.bfloat16] if mixed else None
        self.curve = LossCurve()
        self.changed_inputs: list[str] = []
        self.scheduler: Any = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)

    def restore(self) -> None:
        self.snapshot.restore()
        vars(self.trainer).clear()
        vars(self.trainer).update(self.attributes)
        self.trainer.callback_handler.callbacks[:] = self.callbacks

    def first_batches(self, count: int) -> list[Any]:
        with _quiet():
            loader = self.trainer.get_train_dataloader()
            return _take(loader, count, "the Trainer's train dataloader")

    @contextlib.contextmanager
    def _arguments(self, output_dir: str, **changes: Any) -> Iterator[None]:
        from transformers.trainer_callback import DefaultFlowCallback
        from transformers.trainer_utils import IntervalStrategy, SaveStrategy

        original = self.trainer.args
        fields = {f.name for f in dataclasses.fields(original)}
        updates = {"output_dir": output_dir, "logging_dir": os.path.join(output_dir, "logs"),
                   "save_strategy": SaveStrategy.NO, "eval_strategy": IntervalStrategy.NO,
                   "logging_strategy": IntervalStrategy.NO, "report_to": [], "disable_tqdm": True,
                   "load_best_model_at_end": False, "push_to_hub": False, "dataloader_num_workers": 0,
                   "dataloader_persistent_workers": False, **changes}
        handler = self.trainer.callback_handler
        # only the flow callback: the user's own (early stopping, logging, their state) are not
        # part of the update, and must neither run nor count lmcheck's steps
        kept = [c for c in handler.callbacks if isinstance(c, DefaultFlowCallback)]
        try:
            changed = copy.copy(original)  # dataclasses.replace would rerun __post_init__, which resets accelerate
            for key, value in updates.items():
                if key in fields:
                    setattr(changed, key, value)
            self.trainer.args = changed
            handler.callbacks[:] = kept if any(isinstance(c, DefaultFlowCallback) for c in kept) \
                else [DefaultFlowCallback(), *kept]
            yield
        finally:
            self.trainer.args = original
            handler.callbacks[:] = self.callbacks

    def run(self, optimizer_steps: int, *, batches: Sequence[int] | None = None, grad_steps: int = 0,
            phase: str = "", after_step: Callable[[int], bool] | None = None, dropout: bool = True,
            seed: int | None = None, unequal: bool = False) -> tuple[Recorder, list[float], list[int]]:
        """``trainer.train()`` from the saved state until ``optimizer_steps`` optimizer steps;
        ``batches`` (indices into the first batches) limits the train set to their examples."""
        from transformers import TrainerCallback

        self.snapshot.restore()
        trainer = self.trainer
        for name in ("optimizer", "lr_scheduler"):
            setattr(trainer, name, self.attributes[name])
        recorder = Recorder(self.model, grad_steps=grad_steps, on_first_sight=self._first_sight)
        losses: list[float] = []
        seen: list[Mapping[str, torch.Tensor]] = []
        driver = self

        class Watch(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if driver.progress is not None:
                    driver.progress(phase, len(recorder.steps), optimizer_steps)
                stop = after_step is not None and after_step(len(recorder.steps))
                if stop or len(recorder.steps) >= optimizer_steps:
                    control.should_training_stop = True

        original_step = trainer.training_step

        def training_step(model: Any, inputs: Any, *rest: Any, **kwargs: Any) -> Any:
            recorder.calls += 1
            if len(seen) < 64:
                seen.append({k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
            before = _ids_copy(inputs)
            loss = original_step(model, inputs, *rest, **kwargs)
            after = _ids_copy(inputs)
            if before is not None and after is not None and not torch.equal(before, after) \
                    and not driver.changed_inputs:
                driver.changed_inputs.append(_first_difference(before, after, f"micro-batch {recorder.calls}"))
            losses.append(_loss_value(loss, f"the Trainer's training step {recorder.calls}"))
            return loss

        changes: dict[str, Any] = {"max_steps": optimizer_steps} if batches is not None else {}
        smoother = trainer.label_smoother
        if unequal:  # the first run: the update is compared with plain, unclipped cross-entropy
            changes.update(max_grad_norm=0.0, label_smoothing_factor=0.0)
            trainer.label_smoother = None
        if seed is not None:
            changes.update(seed=seed, data_seed=seed)
        collator = trainer.data_collator
        dataset = trainer.train_dataset
        quiet = contextlib.nullcontext() if dropout else no_dropout(self.model)
        with tempfile.TemporaryDirectory(prefix="lmcheck-setup-") as output_dir, \
                self._arguments(output_dir, **changes), recorder.active(), quiet:
            trainer.training_step = training_step
            watch = Watch()
            trainer.callback_handler.callbacks.append(watch)
            if batches is not None:
                # the examples overfit_batches collated: under DDP each rank holds only its share of them
                trainer.train_dataset = _subset(dataset, self.overfit_examples or
                                                len(batches) * trainer.args.per_device_train_batch_size)
            if unequal:
                trainer.data_collator = _unequal_lengths(collator)
            if seed is not None:
                from transformers.trainer_utils import set_seed

                set_seed(seed)  # what the Trainer's constructor does with args.seed (the model is built already)
            try:
                with _quiet():
                    trainer.train()
            except LmcheckError:
                raise
            except Exception as error:  # the user's Trainer, model or data: named, traceback chained
                raise InputError(f"'trainer': its train() raised {type(error).__name__} while lmcheck ran "
                                 f"{optimizer_steps} steps ({phase}): {error}") from error
            finally:
                trainer.train_dataset = dataset
                trainer.data_collator = collator
                trainer.label_smoother = smoother
                del trainer.training_step
        self.seen = seen
        self._after_run()
        return recorder, losses, list(range(len(losses)))

    def _first_sight(self, optimizer: torch.optim.Optimizer) -> None:
        self.snapshot.add(optimizer)
        scheduler = self.trainer.lr_scheduler
        scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
        if scheduler is not None and self.scheduler is not scheduler:
            self.scheduler = scheduler  # created by train(): saved before its first step
            self.snapshot.add(scheduler)

    def _after_run(self) -> None:
        """Drop what train() made (optimizer, scheduler, state), keep the model's values."""
        for name in ("optimizer", "lr_scheduler", "state", "control", "model_wrapped"):
            if name in self.attributes:
                setattr(self.trainer, name, self.attributes[name])
        accelerator = getattr(self.trainer, "accelerator", None)
        for name in ("_models", "_optimizers", "_schedulers", "_dataloaders"):
            items = getattr(accelerator, name, None)
            if isinstance(items, list):
                items.clear()

    def memorized(self, lm_batches: Sequence[Mapping[str, torch.Tensor]]) -> tuple[int, int]:
        return _memorized_rows(self.model, lm_batches)

    def collating(self) -> tuple[list[str], int, int]:
        """The train set's first examples against what ``trainer.data_collator`` makes of them,
        after the Trainer's own removal of the columns the model's forward does not take:
        (problems, examples compared, examples with labels compared)."""
        trainer = self.trainer
        dataset = trainer.train_dataset
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) or trainer.data_collator is None:
            return [], 0, 0
        keep: set[str] | None = None
        if trainer.args.remove_unused_columns and hasattr(trainer, "_set_signature_columns_if_needed"):
            trainer._set_signature_columns_if_needed()
            keep = set(getattr(trainer, "_signature_columns", None) or ()) or None

        def columns(examples: list[Any]) -> list[Any]:
            if keep is None:
                return examples
            return [{k: v for k, v in e.items() if k in keep} if isinstance(e, Mapping) else e for e in examples]

        with _quiet():
            return _collating_problems(dataset, trainer.data_collator, columns)

    def overfit_batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        """The batches the overfitting run trains on: the first ``count`` batches' worth of
        examples, collated by the Trainer's own dataloader."""
        dataset = self.trainer.train_dataset
        self.overfit_examples = count * self.trainer.args.per_device_train_batch_size
        self.trainer.train_dataset = _subset(dataset, self.overfit_examples)
        try:
            with _quiet():
                loader = self.trainer.get_train_dataloader()
            return [_converter(None)(b, i) for i, b in enumerate(loader)]
        finally:
            self.trainer.train_dataset = dataset

    def data_order(self) -> Result:
        with _quiet():
            loader = self.trainer.get_train_dataloader()
        dataset = self.trainer.train_dataset
        keys: list[str] | None = None
        if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__") and len(dataset) <= _ORDER_ROWS:
            keys = []
            for i in range(len(dataset)):
                example = dataset[i]
                ids = example.get("input_ids") if isinstance(example, Mapping) else None
                if ids is None:
                    keys = None
                    break
                keys.append(_key(torch.as_tensor(ids)))
        epochs = []
        for epoch in range(2):
            for target in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
                set_epoch = getattr(target, "set_epoch", None)
                if callable(set_epoch):
                    set_epoch(epoch)  # as Trainer.train() does at each epoch
            epochs.append(_epoch_keys(loader, _converter(None)))
        return _data_order(epochs, keys)

    def reproducible(self, rebuild: Callable[[int], Any] | None, steps: int) -> Result:
        seed = int(self.trainer.args.seed)
        runs = min(steps, 3)
        if rebuild is not None:
            def first_losses(value: int) -> list[float]:
                built = _call_rebuild(rebuild, value)
                if not _is_trainer(built):
                    raise InputError(f"'rebuild' must return a transformers.Trainer (got {describe(built)})")
                other = _TrainerDriver(built, None)
                try:
                    return other.run(runs, phase="reproducibility")[1]
                finally:
                    other.restore()
            how = "rebuilt with"
        else:
            def first_losses(value: int) -> list[float]:
                return self.run(runs, seed=value, phase="reproducibility")[1]
            how = "args.seed"
        return _reproducible([first_losses(seed), first_losses(seed), first_losses(seed + 1)], seed, how)

    def eval_twice(self, lm_batches: Sequence[Mapping[str, torch.Tensor]]) -> Result:
        trainer = self.trainer
        dataset = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
        if isinstance(dataset, Mapping):
            dataset = next(iter(dataset.values()))
        subset = _subset(dataset, 2 * trainer.args.per_device_eval_batch_size)
        self.snapshot.restore()
        losses = []
        with tempfile.TemporaryDirectory(prefix="lmcheck-setup-") as output_dir, self._arguments(output_dir):
            for _ in range(2):
                with _quiet():
                    metrics = trainer.evaluate(eval_dataset=subset)
                losses.append(metrics.get("eval_loss"))
        self._after_run()
        if any(not isinstance(v, (int, float)) for v in losses):
            return Result.not_applicable("eval_deterministic", f"Trainer.evaluate() returned no eval_loss "
                                         f"(got {losses[0]!r})")
        return _eval_deterministic([float(v) for v in losses], "Trainer.evaluate()")


def _is_trainer(value: object) -> bool:
    from transformers import Trainer

    return isinstance(value, Trainer)


# ---------------------------------------------------------------- the battery


def _battery(
    driver: Any, lm_batches: list[dict[str, torch.Tensor]], *, tokenizer: Any, schedule: Any,
    max_grad_norm: float | None, pretrained: bool | None, evaluate: Any, expect_eos: bool | None,
    steps: int, overfit_batches: int, overfit_steps: int, check_every: int, setup: dict[str, Any],
    collated: tuple[list[str], int, int],
) -> list[Result]:
    """The checks both entry points share: batches, loss, a short run (gradients, updates,
    accumulation, schedule) and an overfitting run."""
    model = driver.model
    results = _batch_checks(lm_batches, tokenizer, expect_eos)
    labelled = next((b for b in lm_batches if "labels" in b), None)
    results.append(_loss_at_init(model, lm_batches[0], pretrained))
    results.append(loss_matches_reference(model, _labels_form(labelled or lm_batches[0]))
                   if labelled is not None else
                   Result.not_applicable("loss_matches_reference", "the batches carry next-token targets, "
                                         "not labels, so the model's own loss is not called"))
    # the short run: the user's steps, dropout off so that the reference can repeat the forward
    extra = {"unequal": True} if isinstance(driver, _TrainerDriver) else {}
    recorder, _, used = driver.run(steps, grad_steps=1, phase="first steps", dropout=False, **extra)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = recorder.steps[0]
    # k: the fewest calls between two steps. More before the first step means steps were skipped
    # (an AMP loss scaler that met an overflow skips optimizer.step and the gradients are zeroed):
    # the first step's gradient holds the last k micro-batches only.
    k = min(s.micro_batches for s in recorder.steps)
    setup["micro-batches per optimizer step"] = k
    setup["optimizer"] = ", ".join(sorted({type(o).__name__ for o, _ in _optimizers(driver.snapshot)})) or "?"
    calls = range(first.micro_batches - k, first.micro_batches)
    step_batches = ([driver.seen[i] for i in calls] if isinstance(driver, _TrainerDriver)
                    else [driver.convert(driver.batches[used[i]], used[i]) for i in calls])
    results.append(_gradient_flow(model, first))
    results.append(_params_update(model, driver.snapshot, after, len(recorder.steps)))
    rtol = getattr(driver, "gradient_rtol", None)
    results.append(_finite_or_fail("accumulation", lambda: _accumulation(model, driver.snapshot, step_batches,
                                                                         first, max_grad_norm, rtol)))
    results.append(_lr_schedule(recorder.steps, driver, schedule))
    # the overfitting run: a handful of batches, the user's settings, until memorized or budget
    results.append(_overfit(driver, driver.overfit_batches(overfit_batches), overfit_steps, check_every))
    # after both runs (the first run's collator, made to give unequal lengths, copies the labels)
    results.append(_inputs_unchanged(driver.changed_inputs, collated))
    return results


def _finite_or_fail(name: str, check: Callable[[], Result]) -> Result:
    """The check's result, or its failure where a model output it reads is NaN or Inf (the
    message says which output and where)."""
    try:
        return check()
    except NonFiniteError as error:
        return non_finite_result(name, str(error))


def _check_options(steps: object, overfit_batches: object, overfit_steps: object, check_every: object,
                   max_grad_norm: object) -> None:
    check_int(steps, "steps", 1, 10_000)
    check_int(overfit_batches, "overfit_batches", 1, 64)
    check_int(overfit_steps, "overfit_steps", 1)
    check_int(check_every, "check_every", 1)
    if max_grad_norm is not None:
        check_number(max_grad_norm, "max_grad_norm", low=0)


def _ordered(results: list[Result]) -> list[Result]:
    rank = {name: i for i, name in enumerate(SETUP_CHECKS + DISTRIBUTED_CHECKS)}
    return sorted(results, key=lambda r: rank.get(r.name, len(rank)))


def _optimizers(snapshot: Snapshot) -> list[tuple[Any, Any]]:
    return [(o, s) for o, s in snapshot.objects.values() if isinstance(o, torch.optim.Optimizer)]


# ---------------------------------------------------------------- batches


def _converter(as_batch: Callable[[Any], Mapping[str, torch.Tensor]] | None) -> Callable[[Any, int], dict[str, torch.Tensor]]:
    """A function from one of the user's batches (and its index) to lmcheck's form: a dict with
    ``input_ids`` and ``labels`` (unshifted) or ``targets`` (next-token), ``attention_mask``
    where given."""
    def convert(batch: Any, index: int) -> dict[str, torch.Tensor]:
        where = f"batch {index}"
        if as_batch is not None:
            made = as_batch(batch)
            if not isinstance(made, Mapping) or "input_ids" not in made or not ({"labels", "targets"} & set(made)):
                raise InputError(f"'as_batch' must return a mapping with 'input_ids' and 'labels' or 'targets' "
                                 f"(got {describe(made)} for {where})")
            out = {k: v for k, v in made.items() if isinstance(v, torch.Tensor)}
        elif isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
            out = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")
                   if isinstance(batch.get(k), torch.Tensor)}
            if "labels" not in out:  # the model's own labels are the inputs; lmcheck's copy masks pads
                out["labels"] = _labels_from(batch["input_ids"], out.get("attention_mask"))
        elif isinstance(batch, torch.Tensor):
            out = {"input_ids": batch, "labels": _labels_from(batch, None)}
        elif isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch) \
                and batch[0].shape == batch[1].shape:
            out = {"input_ids": batch[0], "targets": batch[1]}
        else:
            raise InputError(f"'batches' must yield mappings with 'input_ids', (B, T) tensors of ids or "
                             f"(x, y) pairs of inputs and next-token targets (got {describe(batch)} for "
                             f"{where}); give as_batch=lambda batch: {{'input_ids': ..., 'labels': ...}}")
        ids = out["input_ids"]
        if ids.dim() != 2 or ids.dtype.is_floating_point:
            raise InputError(f"the input_ids of {where} must be a (B, T) integer tensor (got {describe(ids)})")
        return {k: v.detach() for k, v in out.items()}

    return convert


def _labels_from(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Labels for a batch that brings none: a copy of the ids (never the same memory), -100 at pads."""
    labels = ids.clone()
    if mask is not None and mask.shape == ids.shape:
        labels[mask == 0] = IGNORE_INDEX
    return labels


def _labels_form(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch with ``labels`` (Hugging Face's unshifted form); next-token targets become labels
    one position later (the last target has no place and is dropped)."""
    out = dict(batch)
    if "targets" in out:
        targets = out.pop("targets")
        labels = torch.full_like(targets, IGNORE_INDEX)
        labels[:, 1:] = targets[:, :-1]
        out["labels"] = labels
    return out


def _batch_checks(lm_batches: list[dict[str, torch.Tensor]], tokenizer: Any,
                  expect_eos: bool | None) -> list[Result]:
    """batch_supervision and causal_batch on each of the first batches: the first failure, else
    the first batch's pass with the supervised fraction over all of them."""
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = None
    padded = any("attention_mask" in b and bool((b["attention_mask"] == 0).any()) for b in lm_batches)
    eos = padded if expect_eos is None else check_bool(expect_eos, "expect_eos")
    out = []
    for check in (lambda b: batch_supervision(b, tokenizer, expect_eos=eos),
                  lambda b: causal_batch(b, max_ignored_fraction=1.0)):
        results = [check(_labels_form(b)) for b in lm_batches]
        failed = next(((i, r) for i, r in enumerate(results) if not r.passed), None)
        if failed is not None:
            index, result = failed
            out.append(dataclasses.replace(result, explanation=f"batch {index}: {result.explanation}"))
        else:
            out.append(dataclasses.replace(
                results[0], explanation=f"{len(results)} batches checked: {results[0].explanation}"
                + (" (rows end with eos: checked because they are padded examples)" if eos and expect_eos is None else "")))
    return out


def _ids_copy(batch: Any) -> torch.Tensor | None:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    return ids.detach().clone() if isinstance(ids, torch.Tensor) else None


def _first_difference(before: torch.Tensor, after: torch.Tensor, where: str) -> str:
    row, column = (int(i) for i in (before != after).nonzero()[0])
    return (f"the step changed the input_ids of {where} in place (first at row {row}, position {column}: "
            f"{int(before[row, column])} became {int(after[row, column])}); a loss mask written into labels "
            f"that alias input_ids does this (Fast-LLM #253): clone the labels")


def _put_ids_back(batch: Any, saved: torch.Tensor) -> None:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(ids, torch.Tensor) and ids.shape == saved.shape:
        with torch.no_grad():
            ids.copy_(saved)


_COLLATED_EXAMPLES = 8  # examples of the dataset compared with their collated rows


def _collating_problems(dataset: Any, collate: Callable[[Any], Any],
                        columns: Callable[[list[Any]], list[Any]]) -> tuple[list[str], int, int]:
    """Collate the dataset's first examples as the loader would and compare: at each example's
    real positions (attention_mask 1) the collated ``input_ids`` must be the example's, and every
    position after the first that the example's own ``labels`` set to -100 must still be -100.
    Returns (problems, examples compared, examples with labels compared). What cannot be
    compared position by position is skipped: a collator that raises on these examples, rows
    packed, truncated or given extra tokens, and, without an attention_mask, rows longer than
    their example."""
    try:
        examples = [dataset[i] for i in range(min(_COLLATED_EXAMPLES, len(dataset)))]
    except Exception:  # a dataset that cannot be indexed like this: nothing to compare
        return [], 0, 0
    if not examples or not all(isinstance(e, Mapping) and "input_ids" in e for e in examples):
        return [], 0, 0
    wanted = [(_id_list(e["input_ids"]), _id_list(e["labels"]) if "labels" in e else None) for e in examples]
    try:
        batch = collate(columns([dict(e) for e in examples]))
    except Exception:  # the user's collator, called outside their loader: not comparable
        return [], 0, 0
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != len(examples):
        return [], 0, 0
    labels = batch.get("labels")
    labels = labels if isinstance(labels, torch.Tensor) and labels.shape == ids.shape else None
    mask = batch.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.shape == ids.shape else None
    problems: list[str] = []
    compared = labelled = 0
    changed_ids = dropped_labels = None
    for row, (example_ids, example_labels) in enumerate(wanted):
        if example_ids is None:
            continue
        # the real positions: attention_mask 1; without a mask only rows as long as their example
        positions = mask[row].nonzero().flatten().tolist() if mask is not None else list(range(ids.shape[1]))
        if len(positions) != len(example_ids):
            continue  # truncated, packed or tokens added: not comparable position by position
        compared += 1
        got = ids[row, positions].tolist()
        if got != example_ids and changed_ids is None:
            at = next(i for i, (a, b) in enumerate(zip(example_ids, got, strict=True)) if a != b)
            changed_ids = (f"collating changed the input_ids of example {row} (position {at}: {example_ids[at]} "
                           f"became {got[at]}); a loss mask written in place into labels that alias "
                           f"input_ids does this (Fast-LLM #253): clone the labels")
        if labels is not None and example_labels is not None and len(example_labels) == len(example_ids):
            labelled += 1
            collated = labels[row, positions].tolist()
            lost = [i for i, (a, b) in enumerate(zip(example_labels, collated, strict=True))
                    if i > 0 and a == IGNORE_INDEX and b != IGNORE_INDEX]  # the first is never a target
            if lost and dropped_labels is None:
                masked = sum(v == IGNORE_INDEX for v in example_labels[1:])
                dropped_labels = (f"the collator supervises {len(lost)} of the {masked} positions that example "
                                  f"{row}'s own labels ignore with -100 (first: its token {lost[0]}, now "
                                  f"labelled {collated[lost[0]]}): it rebuilds labels from input_ids and drops the "
                                  f"user's (transformers #26357); use a collator that keeps the labels "
                                  f"(DataCollatorForSeq2Seq pads them with -100)")
    problems += [p for p in (changed_ids, dropped_labels) if p is not None]
    return problems, compared, labelled


def _id_list(value: Any) -> list[int] | None:
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    if tensor.dim() != 1 or tensor.dtype.is_floating_point:
        return None
    return [int(v) for v in tensor.tolist()]


def _inputs_unchanged(problems: list[str], collated: tuple[list[str], int, int]) -> Result:
    collating, compared, labelled = collated
    problems = [*collating, *problems]
    passed = not problems
    if compared:
        checked = (f"collating {compared} examples keeps their input_ids"
                   + (f" and every -100 of the labels {labelled} of them bring" if labelled else
                      " (they bring no labels of their own)")
                   + "; input_ids are the same after each step")
    else:
        checked = ("input_ids are the same after each step; collating was not compared with the examples (the "
                   "batches do not come from a DataLoader over a dataset of examples with input_ids)")
    return Result(name="inputs_unchanged", passed=passed,
                  metrics={"problems": len(problems), "examples_compared": compared, "examples_labelled": labelled},
                  explanation=checked if passed else "; ".join(problems))


def _unequal_lengths(collator: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The collator, then fewer supervised positions in some batches than others (the later
    labels set to -100), so that micro-batches of one step hold unequal token counts."""
    counter = [0]

    def collate(examples: Any) -> Any:
        batch = collator(examples)
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] > 4:
            keep = max(2, labels.shape[1] * (1 + counter[0] % 4) // 4)
            labels = labels.clone()
            labels[:, keep:] = IGNORE_INDEX
            batch["labels"] = labels
        counter[0] += 1
        return batch

    return collate


def _subset(dataset: Any, count: int) -> Any:
    count = max(1, min(count, len(dataset)))
    if hasattr(dataset, "select"):
        return dataset.select(range(count))
    return torch.utils.data.Subset(dataset, range(count))


def _loader_state(batches: object) -> Callable[[], None]:
    """A function that puts back the random generators (and a DistributedSampler's epoch) that
    iterating a DataLoader advances."""
    sampler: Any = getattr(batches, "sampler", None)
    generators = [getattr(owner, "generator", None) for owner in (batches, sampler)]
    saved = [(g, g.get_state()) for g in generators if isinstance(g, torch.Generator)]
    epoch = getattr(sampler, "epoch", None)

    def put_back() -> None:
        for generator, state in saved:
            generator.set_state(state)
        if epoch is not None:
            sampler.epoch = epoch

    return put_back


def _take(batches: Iterable[Any], count: int, argument: str) -> list[Any]:
    if isinstance(batches, (str, bytes, Mapping)) or not isinstance(batches, Iterable):
        raise InputError(f"'{argument}' must be an iterable of batches, such as a DataLoader or a list "
                         f"(got {describe(batches)})")
    taken = []
    for batch in batches:
        taken.append(batch)
        if len(taken) >= count:
            break
    if not taken:
        raise InputError(f"'{argument}' yielded no batch")
    return taken


# ---------------------------------------------------------------- the checks on the recordings


def _loss_at_init(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], pretrained: bool | None) -> Result:
    if pretrained is None:
        config = getattr(model, "config", None)
        pretrained = kind(model) == "transformers" and bool(getattr(config, "_name_or_path", ""))
    if check_bool(pretrained, "pretrained"):
        return Result.not_applicable("loss_at_init", "the model is pretrained (loaded from a checkpoint), "
                                     "so its loss is not near ln V; pass pretrained=False to check it")
    return loss_at_init(model, batch["input_ids"])


def _gradient_flow(model: torch.nn.Module, step: OptimizerStep) -> Result:
    missing: list[str] = []  # no gradient or an all-zero one
    non_finite: list[str] = []
    grads = step.grads or {}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, _ in trainable:
        grad = grads.get(name)
        if grad is None:
            missing.append(f"{name} gets no gradient")
        elif (found := locate(grad, ("index",) * grad.dim())) is not None:
            non_finite.append(f"{name} has a non-finite gradient: {found}")
        elif not bool(grad.any()):
            missing.append(f"{name} has an all-zero gradient")
    problems = non_finite + missing
    passed = not problems
    if passed:
        explanation = (f"at the first optimizer step all {len(trainable)} trainable parameters have finite, "
                       f"non-zero gradients")
    else:
        explanation = (f"at the first optimizer step {len(problems)} of {len(trainable)} trainable parameters "
                       f"are not trained: " + "; ".join(problems[:4])
                       + (f"; {len(problems) - 4} more" if len(problems) > 4 else ""))
        if non_finite:
            explanation += (". A NaN or Inf gradient comes from a non-finite loss or weight, or an overflow in "
                            "half precision")
        if missing:
            explanation += (". Reentrant gradient checkpointing with frozen embeddings leaves the checkpointed "
                            "blocks without gradients (transformers #21381): use use_reentrant=False or "
                            "model.enable_input_require_grads()")
    metrics: dict[str, Any] = {"trainable": len(trainable), "problems": len(problems)}
    if non_finite:
        return non_finite_result("gradient_flow", explanation, **metrics)
    return Result(name="gradient_flow", passed=passed, metrics=metrics, explanation=explanation)


def _params_update(model: torch.nn.Module, snapshot: Snapshot, after: Mapping[str, torch.Tensor],
                   steps: int) -> Result:
    before = snapshot.parameters()
    problems: list[str] = []
    unchanged = []
    trainable = 0
    for name, parameter in model.named_parameters():
        if (found := locate(after[name], ("index",) * after[name].dim())) is not None:
            problems.append(f"{name} holds a non-finite value after the steps: {found}")
            continue
        changed = not torch.equal(before[name], after[name])
        trainable += parameter.requires_grad
        if parameter.requires_grad and not changed:
            unchanged.append(name)
        elif not parameter.requires_grad and changed:
            problems.append(f"{name} is frozen (requires_grad=False) but changed: weight decay or an "
                            f"optimizer step reaches it")
    if unchanged:
        problems.insert(0, f"{len(unchanged)} of {trainable} trainable parameters did not change in {steps} "
                        f"optimizer steps: " + ", ".join(unchanged[:4]) + (" ..." if len(unchanged) > 4 else "")
                        + " (missing from the optimizer, no gradient, or a learning rate of 0)")
    passed = not problems
    return Result(name="params_update", passed=passed, metrics={"trainable": trainable, "unchanged": len(unchanged)},
                  explanation=(f"all {trainable} trainable parameters changed in {steps} optimizer steps of the "
                               f"user's loop, and no frozen one" if passed else "; ".join(problems[:4])))


def _token_loss_sum(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Summed cross-entropy over the supervised tokens, their count, and the count the shift
    would drop (``labels != -100`` before the shift, transformers #46204's mistake)."""
    if "targets" in batch:
        scores, targets = logits, batch["targets"].to(logits.device)
        unshifted = int((targets != IGNORE_INDEX).sum())
    else:
        labels = batch["labels"].to(logits.device)
        scores, targets = logits[:, :-1], labels[:, 1:]
        unshifted = int((labels != IGNORE_INDEX).sum())
    total = F.cross_entropy(scores.float().reshape(-1, scores.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum()), unshifted


def _accumulation(model: torch.nn.Module, snapshot: Snapshot, micro_batches: list[Mapping[str, torch.Tensor]],
                  step: OptimizerStep, max_grad_norm: float | None, rtol: float | None = None) -> Result:
    """The user's gradient at the first optimizer step against the gradient of the mean loss
    over every supervised token of its micro-batches."""
    name = "accumulation"
    if not micro_batches:
        return Result.not_applicable(name, "no micro-batch of the first step was seen")
    world = _world_size()
    if world > 1:  # DDP averages the ranks' gradients: the reference covers every rank's tokens
        local = [{k: v.detach().cpu() for k, v in b.items()} for b in micro_batches]
        micro_batches = [b for rank_batches in _gathered(local) for b in rank_batches]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    parameters = [p for n, p in model.named_parameters() if p.requires_grad]
    snapshot.restore()
    device = model_device(model)
    sums, counts, unshifted = [], [], []
    with no_dropout(model):
        model.train()
        summed: torch.Tensor | None = None  # the sum of the micro-batches' gradients of summed losses
        per_micro: torch.Tensor | None = None  # the sum of their gradients of mean losses
        for batch in micro_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits, _ = model_forward(model, batch["input_ids"], batch.get("attention_mask"), None,
                                      use_cache=False, what="the logits of a micro-batch")
            total, count, before_shift = _token_loss_sum(logits, batch)
            if not bool(torch.isfinite(total)):
                return non_finite_result(name, f"the reference loss of a micro-batch of the first step is {float(total)}")
            grads = torch.autograd.grad(total, parameters, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g.detach()).float().reshape(-1)
                              for p, g in zip(parameters, grads, strict=True)])
            summed = flat if summed is None else summed + flat
            per_micro = flat / max(count, 1) if per_micro is None else per_micro + flat / max(count, 1)
            sums.append(float(total.detach()))
            counts.append(count)
            unshifted.append(before_shift)
    snapshot.restore()
    k = len(micro_batches)
    if sum(counts) == 0:
        return Result.not_applicable(name, "the first step's micro-batches supervise no token")
    if summed is None or per_micro is None:
        return Result.not_applicable(name, "no micro-batch of the first step was seen")
    correct = summed / sum(counts)
    user_grads = step.grads or {}

    def user_grad(name: str, parameter: torch.Tensor) -> torch.Tensor:
        grad = user_grads.get(name)
        return (grad if grad is not None else torch.zeros_like(parameter)).float().reshape(-1)

    user = torch.cat([user_grad(n, p) for n, p in zip(names, parameters, strict=True)])
    tol = rtol if rtol is not None else GRADIENT_RTOL.get(parameter_dtype(model), GRADIENT_RTOL[torch.float32])
    if (found := locate(user, ("index",))) is not None:
        return non_finite_result(name, f"the gradient at the user's first optimizer step is not finite: {found}")
    metrics: dict[str, Any] = {"micro_batches": k, "supervised_tokens": counts,
                               "reference_norm": float(correct.norm()), "user_norm": float(user.norm())}
    unequal = len(set(counts)) > 1
    counted = (f"{k} micro-batch{'es' if k > 1 else ''}" + (f" of {world} ranks" if world > 1 else "")
               + f" supervising {', '.join(map(str, counts))} tokens")

    def fit(direction: torch.Tensor) -> tuple[float, float]:
        """(scale c, residual) of the user's gradient as c * direction."""
        norm = float(direction.norm())
        if norm == 0:
            return 0.0, float("inf")
        scale = float(user @ direction) / norm**2
        return scale, float((user - scale * direction).norm()) / max(float(user.norm()), 1e-30)

    scale, residual = fit(correct)
    metrics.update(scale=scale, residual=residual)
    error = float((user - correct).norm() / max(float(correct.norm()), 1e-30))
    metrics["relative_error"] = error
    # max_grad_norm: None = not said (the step may clip), 0 = the step does not clip
    clipping = max_grad_norm is None or max_grad_norm > 0
    clip = min(1.0, max_grad_norm / max(float(correct.norm()), 1e-30)) if max_grad_norm else None
    if residual <= tol and abs(scale - 1) <= tol:
        return Result(name=name, passed=True, metrics=metrics, threshold=tol, headroom=headroom_below(error, tol),
                      explanation=f"the user's update over {counted} equals the gradient of the mean loss over "
                                  f"all their tokens (relative error {error:.1e}, allowed {tol:g})"
                                  + ("" if unequal or k == 1 else "; the counts are equal, so a per-micro-batch "
                                     "mean could not be told apart: give batches of unequal length"))
    if residual <= tol:
        causes = []
        if k > 1 and abs(scale - k) <= 10 * tol * k:
            causes.append(f"the loss is not divided by the {k} accumulation steps")
        ratio = sum(counts) / max(1, sum(unshifted))
        if abs(scale - ratio) <= tol and ratio != 1:
            causes.append(f"the loss is divided by the labels counted before the shift ({sum(unshifted)}), not "
                          f"after it ({sum(counts)}) (transformers #46204)")
        if clip is not None and scale < clip * (1 - tol):
            causes.append(f"it is smaller than clipping to max_grad_norm={max_grad_norm} makes it: the "
                          f"gradients were clipped while still scaled by the AMP loss scaler, before "
                          f"unscale_ (Lightning #9330)")
        if not causes and scale < 1 and clipping and (clip is None or abs(scale - clip) <= tol):
            return Result(name=name, passed=True, metrics=metrics, threshold=tol,
                          headroom=headroom_below(residual, tol),
                          explanation=f"the user's update over {counted} is the mean-loss gradient clipped by "
                                      f"{scale:.3g} to norm {float(user.norm()):.3g}"
                                      + ("" if clip is not None else " (pass max_grad_norm to check the norm)"))
        explanation = (f"the user's update over {counted} points the right way but is {scale:.4g} times the "
                       f"gradient of the mean loss" + (f": {'; '.join(causes)}" if causes else
                                                       " (and the step does not clip)" if not clipping else ""))
    else:
        micro_scale, micro_residual = fit(per_micro)
        if micro_residual <= tol and unequal:
            # the sum of the means itself (scale 1, not 1/k): the k micro-batches' losses are not
            # divided by k either (clipping that shrinks the update by exactly 1/k is unlikely)
            undivided = k > 1 and abs(micro_scale - 1) <= 10 * tol
            explanation = (f"the user's update over {counted} is "
                           + ("the" if undivided else f"{micro_scale:.3g} times the")
                           + " sum of the micro-batches' mean losses, not the mean over all their tokens: each micro-batch "
                           "is normalised by its own token count, so short ones weigh as much as long ones "
                           "(transformers #34191, torchtune #1875)"
                           + (f", and the sum is not divided by the {k} accumulation steps either" if undivided else "")
                           + "; divide the summed loss by the step's total token count")
        else:
            worst = _worst_parameter(user, correct, names, parameters)
            explanation = (f"the user's update over {counted} differs from the gradient of the mean loss by "
                           f"{error:.3g} (relative, allowed {tol:g}); it differs most at {worst}. The loss "
                           f"the step minimises is not shifted cross-entropy over the supervised tokens")
    return Result(name=name, passed=False, metrics=metrics, threshold=tol, headroom=headroom_below(error, tol),
                  explanation=explanation)


def _worst_parameter(user: torch.Tensor, reference: torch.Tensor, names: Sequence[str],
                     parameters: Sequence[torch.Tensor]) -> str:
    offset, worst, where = 0, -1.0, ""
    for name, parameter in zip(names, parameters, strict=True):
        size = parameter.numel()
        a, b = user[offset: offset + size], reference[offset: offset + size]
        error = float((a - b).norm() / max(float(b.norm()), 1e-30))
        if error > worst:
            worst, where = error, f"{name} (relative error {error:.3g})"
        offset += size
    return where


def _lr_schedule(steps: list[OptimizerStep], driver: Any, schedule: Callable[[int], float] | None) -> Result:
    name = "lr_schedule"
    observed = [s.lrs[0] for s in steps]
    k = max(1, min(s.micro_batches for s in steps))
    metrics: dict[str, Any] = {"observed": observed, "micro_batches_per_step": k}
    problems = []
    zeros = [s.index for s in steps if all(lr == 0 for lr in s.lrs)]
    if any(i > 1 for i in zeros):
        problems.append(f"the learning rate is 0 at optimizer step{'s' if len(zeros) > 1 else ''} "
                        f"{', '.join(map(str, zeros[:5]))}: nothing is learned there (a warmup that never "
                        f"starts, or a scheduler that is never stepped)")
    expected: list[float] | None = None
    source = ""
    if schedule is not None:
        expected = [float(schedule(i)) for i in range(len(steps) * k + k + 1)]
        source = "the given schedule"
    elif isinstance(driver.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        source = ""  # it follows a metric, not the step count: nothing to replay
    elif driver.scheduler is not None:
        expected = _replay(driver.scheduler, driver.snapshot, len(steps) * k + k + 1)
        source = f"{type(driver.scheduler).__name__} stepped once per optimizer step"
    if expected is not None:
        metrics["expected"] = expected[: len(steps)]
        wrong = [i for i, lr in enumerate(observed) if not math.isclose(lr, expected[i], rel_tol=1e-6, abs_tol=1e-12)]
        if wrong:
            i = wrong[0]
            per_micro = k > 1 and any(all(math.isclose(lr, expected[j * k + offset], rel_tol=1e-6, abs_tol=1e-12)
                                          for j, lr in enumerate(observed)) for offset in range(k + 1))
            problems.append(
                f"at optimizer step {i + 1} the learning rate is {observed[i]:.4g}, but {source} gives "
                f"{expected[i]:.4g}" + (f"; the observed rates are the schedule counted in micro-batches ({k} per step): "
                                        f"the scheduler is stepped on every micro-batch, so warmup and decay "
                                        f"run {k} times too fast (Lightning #1476)" if per_micro else ""))
    passed = not problems
    if passed:
        explanation = (f"the learning rate at {len(steps)} optimizer steps follows {source}" if expected is not None
                       else f"the learning rate at {len(steps)} optimizer steps is never 0 after the first; no "
                            + ("step-counted schedule to compare with (ReduceLROnPlateau follows a metric)"
                               if isinstance(driver.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
                               else "schedule to compare with (pass scheduler= or schedule=)"))
        explanation += f" ({', '.join(f'{lr:.3g}' for lr in observed[:4])}{' ...' if len(observed) > 4 else ''})"
    else:
        explanation = "; ".join(problems)
    return Result(name=name, passed=passed, metrics=metrics, explanation=explanation)


def _replay(scheduler: Any, snapshot: Snapshot, count: int) -> list[float]:
    """The scheduler's learning rate over ``count`` steps from its saved start, stepped once per
    optimizer step; the states are put back afterwards."""
    snapshot.restore()
    optimizer = scheduler.optimizer
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(count):
            rates.append(float(optimizer.param_groups[0]["lr"]))
            scheduler.step()
    snapshot.restore()
    return rates


def _memorized_rows(model: torch.nn.Module, lm_batches: Sequence[Mapping[str, torch.Tensor]]) -> tuple[int, int]:
    """(rows whose every supervised next token is the argmax given the true prefix, rows).

    A position whose prefix recurs in another row with another next token cannot be right in
    both (two examples that open alike, a shared prompt template); such positions are left out.
    """
    targets_of, predicted_of, keys_of = [], [], []
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        for batch in lm_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            ids = batch["input_ids"]
            logits, _ = model_forward(model, ids, batch.get("attention_mask"), None,
                                      use_cache=False, what="the logits while overfitting")
            if "targets" in batch:
                predicted, targets, prefix = logits.argmax(-1), batch["targets"], ids
            else:
                predicted, targets, prefix = logits[:, :-1].argmax(-1), batch["labels"][:, 1:], ids[:, :-1]
            predicted_of.append(predicted.cpu())
            targets_of.append(targets.cpu())
            keys_of.append(_prefix_hashes(prefix.cpu()))
    width = max(t.shape[1] for t in targets_of)
    pad = lambda t, v: F.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    targets = torch.cat([pad(t, IGNORE_INDEX) for t in targets_of])
    predicted = torch.cat([pad(t, IGNORE_INDEX) for t in predicted_of])
    keys = torch.cat([pad(t, 0) for t in keys_of])
    supervised = targets != IGNORE_INDEX
    pairs = torch.stack([keys[supervised], targets[supervised]], dim=1).unique(dim=0)
    if _world_size() > 1:  # one model for every rank's rows: a prefix shared across ranks is ambiguous too
        pairs = torch.cat(_gathered(pairs)).unique(dim=0)
    prefixes, counts = pairs[:, 0].unique(return_counts=True)
    ambiguous_keys = prefixes[counts > 1]
    ambiguous = supervised & torch.isin(keys, ambiguous_keys)
    right = (predicted == targets) | ~supervised | ambiguous
    return int(right.all(dim=1).sum()), int(targets.shape[0])


def _prefix_hashes(ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 hash of each prefix ``ids[:, :t + 1]`` (a polynomial hash; int64 wraps)."""
    powers = torch.full((ids.shape[1],), 1_000_003, dtype=torch.int64).cumprod(0)
    return ((ids.to(torch.int64) + 1) * powers).cumsum(dim=1) * 31 + torch.arange(ids.shape[1])


def _overfit(driver: Any, lm_batches: list[dict[str, torch.Tensor]], budget: int, check_every: int) -> Result:
    name = "overfits"
    state: dict[str, Any] = {"memorized": (0, 1), "at": None, "non_finite": None}

    def after_step(step: int) -> bool:
        if step % check_every and step != budget:
            return False
        try:
            state["memorized"] = driver.memorized(lm_batches)
        except NonFiniteError as error:
            state["non_finite"] = f"after optimizer step {step} of the overfitting run, {error}"
            return True
        hits, rows = (sum(v) for v in zip(*_gathered(state["memorized"]), strict=True))
        state["memorized"] = (hits, rows)
        if hits == rows:  # on every rank together: a rank that stopped alone would hang the others
            state["at"] = step
            return True
        return False

    indices = list(range(len(lm_batches)))
    recorder, losses, _ = driver.run(budget, batches=indices, phase="overfitting", after_step=after_step)
    curve = driver.curve
    curve.train.clear()
    position = 0
    for step in recorder.steps:
        part = losses[position: position + max(1, step.micro_batches)]
        position += max(1, step.micro_batches)
        if part:
            curve.record_train(step.index, sum(part) / len(part))
    curve.stop_reason = "memorized" if state["at"] is not None else "max_steps"
    hits, rows = state["memorized"]
    metrics: dict[str, Any] = {"memorized_rows": hits, "rows": rows, "steps": recorder.steps[-1].index if recorder.steps else 0,
                               "budget": budget}
    if curve.non_finite_step is not None:
        return non_finite_result(name, f"the training loss is not finite at optimizer step {curve.non_finite_step} "
                                       f"of the overfitting run", **metrics)
    if state["non_finite"] is not None:
        return non_finite_result(name, state["non_finite"], **metrics)
    first, last = (curve.train[0][1], curve.train[-1][1]) if curve.train else (math.nan, math.nan)
    metrics.update(first_loss=first, last_loss=last)
    lrs = [s.lrs[0] for s in recorder.steps]
    passed = state["at"] is not None
    if passed:
        explanation = (f"{rows} rows of {len(lm_batches)} batches memorized (every supervised next token is the "
                       f"argmax) after {state['at']} optimizer steps; loss {first:.3f} -> {last:.3f}")
    else:
        explanation = (f"after {budget} optimizer steps on {len(lm_batches)} batches, {hits} of {rows} rows are "
                       f"memorized; loss {first:.3f} -> {last:.3f} with learning rates "
                       f"{min(lrs, default=0):.3g} to {max(lrs, default=0):.3g}. A setup that cannot overfit a "
                       f"handful of batches will not learn from many: check the loss, the labels and the "
                       f"learning rate (a long warmup keeps it near 0), or raise overfit_steps")
    return Result(name=name, passed=passed, metrics=metrics, threshold=float(budget),
                  headroom=None if not passed else headroom_below(float(state["at"] or 0), float(budget)),
                  explanation=explanation)


# ---------------------------------------------------------------- data order, seeds, evaluation


_ORDER_ROWS = 4096  # rows read per epoch by data_order


def _key(ids: torch.Tensor) -> str:
    return hashlib.sha1(ids.detach().to("cpu", torch.int64).numpy().tobytes()).hexdigest()[:16]


def _epoch_keys(batches: Iterable[Any], convert: Callable[[Any, int], dict[str, torch.Tensor]],
                limit: int = _ORDER_ROWS) -> tuple[list[str], bool]:
    """One key per row (its unpadded ids) over one pass, and whether the pass ended within
    ``limit`` rows (it stops at the batch that reaches it)."""
    keys: list[str] = []
    for index, batch in enumerate(batches):
        lm = convert(batch, index)
        ids, mask = lm["input_ids"], lm.get("attention_mask")
        for row in range(ids.shape[0]):
            keys.append(_key(ids[row] if mask is None else ids[row][mask[row].bool()]))
        if len(keys) >= limit:
            return keys, False
    return keys, True


def _data_order(epochs: list[tuple[list[str], bool]], dataset: list[str] | None) -> Result:
    name = "data_order"
    (first, whole), (second, _) = epochs
    problems = []
    for number, (keys, complete) in enumerate(epochs, 1):
        counts = Counter(keys)
        allowed = Counter(dataset) if dataset is not None else Counter({k: 1 for k in counts})
        repeated = [k for k, c in counts.items() if c > max(1, allowed.get(k, 0))]
        if repeated:
            rows = [i for i, k in enumerate(keys) if k == repeated[0]]
            problems.append(f"epoch {number} repeats an example (rows {rows[0]} and {rows[1]}; {len(repeated)} "
                            f"repeated): a sampler that draws with replacement, or shards that overlap")
            break
        if dataset is not None and complete:
            missing = sum((Counter(dataset) - counts).values())
            if missing > len(dataset) // 2 or (missing and len(keys) + missing != len(dataset)):
                problems.append(f"epoch {number} skips {missing} of {len(dataset)} examples")
                break
    if first == second:
        problems.append(f"epoch 2 sees the {len(first)} rows in the same order as epoch 1: the data is not "
                        f"reshuffled each epoch (shuffle off, a generator reseeded every epoch, or a "
                        f"DistributedSampler whose set_epoch is never called: pytorch #31771)")
    elif sorted(first) != sorted(second) and whole and _world_size() == 1:  # a rank's share may change
        problems.append("epoch 2 holds other examples than epoch 1")
    passed = not problems
    coverage = "whole epochs" if whole else f"the first {len(first)} rows of each epoch"
    held = ("this rank's share of" if _world_size() > 1 else "the same examples in")
    return Result(name=name, passed=passed, metrics={"rows_per_epoch": len(first), "whole_epochs": whole},
                  explanation=(f"two epochs ({coverage}) hold {held} different orders, none repeated"
                               if passed else "; ".join(problems)))


def _data_order_of_loop(batches: Iterable[Any], convert: Callable[[Any, int], dict[str, torch.Tensor]],
                        batches_of_epoch: Callable[[int], Iterable[Any]] | None = None) -> Result:
    if batches_of_epoch is not None:
        epochs = [_epoch_keys(_epoch_batches(batches_of_epoch, epoch), convert) for epoch in (0, 1)]
        return _data_order(epochs, None)
    if iter(batches) is batches:
        return Result.not_applicable("data_order", "'batches' is a one-shot iterator, so it has no second "
                                     "epoch to compare; pass the DataLoader itself")
    dataset = None
    items = getattr(batches, "dataset", None)
    if _world_size() == 1 and items is not None and hasattr(items, "__len__") and len(items) <= _ORDER_ROWS:
        try:
            dataset = [_key(torch.as_tensor(_example_ids(items[i]))) for i in range(len(items))]
        except (TypeError, KeyError, ValueError, IndexError):
            dataset = None
    epochs = [_epoch_keys(batches, convert), _epoch_keys(batches, convert)]
    if getattr(batches, "drop_last", False):  # each epoch leaves out other rows: not whole epochs
        epochs = [(keys, False) for keys, _ in epochs]
    return _data_order(epochs, dataset)


def _example_ids(example: Any) -> Any:
    if isinstance(example, Mapping):
        return example["input_ids"]
    if isinstance(example, (tuple, list)) and example and isinstance(example[0], torch.Tensor):
        return example[0]
    return example


def _call_rebuild(rebuild: Callable[[int], Any], seed: int) -> Any:
    try:
        return rebuild(seed)
    except LmcheckError:
        raise
    except Exception as error:  # the user's code, reported in one line with the traceback chained
        raise InputError(f"'rebuild({seed})' raised {type(error).__name__}: {error}") from error


def _reproducible_loop(rebuild: Callable[[int], Any], seed: int, as_batch: Any, steps: int) -> Result:
    calls = max(3, min(steps, 4))

    def first_losses(value: int) -> list[float]:
        built = _call_rebuild(rebuild, value)
        model: Any
        step: Any
        batches: Any
        if isinstance(built, Mapping):
            model, step, batches = built.get("model"), built.get("train_step"), built.get("batches")
        elif isinstance(built, (tuple, list)) and len(built) >= 3:
            model, step, batches = built[:3]
        else:
            raise InputError(f"'rebuild' must return (model, train_step, batches) or a mapping with those keys "
                             f"(got {describe(built)})")
        check_model(model)
        check_callable(step, "train_step", "the rebuilt step function")
        taken = _take(batches, calls, "the rebuilt batches")
        return [_loss_value(step(taken[i % len(taken)]), f"the rebuilt train_step on batch {i}") for i in range(calls)]

    return _reproducible([first_losses(seed), first_losses(seed), first_losses(seed + 1)], seed, "rebuilt with")


def _reproducible(runs: list[list[float]], seed: int, how: str) -> Result:
    name = "reproducible"
    first, again, other = runs
    metrics: dict[str, Any] = {"seed": seed, "losses": first, "same_seed": again, "other_seed": other}
    for label, losses in ((f"{seed}", first), (f"{seed} again", again), (f"{seed + 1}", other)):
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None:  # NaN != NaN: the comparisons below would blame the seed
            return non_finite_result(name, f"{how} {label}: the loss is {losses[bad]} at call {bad}", **metrics)
    problems = []
    if first != again:
        i = next(i for i, (a, b) in enumerate(zip(first, again, strict=False)) if a != b) if len(first) == len(again) else 0
        problems.append(f"the same seed ({how} {seed}) gave different losses at call {i} ({first[i]:.6g} vs "
                        f"{again[i]:.6g}): something random is not seeded (data order, dropout, initialisation)")
    if first == other:
        problems.append(f"another seed ({how} {seed + 1}) gave the very same losses: the seed reaches neither the "
                        f"initialisation, the data order nor dropout (torchtune #2335)")
    passed = not problems
    return Result(name=name, passed=passed, metrics=metrics,
                  explanation=(f"{how} {seed} twice: the same first {len(first)} losses; {how} {seed + 1}: other "
                               f"ones" if passed else "; ".join(problems)))


def _eval_twice(model: torch.nn.Module, lm_batches: list[dict[str, torch.Tensor]], evaluate: Callable[[], float] | None) -> Result:
    if evaluate is not None:
        losses = [_loss_value(evaluate(), "'evaluate'") for _ in range(2)]
        return _eval_deterministic(losses, "the user's evaluate()")
    batches = [_labels_form(b) for b in lm_batches[:2]]
    losses = []
    device = model_device(model)
    for _ in range(2):
        total = 0.0
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits, _ = model_forward(model, batch["input_ids"], batch.get("attention_mask"), None,
                                          use_cache=False, what="the logits in evaluation")
                value, count, _ = _token_loss_sum(logits, batch)
                total += float(value) / max(count, 1)
        losses.append(total)
    return _eval_deterministic(losses, "lmcheck's evaluation in eval mode")


def _eval_deterministic(losses: list[float], how: str) -> Result:
    name = "eval_deterministic"
    if not all(math.isfinite(v) for v in losses):
        return non_finite_result(name, f"{how} gave a non-finite loss: {losses}")
    passed = losses[0] == losses[1]
    return Result(name=name, passed=passed, metrics={"losses": losses},
                  explanation=(f"{how} twice gives the same loss {losses[0]:.6g}" if passed else
                               f"{how} twice gives {losses[0]:.6g} and {losses[1]:.6g}: dropout is still on in "
                               f"evaluation (model.eval() not called, or F.dropout(..., training=True) in the "
                               f"model's code)"))


# ---------------------------------------------------------------- small helpers


def _loss_value(loss: Any, where: str) -> float:
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return float(loss.detach().float())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise InputError(f"{where} must return the loss, a scalar tensor or a float (got {describe(loss)})")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the Trainer's warnings and logs while lmcheck drives it."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers_logging.set_verbosity(level)

