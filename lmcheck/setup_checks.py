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
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmcheck._allocator import heap_frozen
from lmcheck._finite import non_finite_result
from lmcheck._model import (
    no_dropout,
    parameter_dtype,
)
from lmcheck._recording import Recorder, Snapshot
from lmcheck._setup_results import (
    GRADIENT_RTOL,
    UNSUPERVISED,
    _accumulation,
    _batch_checks,
    _call_rebuild,
    _collating_problems,
    _converter,
    _data_order,
    _data_order_of_loop,
    _data_order_sampled,
    _dataset_keys,
    _epoch_batches,
    _epoch_keys,
    _eval_deterministic,
    _eval_twice,
    _gathered,
    _gradient_flow,
    _ids_copy,
    _inputs_unchanged,
    _labels_form,
    _loader_state,
    _loss_at_init,
    _loss_value,
    _lr_schedule,
    _note_changed_ids,
    _overfit,
    _params_update,
    _peak_lrs,
    _put_ids_back,
    _quiet,
    _reproducible,
    _reproducible_loop,
    _subset,
    _sums_micro_batches,
    _take,
    _unequal_lengths,
    _unwrap_parallel,
    _world_size,
    special_ids,
    supervised_count,
)
from lmcheck._validate import (
    check_callable,
    check_int,
    check_model,
    check_number,
    describe,
)
from lmcheck.curves import LossCurve
from lmcheck.errors import InputError, LmcheckError, NonFiniteError
from lmcheck.results import Result
from lmcheck.training import loss_matches_reference

__all__ = ["DISTRIBUTED_CHECKS", "SETUP_CHECKS", "SetupReport", "check_loop", "check_trainer"]

# The battery, in report order; every report holds one result of each name.
# Added by check_loop and check_trainer under torchrun (lmcheck.distributed).
DISTRIBUTED_CHECKS = ("grads_synchronized", "data_sharding", "rank_randomness")
SETUP_CHECKS = ("batch_supervision", "causal_batch", "inputs_unchanged", "loss_at_init",
                "loss_matches_reference", "gradient_flow", "params_update", "accumulation",
                "lr_schedule", "overfits", "data_order", "reproducible", "eval_deterministic")

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
        """True when no check failed or raised and at least one passed (n/a is neither)."""
        return (all(r.status not in ("fail", "error") for r in self.results)
                and any(r.passed for r in self.results))

    def __bool__(self) -> bool:
        return self.passed

    def __getitem__(self, name: str) -> Result:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no check named {name!r} in this report (checks: {', '.join(r.name for r in self.results)})")

    def __iter__(self) -> Iterator[Result]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def failures(self) -> list[Result]:
        """The failed checks, root causes first: a failure that follows from an earlier one
        (its ``metrics["follows_from"]``) comes after the one it follows from."""
        failed = [r for r in self.results if r.status == "fail"]
        return sorted(failed, key=lambda r: "follows_from" in r.metrics)

    def errors(self) -> list[Result]:
        """The checks that raised instead of reaching a verdict (``status == "error"``)."""
        return [r for r in self.results if r.status == "error"]

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
        errors = len(self.errors())
        lines = [f"# lmcheck training-setup report: {'PASS' if self.passed else 'FAIL'}", "",
                 f"{passed} of {len(self.results)} checks passed"
                 + (f", {skipped} not applicable" if skipped else "")
                 + (f", {errors} could not run (error)" if errors else "") + ".", "",
                 "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_md(v)} |" for k, v in self.setup.items()]
        lines += ["", "| check | result | explanation |", "|---|---|---|"]
        lines += [f"| {r.name} | {r.status.upper()} | {_md(r.error or r.explanation)} |" for r in self.results]
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
    sampling: str = "epochs",
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
        sampling: how the loop draws its data: ``"epochs"`` (each epoch a new order of the same
            examples: ``data_order`` compares two epochs) or ``"with_replacement"`` (random rows
            or windows at every step, as nanoGPT's ``get_batch``: ``data_order`` checks that the
            rows differ from step to step; ``reproducible`` checks that the seed matters).

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
    if type(scheduler).__name__ == "AcceleratedScheduler":  # accelerate's wrapper: the torch scheduler inside
        scheduler = getattr(scheduler, "scheduler", scheduler)
    if sampling not in ("epochs", "with_replacement"):
        raise InputError(f"'sampling' must be 'epochs' (each epoch a new order of the same examples) or "
                         f"'with_replacement' (random rows or windows drawn at each step, as nanoGPT's "
                         f"get_batch) (got {sampling!r})")
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
                           collated=loop.collating(batches), collator=getattr(batches, "collate_fn", None))
        setup["sampling"] = sampling.replace("_", " ")
        results.append(_data_order_of_loop(batches, convert, batches_of_epoch) if sampling == "epochs"
                       else _data_order_sampled(first, convert))
        unsupervised = _unsupervised(results)
        if unsupervised is not None:
            results += [Result.not_applicable(n, unsupervised) for n in ("reproducible", "eval_deterministic")]
        else:
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
    return SetupReport(results=_root_causes_first(_agree(_ordered(results))), curve=loop.curve, setup=setup)


# ---------------------------------------------------------------- under torchrun


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
            flag_steps: int = 0, peak_lrs: tuple[float, ...] | None = None, phase: str = "",
            after_step: Callable[[int], bool] | None = None,
            dropout: bool = True) -> tuple[Recorder, list[float], list[int]]:
        """Restore the saved state, then call ``train_step`` on the batches (cycling) until
        ``optimizer_steps`` optimizer steps were taken; ``after_step(n)`` may stop the run early.
        Returns the recorder, the loss of each call and the batch index of each call."""
        self.snapshot.restore()
        recorder = Recorder(self.model, grad_steps=grad_steps, flag_steps=flag_steps, peak_lrs=peak_lrs,
                            on_first_sight=self.snapshot.add)
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
                if before is not None and _note_changed_ids(self.changed_inputs, before, _ids_copy(batch), f"batch {index}"):
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
                           check_every=check_every, setup=setup, collated=driver.collating(),
                           collator=trainer.data_collator)
        results.append(driver.data_order())
        unsupervised = _unsupervised(results)
        if unsupervised is not None:
            results += [Result.not_applicable(n, unsupervised) for n in ("reproducible", "eval_deterministic")]
        else:
            results.append(driver.reproducible(rebuild, steps))
            results.append(_finite_or_fail("eval_deterministic", lambda: driver.eval_twice(lm_batches)))
        if _world_size() > 1:  # last: after every other run, the Trainer must still sync its ranks
            results += driver.distributed_checks(loader_batches[0])
    finally:
        driver.restore()
    if _world_size() > 1:
        setup["world size"] = _world_size()
    return SetupReport(results=_root_causes_first(_agree(_ordered(results))), curve=driver.curve, setup=setup)


class _TrainerDriver:
    """Runs a Trainer's own ``train()`` for a few steps, watched and then undone."""

    def __init__(self, trainer: Any, progress: Progress | None) -> None:
        self.trainer = trainer
        self.model = trainer.model
        self.progress = progress
        self.attributes = dict(vars(trainer))
        self.model_attributes = dict(vars(trainer.model))  # accelerate marks a model it has prepared
        self.callbacks = list(trainer.callback_handler.callbacks)
        known = tuple(x for x in (trainer.optimizer, trainer.lr_scheduler) if x is not None)
        self.snapshot = Snapshot(self.model, known)
        self.overfit_examples = 0  # set by overfit_batches
        mixed = bool(trainer.args.bf16 or trainer.args.fp16)  # autocast: the user's side is rounded more
        self.gradient_rtol = GRADIENT_RTOL[torch.bfloat16] if mixed else None
        self.curve = LossCurve()
        self.changed_inputs: list[str] = []
        self.scheduler: Any = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)
        self.gradient_state = _gradient_state()

    def restore(self) -> None:
        self.snapshot.restore()
        self._after_run()
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
        flow = [c for c in handler.callbacks if isinstance(c, DefaultFlowCallback)] or [DefaultFlowCallback()]
        try:
            changed = copy.copy(original)  # dataclasses.replace would rerun __post_init__, which resets accelerate
            for key, value in updates.items():
                if key in fields:
                    setattr(changed, key, value)
            self.trainer.args = changed
            handler.callbacks[:] = flow
            yield
        finally:
            self.trainer.args = original
            handler.callbacks[:] = self.callbacks

    def run(self, optimizer_steps: int, *, batches: Sequence[int] | None = None, grad_steps: int = 0,
            flag_steps: int = 0, peak_lrs: tuple[float, ...] | None = None, phase: str = "",
            after_step: Callable[[int], bool] | None = None, dropout: bool = True,
            seed: int | None = None, unequal: bool = False) -> tuple[Recorder, list[float], list[int]]:
        """``trainer.train()`` from the saved state until ``optimizer_steps`` optimizer steps;
        ``batches`` (indices into the first batches) limits the train set to their examples."""
        from transformers import TrainerCallback

        self.snapshot.restore()
        trainer = self.trainer
        for name in ("optimizer", "lr_scheduler"):
            setattr(trainer, name, self.attributes[name])
        recorder = Recorder(self.model, grad_steps=grad_steps, flag_steps=flag_steps, peak_lrs=peak_lrs,
                            on_first_sight=self._first_sight)
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
            _note_changed_ids(driver.changed_inputs, before, _ids_copy(inputs), f"micro-batch {recorder.calls}")
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
                with _quiet(), heap_frozen():  # train() begins with a full gc.collect()
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
        _put_gradient_state(self.gradient_state)
        for name in ("optimizer", "lr_scheduler", "state", "control", "model_wrapped"):
            if name in self.attributes:
                setattr(self.trainer, name, self.attributes[name])
        accelerator = getattr(self.trainer, "accelerator", None)
        for name in ("_models", "_optimizers", "_schedulers", "_dataloaders"):
            items = getattr(accelerator, name, None)
            if isinstance(items, list):
                items.clear()
        # evaluate() marks the model prepared (_is_accelerate_prepared) without wrapping it in DDP;
        # left marked, the next train() under torchrun would skip the wrapping and never sync
        for name in set(vars(self.model)) - set(self.model_attributes):
            delattr(self.model, name)
        for name, value in self.model_attributes.items():
            if name.startswith("_is_accelerate") and getattr(self.model, name, None) is not value:
                setattr(self.model, name, value)

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
            return [_converter(None)(b, i) for i, b in enumerate(_take(loader, count * 64, "the Trainer's train dataloader"))]
        finally:
            self.trainer.train_dataset = dataset

    def data_order(self) -> Result:
        with _quiet():
            loader = self.trainer.get_train_dataloader()
        epochs = [_epoch_keys(_at_epoch(loader, epoch), _converter(None)) for epoch in range(2)]
        return _data_order(epochs, _dataset_keys(self.trainer.train_dataset))

    def distributed_checks(self, batch: Any) -> list[Result]:
        """Under torchrun: the Trainer's gradients and parameters the same on every rank at each
        of a few steps of its own train(), its ranks' shares of each epoch, and their dropout."""
        from lmcheck import distributed

        watch = distributed._SyncWatch(self.model)
        with watch.active():
            self.run(3, phase="ranks")
        self.snapshot.restore()
        with _quiet():
            loader = self.trainer.get_train_dataloader()
        return [watch.result(), distributed.data_sharding(lambda epoch: _at_epoch(loader, epoch)),
                distributed.rank_randomness(self.model, batch)]

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


def _gradient_state() -> dict[str, Any]:
    """accelerate's GradientState, shared by every Accelerator of the process: train() stopped
    mid-epoch leaves its dataloader registered (and, at an epoch's end, ``end_of_dataloader``
    set, which makes a later ``accelerator.accumulate`` sync at every micro-batch) and its
    accumulation steps changed."""
    from accelerate.state import GradientState

    return {k: list(v) if isinstance(v, list) else v for k, v in GradientState._shared_state.items()}


def _put_gradient_state(saved: dict[str, Any]) -> None:
    from accelerate.state import GradientState

    GradientState._shared_state.clear()
    GradientState._shared_state.update({k: list(v) if isinstance(v, list) else v for k, v in saved.items()})


def _at_epoch(loader: Any, epoch: int) -> Any:
    """The Trainer's dataloader set to ``epoch``, as ``Trainer.train()`` sets it."""
    for target in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        set_epoch = getattr(target, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
    return loader


def _is_trainer(value: object) -> bool:
    from transformers import Trainer

    return isinstance(value, Trainer)


# ---------------------------------------------------------------- the battery


def _battery(
    driver: Any, lm_batches: list[dict[str, torch.Tensor]], *, tokenizer: Any, schedule: Any,
    max_grad_norm: float | None, pretrained: bool | None, evaluate: Any, expect_eos: bool | None,
    steps: int, overfit_batches: int, overfit_steps: int, check_every: int, setup: dict[str, Any],
    collated: tuple[list[str], int, int], collator: Any = None,
) -> list[Result]:
    """The checks both entry points share: batches, loss, a short run (gradients, updates,
    accumulation, schedule) and an overfitting run."""
    model = driver.model
    special = special_ids(tokenizer, collator, model)
    setup["eos and BOS from"] = special.source
    try:
        results = _batch_checks(lm_batches, special, expect_eos)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 -- both batch checks' outcome, said in full
        results = [Result.from_exception(n, error) for n in ("batch_supervision", "causal_batch")]
    results.append(_finite_or_fail("loss_at_init", lambda: _loss_at_init(model, lm_batches[0], pretrained)))
    if not any(supervised_count(b) for b in lm_batches):
        # the root cause, said once by batch_supervision: what needs supervised tokens cannot run
        results += [Result.not_applicable(n, UNSUPERVISED) for n in ("loss_matches_reference", "gradient_flow",
                                                                    "params_update", "accumulation", "overfits")]
        recorder, _, _ = driver.run(min(steps, 3), phase="first steps", dropout=False)
        results.append(_finite_or_fail("lr_schedule", lambda: _lr_schedule(recorder.steps, driver, schedule)))
        results.append(_finite_or_fail("inputs_unchanged", lambda: _inputs_unchanged(driver.changed_inputs, collated)))
        return results
    labelled = next((b for b in lm_batches if "labels" in b), None)
    results.append(_finite_or_fail("loss_matches_reference",
                                   lambda: loss_matches_reference(model, _labels_form(labelled)))
                   if labelled is not None else
                   Result.not_applicable("loss_matches_reference", "the batches carry next-token targets, "
                                         "not labels, so the model's own loss is not called"))
    # the short run: the user's steps, dropout off so that the reference can repeat the forward
    extra = {"unequal": True} if isinstance(driver, _TrainerDriver) else {}
    recorder, losses, used = driver.run(steps, grad_steps=1, flag_steps=steps, phase="first steps",
                                        dropout=False, **extra)
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
    results.append(_finite_or_fail("gradient_flow", lambda: _gradient_flow(model, recorder.steps, driver.snapshot)))
    # the parameters as the run left them, before the accumulation check restores the saved ones
    left = {n: p.detach() for n, p in model.named_parameters()}
    results.append(_finite_or_fail("params_update", lambda: _params_update(model, driver.snapshot, left,
                                                                          len(recorder.steps))))
    rtol = getattr(driver, "gradient_rtol", None)
    accumulation = _finite_or_fail("accumulation", lambda: _accumulation(model, driver.snapshot, step_batches,
                                                                         first, max_grad_norm, rtol))
    results.append(accumulation)
    results.append(_finite_or_fail("lr_schedule", lambda: _lr_schedule(recorder.steps, driver, schedule)))
    # the overfitting run: a handful of batches, the user's step at their schedule's peak rate
    peaks = _peak_lrs(recorder.steps, driver.snapshot, driver.scheduler)
    summed = _sums_micro_batches([losses[i] for i in calls], accumulation.metrics.get("reference_loss"))
    setup["overfitting learning rate"] = "peak of the schedule" if peaks is not None else "the schedule's"
    results.append(_finite_or_fail("overfits", lambda: _overfit(
        driver, driver.overfit_batches(overfit_batches), overfit_steps, check_every, peaks, summed)))
    # after both runs (the first run's collator, made to give unequal lengths, copies the labels)
    results.append(_finite_or_fail("inputs_unchanged", lambda: _inputs_unchanged(driver.changed_inputs, collated)))
    return results


# What a check's failure can follow from: where one of these failed too, the failure is marked
# as following from the first of them, which leads (SetupReport.failures, the CLI, Markdown).
_FOLLOWS: dict[str, tuple[str, ...]] = {
    "inputs_unchanged": ("batch_supervision",),  # labels aliasing the inputs: one cause, two signs
    "params_update": ("gradient_flow", "lr_schedule"),
    "accumulation": ("batch_supervision", "loss_matches_reference", "gradient_flow"),
    "overfits": ("batch_supervision", "causal_batch", "loss_matches_reference", "gradient_flow", "params_update",
                 "accumulation", "lr_schedule"),
    "reproducible": ("gradient_flow",),
}


def _root_causes_first(results: list[Result]) -> list[Result]:
    failed = {r.name for r in results if r.status == "fail"}
    out = []
    for result in results:
        cause = next((c for c in _FOLLOWS.get(result.name, ()) if c in failed), None)
        if result.status == "fail" and cause is not None:
            result = dataclasses.replace(result, metrics={**result.metrics, "follows_from": cause},
                                         explanation=f"follows from {cause}, which failed first: {result.explanation}")
        out.append(result)
    return out


def _unsupervised(results: list[Result]) -> str | None:
    """The reason the battery gave where the batches supervise nothing, else None."""
    return UNSUPERVISED if any(r.skip_reason == UNSUPERVISED for r in results) else None


def _finite_or_fail(name: str, check: Callable[[], Result]) -> Result:
    """The check's result, isolated: its failure where a model output it reads is NaN or Inf
    (the message says which output and where), an ``error`` result where it raised anything
    else, so that one check never loses the report. An InputError (the setup itself is unfit:
    a streaming train set, a bad option) still stops the checks with its message."""
    try:
        return check()
    except NonFiniteError as error:
        return non_finite_result(name, str(error))
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 -- the check's outcome, with the exception and where
        return Result.from_exception(name, error)


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
