"""The setup checks on a plain training loop: :func:`check_loop` and the driver that calls the
user's own ``train_step`` on their batches under the optimizer-step hook."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch

from lmcheck._model import no_dropout, parameter_dtype
from lmcheck._ranks import unwrap_parallel
from lmcheck._recording import Recorder, Snapshot
from lmcheck._validate import (
    check_bool,
    check_callable,
    check_checkpoint,
    check_factory,
    check_model,
    check_number,
    describe,
)
from lmcheck.curves import LossCurve
from lmcheck.errors import InputError, LmcheckError
from lmcheck.recipes import SetupBudget
from lmcheck.results import Result
from lmcheck.setup.batches import (
    Collated,
    converter,
    epoch_batches,
    ids_copy,
    loader_collating,
    loader_state,
    loss_value,
    note_changed_ids,
    packing_of,
    put_ids_back,
    take,
    users_code,
)
from lmcheck.setup.battery import FirstStep, Progress, Run, first_step_hook, run_battery
from lmcheck.setup.order import Epochs, loop_epochs, sampled_epochs
from lmcheck.setup.report import SetupReport
from lmcheck.setup.resume import RESUME_STEPS, Plan, Resumable, RunWatch, Trace, plan_for
from lmcheck.setup.seeds import evaluate_twice, rebuilt, seeding

__all__ = ["check_loop"]

_SAMPLING = ("epochs", "with_replacement")


def check_loop(
    model: torch.nn.Module, train_step: Callable[[Any], Any],
    batches: Iterable[Any] | Callable[[int], Iterable[Any]], *, tokenizer: Any = None,
    as_batch: Callable[[Any], Mapping[str, torch.Tensor]] | None = None,
    scheduler: Any = None, schedule: Callable[[int], float] | None = None,
    max_grad_norm: float | None = None, pretrained: bool | None = None,
    evaluate: Callable[[], float] | None = None,
    rebuild: Callable[[int], Any] | None = None, seed: int = 0,
    steps: int | None = None, overfit_batches: int | None = None, overfit_steps: int | None = None,
    check_every: int | None = None, expect_eos: bool | None = None, progress: Progress | None = None,
    stateful: Sequence[Any] = (), sampling: str = "epochs",
    checkpoint: tuple[Callable[[str], Any], Callable[[str], Any]] | None = None, factory: str | None = None,
    packed: bool = False,
) -> SetupReport:
    """Run the battery on a plain training loop, and leave its objects as they were.

    Every argument is checked before any of the user's objects is touched.

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
        steps: optimizer steps of the first run (:class:`~lmcheck.setup.SetupBudget`'s default
            where None, as for the next three).
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
        checkpoint: ``(save, load)``, the loop's own checkpointing: ``save(folder)`` writes
            everything a resume needs into ``folder`` (an existing, empty folder), ``load(folder)``
            reads it into the objects of its setup, including where the data was: after it,
            ``batches`` (or ``batches(epoch)`` for the epoch the resume falls in) yields what comes
            next. With ``rebuild`` (which must return the setup's own ``checkpoint`` too), the
            ``resume`` check stops a run, saves, loads into a fresh build and compares the rest
            with a run never stopped.
        factory: the importable ``package.module:function`` that builds this setup (as
            ``lmcheck train-check`` takes it): where given, each resumed run of ``resume`` goes
            to a fresh Python process, so that state kept only in memory is caught too.
        packed: each row holds several documents that must not see each other (a packing
            collator): ``packing_equivalence`` runs each alone, finding them where the position
            ids restart, else after each eos. Rows whose position ids restart, or a
            ``DataCollatorWithFlattening`` loader, are checked without it.

    Under ``torchrun`` (an initialized process group of more than one rank), call it on every
    rank with the DDP-wrapped model: the accumulation reference is computed over every rank's
    micro-batches, the overfitting run stops on all ranks together, the distributed probes
    (:data:`lmcheck.setup.DISTRIBUTED_CHECKS`) are added, and every rank returns the same
    report, a failure on one rank naming it.
    """
    budget = SetupBudget.of(steps=steps, overfit_batches=overfit_batches, overfit_steps=overfit_steps,
                            check_every=check_every)
    check_model(model)
    check_callable(train_step, "train_step", "the user's step function: train_step(batch) -> loss")
    scheduler = _checked_options(max_grad_norm, scheduler, stateful, sampling, as_batch=as_batch,
                                 schedule=schedule, evaluate=evaluate, rebuild=rebuild, progress=progress)
    if checkpoint is not None:
        check_checkpoint(checkpoint, "checkpoint")
    if factory is not None:
        check_factory(factory)
    check_bool(packed, "packed")
    batches_of_epoch = batches if callable(batches) and not isinstance(batches, Iterable) else None
    loader = epoch_batches(batches_of_epoch, 0) if batches_of_epoch is not None else cast(Iterable[Any], batches)
    put_back = loader_state(loader)  # reading batches advances a DataLoader's generator
    try:
        driver = LoopDriver(model, train_step, loader, budget, scheduler=scheduler, stateful=tuple(stateful),
                            as_batch=as_batch, progress=progress, put_back=put_back, tokenizer=tokenizer,
                            schedule=schedule, max_grad_norm=max_grad_norm, evaluate=evaluate, rebuild=rebuild,
                            seed=seed, batches_of_epoch=batches_of_epoch, sampling=sampling,
                            checkpoint=checkpoint, factory=factory)
    except BaseException:
        put_back()
        raise
    return run_battery(driver, budget, pretrained=pretrained, expect_eos=expect_eos,
                       packing=packing_of(driver.collator, None, packed))


def _checked_options(max_grad_norm: object, scheduler: Any, stateful: object, sampling: object,
                     **functions: object) -> Any:
    """Every option of check_loop but the model, the step and the batches, checked; the torch
    scheduler inside accelerate's wrapper, where ``scheduler`` is one."""
    if max_grad_norm is not None:
        check_number(max_grad_norm, "max_grad_norm", low=0)
    for argument, value in functions.items():
        if value is not None:
            check_callable(value, argument, "a function")
    if type(scheduler).__name__ == "AcceleratedScheduler":  # accelerate's wrapper: the torch scheduler inside
        scheduler = getattr(scheduler, "scheduler", scheduler)
    if scheduler is not None and not (hasattr(scheduler, "state_dict") and hasattr(scheduler, "step")):
        raise InputError(f"'scheduler' must be a learning-rate scheduler with step() and state_dict() "
                         f"(got {describe(scheduler)})")
    if sampling not in _SAMPLING:
        raise InputError(f"'sampling' must be 'epochs' (each epoch a new order of the same examples) or "
                         f"'with_replacement' (random rows or windows drawn at each step, as nanoGPT's "
                         f"get_batch) (got {sampling!r})")
    if isinstance(stateful, (str, bytes)) or not isinstance(stateful, Sequence) or not all(
            hasattr(item, "state_dict") and hasattr(item, "load_state_dict") for item in stateful):
        raise InputError(f"'stateful' must be a list of objects with state_dict() and load_state_dict() "
                         f"(got {describe(stateful)})")
    return scheduler


class LoopDriver:
    """Runs the user's step on chosen batches under the recorder, from the saved state."""

    def __init__(self, model: torch.nn.Module, train_step: Callable[[Any], Any], loader: Iterable[Any],
                 budget: SetupBudget, *, scheduler: Any, stateful: tuple[Any, ...], as_batch: Any,
                 progress: Progress | None, put_back: Callable[[], None], tokenizer: Any = None,
                 schedule: Callable[[int], float] | None = None, max_grad_norm: float | None = None,
                 evaluate: Callable[[], float] | None = None, rebuild: Callable[[int], Any] | None = None,
                 seed: int = 0, batches_of_epoch: Callable[[int], Iterable[Any]] | None = None,
                 sampling: str = "epochs", checkpoint: tuple[Callable[[str], Any], Callable[[str], Any]] | None = None,
                 factory: str | None = None) -> None:
        """The options are check_loop's, checked there."""
        self.user_model, self.model = model, unwrap_parallel(model)
        self.train_step, self.loader, self.as_batch = train_step, loader, as_batch
        self.batches = take(loader, max(budget.steps * 8, budget.overfit_batches, 8), "batches")
        self.convert = converter(as_batch)
        self.lm_batches = [self.convert(b, i) for i, b in enumerate(self.batches[:8])]
        self.calls = max(3, min(budget.steps, 4))  # the first losses the reproducibility check compares
        self.scheduler, self.progress, self.put_back = scheduler, progress, put_back
        self.snapshot = Snapshot(self.model, ((scheduler,) if scheduler is not None else ()) + stateful)
        self.curve = LossCurve()
        self.changed_inputs: list[str] = []
        self.collator = getattr(loader, "collate_fn", None)
        self.tokenizer, self.schedule, self.max_grad_norm = tokenizer, schedule, max_grad_norm
        self.gradient_rtol: float | None = None
        self.evaluate, self.rebuild, self.seed = evaluate, rebuild, seed
        self.batches_of_epoch, self.sampling = batches_of_epoch, sampling
        self.checkpoint, self.factory = checkpoint, factory
        self.setup: dict[str, Any] = {"kind": "plain loop", "model": type(self.model).__name__,
                                      "dtype": str(parameter_dtype(self.model)).replace("torch.", ""),
                                      "batches seen": len(self.batches)}

    def run(self, steps: int, *, phase: str, first: bool = False, batches: Sequence[int] | None = None,
            peak_lrs: tuple[float, ...] | None = None, after_step: Callable[[int], bool] | None = None,
            on_first_step: FirstStep | None = None) -> Run:
        """Restore the saved state, then call ``train_step`` on the batches (cycling) until
        ``steps`` optimizer steps were taken; ``after_step(n)`` may stop the run early."""
        self.snapshot.restore()
        run = Run([], [], [])
        recorder = Recorder(self.model, grad_steps=0, seen_steps=int(first), flag_steps=steps if first else 0,
                            peak_lrs=peak_lrs, on_first_sight=self.snapshot.add,
                            at_first_step=first_step_hook(on_first_step, partial(self.step_batches, run)))
        run.steps = recorder.steps
        order = list(batches) if batches is not None else list(range(len(self.batches)))
        quiet = no_dropout(self.model) if first else contextlib.nullcontext()
        with recorder.active(), quiet:
            while len(recorder.steps) < steps:
                self._refuse_a_stuck_step(len(run.batches), len(recorder.steps), steps)
                index = order[len(run.batches) % len(order)]
                done = len(recorder.steps)
                recorder.calls += 1
                run.batches.append(index)  # before the call: the first step's check reads it
                run.losses.append(self._call(index))
                if len(recorder.steps) > done:
                    if self.progress is not None:
                        self.progress(phase, len(recorder.steps), steps)
                    if after_step is not None and after_step(len(recorder.steps)):
                        break
        return run

    @staticmethod
    def _refuse_a_stuck_step(calls: int, taken: int, wanted: int) -> None:
        """An InputError where the step took 64 calls per optimizer step wanted (64 before the first)."""
        if calls >= wanted * 64 or (not taken and calls >= 64):
            raise InputError(f"'train_step' took {calls} calls without "
                             + ("stepping an optimizer over the model's parameters" if not taken
                                else f"reaching {wanted} optimizer steps")
                             + ": it must call optimizer.step() (every k-th call where it accumulates)")

    def _call(self, index: int) -> float:
        """The user's step on batch ``index``; a change it makes to the batch's ids is noted and undone."""
        batch = self.batches[index]
        before = ids_copy(batch)
        try:
            loss = self.train_step(batch)
        except LmcheckError:
            raise
        except Exception as error:  # the user's code: reported with the batch, traceback chained
            raise InputError(f"'train_step' raised {type(error).__name__} on batch {index}: {error}") from error
        value = loss_value(loss, f"'train_step' on batch {index}")
        if before is not None and note_changed_ids(self.changed_inputs, before, ids_copy(batch), f"batch {index}"):
            put_ids_back(batch, before)  # the next call of this batch sees the user's ids
        return value

    def step_batches(self, run: Run, calls: range) -> list[dict[str, torch.Tensor]]:
        return [self.convert(self.batches[run.batches[i]], run.batches[i]) for i in calls]

    def overfit_batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        return [self.convert(b, i) for i, b in enumerate(self.batches[:count])]

    def collating(self) -> Collated:
        return loader_collating(self.loader)

    def epochs(self) -> Epochs:
        self.setup["sampling"] = self.sampling.replace("_", " ")
        if self.sampling == "epochs":
            return loop_epochs(self.loader, self.convert, self.batches_of_epoch)
        return sampled_epochs(self.batches, self.convert)

    def seeding(self) -> tuple[int, str] | str:
        return seeding(self.rebuild, self.seed)

    def first_losses(self, seed: int) -> list[float]:
        """The first losses of the setup ``rebuild(seed)`` builds: its step on its first batches."""
        built = built_loop(rebuilt(self.rebuild, seed), self.as_batch)
        taken = take(epoch_batches(built.batches, 0) if built.by_epoch else built.batches, self.calls,
                     "the rebuilt batches")
        return [loss_value(built.train_step(taken[i % len(taken)]), f"the rebuilt train_step on batch {i}")
                for i in range(self.calls)]

    def resumable(self) -> Resumable | str:
        if self.checkpoint is None:
            return ("no checkpoint=(save, load) was given: the loop's own functions that save its state to a "
                    "folder and load it back")
        if self.rebuild is None:
            return ("no rebuild(seed) was given, so a resumed run cannot be built afresh to load the "
                    "checkpoint into")
        length = len(self.loader) if isinstance(self.loader, Sized) else None
        return LoopResume(self.rebuild, self.seed, self.as_batch, factory=self.factory, epoch_calls=length,
                          calls_per_step=int(self.setup.get("micro-batches per optimizer step", 1)),
                          progress=self.progress)

    def evaluate_twice(self) -> tuple[list[float], str] | str:
        return evaluate_twice(self.model, self.lm_batches, self.evaluate)

    def rank_checks(self) -> list[Result]:
        from lmcheck.setup import distributed

        results = [distributed.grads_synchronized(self.user_model, self.train_step, self.batches)]
        results.append(distributed.data_sharding(self.batches_of_epoch, as_batch=self.as_batch)
                       if self.batches_of_epoch is not None else
                       Result.not_applicable("data_sharding", "'batches' is not a function of the epoch, so the "
                                             "ranks' epochs cannot be compared; pass lambda e: "
                                             "(sampler.set_epoch(e), loader)[1]"))
        results.append(distributed.rank_randomness(self.user_model, self.batches[0], as_batch=self.as_batch))
        return results

    def restore(self) -> None:
        self.snapshot.restore()
        self.put_back()


@dataclass
class Built:
    """A setup as ``rebuild(seed)`` made it: (model, train_step, batches[, checkpoint]) or a
    mapping with check_loop's keys."""

    model: torch.nn.Module
    train_step: Callable[[Any], Any]
    batches: Any  # an iterable of batches, or a function of the epoch (``by_epoch``)
    convert: Callable[[Any, int], dict[str, torch.Tensor]]
    checkpoint: tuple[Callable[[str], Any], Callable[[str], Any]] | None = None
    others: list[tuple[str, Any]] = field(default_factory=list)  # the scheduler and other stateful objects

    @property
    def by_epoch(self) -> bool:
        return callable(self.batches) and not isinstance(self.batches, Iterable)


def built_loop(made: Any, as_batch: Callable[[Any], Mapping[str, torch.Tensor]] | None = None) -> Built:
    """What ``rebuild(seed)`` returned, checked; its own ``as_batch`` before the one given."""
    if isinstance(made, Mapping):
        model, step, batches = made.get("model"), made.get("train_step"), made.get("batches")
        checkpoint, as_batch = made.get("checkpoint"), made.get("as_batch", as_batch)
        scheduler, stateful = made.get("scheduler"), made.get("stateful", ())
    elif isinstance(made, (tuple, list)) and len(made) >= 3:
        model, step, batches = made[:3]
        checkpoint, scheduler, stateful = (made[3] if len(made) > 3 else None), None, ()
    else:
        raise InputError(f"'rebuild' must return (model, train_step, batches), (model, train_step, batches, "
                         f"checkpoint) or a mapping with those keys (got {describe(made)})")
    model = check_model(model)
    step = check_callable(step, "train_step", "the rebuilt step function")
    if batches is None:
        raise InputError("'rebuild' returned no batches")
    if checkpoint is not None:
        check_checkpoint(checkpoint, "the rebuilt checkpoint")
    if type(scheduler).__name__ == "AcceleratedScheduler":  # accelerate's wrapper: the torch scheduler inside
        scheduler = getattr(scheduler, "scheduler", scheduler)
    others = [("scheduler", scheduler)] if scheduler is not None else []
    others += [(type(item).__name__, item) for item in stateful or ()]
    return Built(model, step, batches, converter(as_batch), checkpoint, others)


class LoopResume:
    """The runs of the ``resume`` check on a plain loop: each on a setup ``rebuild(seed)`` builds,
    the user's step called on their batches epoch after epoch, as their loop would."""

    kind = "loop"

    def __init__(self, rebuild: Callable[[int], Any], seed: int,
                 as_batch: Callable[[Any], Mapping[str, torch.Tensor]] | None, *, factory: str | None,
                 epoch_calls: int | None = None, calls_per_step: int = 1, progress: Progress | None = None) -> None:
        self.rebuild, self.seed, self.as_batch, self.factory = rebuild, seed, as_batch, factory
        self.epoch_calls, self.calls_per_step, self.progress = epoch_calls, calls_per_step, progress

    def plan(self) -> Plan | str:
        """The resume points, from the first epoch's length: its len(), or its batches counted on a
        fresh build (up to the furthest epoch end the check resumes at)."""
        calls = self.epoch_calls
        if calls is None:
            built = self._build()
            first = epoch_batches(built.batches, 0) if built.by_epoch else built.batches
            limit = RESUME_STEPS * self.calls_per_step + 1
            calls = sum(1 for _ in itertools.islice(first, limit))
            if calls == limit:
                calls = None
        return plan_for(calls, self.calls_per_step, self.seed,
                        why_unknown=f"the first epoch is longer than {RESUME_STEPS} optimizer steps")

    def straight(self, plan: Plan) -> Trace:
        return self._run(self._build(), plan, start=0, stop=plan.steps, keep=plan.saves, phase="resume: straight")

    def first_half(self, plan: Plan, folder: Path) -> Trace:
        return self._run(self._build(), plan, start=0, stop=plan.saves[-1], keep=plan.saves, save_to=folder,
                         phase="resume: first half")

    def resumed(self, plan: Plan, step: int, folder: Path) -> Trace:
        built = self._build()
        load = built.checkpoint[1] if built.checkpoint is not None else None
        if load is not None:
            _user(load, "load", str(folder / f"step-{step}"))
        return self._run(built, plan, start=step, stop=plan.steps, keep=(step,), phase=f"resume: from step {step}")

    def _build(self) -> Built:
        built = built_loop(rebuilt(self.rebuild, self.seed), self.as_batch)
        if built.checkpoint is None:
            raise InputError("'rebuild' must return the setup's checkpoint=(save, load) too (a fourth item, or "
                             "the mapping's 'checkpoint'): the resumed run loads into the objects it builds")
        return built

    def _run(self, built: Built, plan: Plan, *, start: int, stop: int, keep: Sequence[int],
             save_to: Path | None = None, phase: str) -> Trace:
        """The user's step on their batches from epoch to epoch until ``stop`` optimizer steps, a
        checkpoint saved after each step of ``keep`` where ``save_to``."""
        watch = RunWatch(built.model, start=start, capture=keep, others=lambda: built.others)
        epoch = plan.epoch_after(plan.calls_at.get(start, 0))
        empty = 0
        with watch.active():
            while watch.step < stop:
                seen = 0
                for batch in (epoch_batches(built.batches, epoch) if built.by_epoch else built.batches):
                    seen += 1
                    watch.begin_call(built.convert(batch, watch.calls))
                    before = watch.step
                    watch.end_call(_user(built.train_step, "train_step", batch))
                    if watch.step > before:
                        if self.progress is not None:
                            self.progress(phase, watch.step - start, stop - start)
                        if save_to is not None and built.checkpoint is not None and watch.step in keep:
                            folder = save_to / f"step-{watch.step}"
                            folder.mkdir(parents=True, exist_ok=True)
                            _user(built.checkpoint[0], "save", str(folder))
                    if watch.step >= stop:
                        break
                    if watch.calls >= 64 * max(stop - start, 1) * plan.calls_per_step:
                        raise InputError(f"'train_step' took {watch.calls} calls without reaching optimizer step "
                                         f"{stop} ({phase})")
                empty = empty + 1 if not seen else 0
                if empty >= 2:
                    raise InputError(f"the batches yielded nothing for epochs {epoch - 1} and {epoch} ({phase}): "
                                     f"a generator is iterated once; give a DataLoader, a list, or a function of "
                                     f"the epoch")
                epoch += 1
        watch.keep_state(stop)
        return watch.trace


def _user(function: Callable[[Any], Any], what: str, argument: Any) -> Any:
    """The user's ``train_step``, ``save`` or ``load`` on ``argument`` in the resume check; a
    step's loss as a float."""
    made = users_code(f"'{what}' (in the resume check)", function, argument)
    return loss_value(made, f"'{what}'") if what == "train_step" else made
