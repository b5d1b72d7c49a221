"""The setup checks on a ``transformers.Trainer``: :func:`check_trainer` and the driver that runs
the Trainer's own ``train()`` for a few steps, watched, and then undoes it: the Trainer's
attributes and callbacks, accelerate's shared state and marks, the model, its optimizer and
scheduler and the random generators are put back, and nothing is written to its output folder."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_callback import TrainerCallback

from lmcheck._allocator import heap_frozen
from lmcheck._model import IGNORE_INDEX, no_dropout, parameter_dtype
from lmcheck._recording import Recorder, Snapshot
from lmcheck._validate import check_bool, check_callable, check_factory, check_model, describe
from lmcheck.curves import LossCurve
from lmcheck.errors import InputError, LmcheckError
from lmcheck.recipes import SetupBudget
from lmcheck.results import Result
from lmcheck.rl import trainer_importance_ratio
from lmcheck.setup.batches import (
    Collated,
    call_rebuild,
    collating_problems,
    converter,
    ids_copy,
    loss_value,
    note_changed_ids,
    packing_of,
    supervision_of,
    take,
)
from lmcheck.setup.battery import (
    SETUP_CHECKS,
    FirstStep,
    Progress,
    Run,
    first_step_hook,
    run_battery,
)
from lmcheck.setup.gradients import GRADIENT_RTOL
from lmcheck.setup.order import Epochs, dataset_keys, epoch_keys
from lmcheck.setup.preference import Preference, is_preference_trainer
from lmcheck.setup.report import SetupReport
from lmcheck.setup.resume import Plan, Resumable, RunWatch, Trace, plan_for

__all__ = ["check_trainer", "is_rl_trainer", "is_trainer", "rl_report"]


def check_trainer(
    trainer: Any, *, pretrained: bool | None = None, rebuild: Callable[[int], Any] | None = None,
    steps: int | None = None, overfit_batches: int | None = None, overfit_steps: int | None = None,
    check_every: int | None = None, expect_eos: bool | None = None, progress: Progress | None = None,
    factory: str | None = None, packed: bool = False,
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
    order and dropout, not the initialisation of the model, which is built already). It is also
    what the ``resume`` check resumes on: the Trainer's own checkpoint, saved into a temporary
    folder, loaded by a Trainer ``rebuild(args.seed)`` builds, with
    ``train(resume_from_checkpoint=...)``; without ``rebuild`` that check is not applicable.
    ``factory``, the ``package.module:function`` that builds the Trainer, sends each resumed run
    to a fresh Python process (``lmcheck train-check`` and ``--lmcheck-trainer`` pass it).
    A ``DataCollatorWithFlattening``, TRL's padding-free collator and TRL's ``packing`` say the
    rows are packed, as ``packed=True`` does. The other arguments are
    :func:`~lmcheck.setup.check_loop`'s; every one is checked before the Trainer is touched.
    """
    budget = SetupBudget.of(steps=steps, overfit_batches=overfit_batches, overfit_steps=overfit_steps,
                            check_every=check_every)
    if not is_trainer(trainer):
        raise InputError(f"'trainer' must be a transformers.Trainer (got {describe(trainer)})")
    if trainer.train_dataset is None:
        raise InputError("'trainer' must have a train_dataset to check (got None)")
    for argument, value in (("rebuild", rebuild), ("progress", progress)):
        if value is not None:
            check_callable(value, argument, "a function")
    if factory is not None:
        check_factory(factory)
    check_model(trainer.model, "trainer.model")
    check_bool(packed, "packed")
    if is_rl_trainer(trainer):
        return rl_report(trainer)
    driver = TrainerDriver(trainer, budget, progress, rebuild, factory)
    return run_battery(driver, budget, pretrained=pretrained, expect_eos=expect_eos,
                       packing=packing_of(trainer.data_collator, trainer.args, packed),
                       supervision=supervision_of(trainer.args, trainer.train_dataset))


def is_trainer(value: object) -> bool:
    """A ``transformers.Trainer`` or a subclass (TRL's among them), told by its classes' names, so
    that asking never imports the Trainer."""
    return any(c.__module__ == "transformers.trainer" and c.__name__ == "Trainer" for c in type(value).__mro__)


def is_rl_trainer(trainer: object) -> bool:
    """A TRL trainer that samples its completions inside its step and computes their log-probs
    for the update (``GRPOTrainer``, ``RLOOTrainer``), told by its classes' names."""
    return any(c.__module__.startswith("trl") and c.__name__ in ("GRPOTrainer", "RLOOTrainer")
               for c in type(trainer).__mro__)


# why the rest of the battery does not run on an RL trainer, said in each of its rows
RL_ONLY = ("an RL trainer's batches are prompts and its completions are sampled inside its step, so lmcheck's "
           "batch, loss and update checks do not apply to it as they are; its step 0 is checked by importance_ratio")


def rl_report(trainer: Any) -> SetupReport:
    """An RL trainer's report: ``importance_ratio`` (:func:`lmcheck.rl.trainer_importance_ratio`)
    judged, every other row not applicable with the reason."""
    started = time.perf_counter()
    judged = trainer_importance_ratio(trainer)
    seconds = round(time.perf_counter() - started, 3)
    results = [judged if name == "importance_ratio" else Result.not_applicable(name, RL_ONLY) for name in SETUP_CHECKS]
    setup = {"kind": f"TRL {type(trainer).__name__}", "model": type(trainer.model).__name__,
             "sampling": judged.metrics.get("settings", "?"), "seed": trainer.args.seed}
    return SetupReport(results=results, curve=LossCurve(), setup=setup,
                       costs={"importance_ratio": {"seconds": seconds, "optimizer_steps": 0}})


class TrainerState:
    """What a Trainer's ``train()`` and ``evaluate()`` change outside the model, saved when made and
    put back by :meth:`restore`: the Trainer's attributes and callbacks, accelerate's shared
    gradient state, the lists of its Accelerator and the marks it leaves on the model."""

    def __init__(self, trainer: Any) -> None:
        self.trainer, self.model = trainer, trainer.model
        self.attributes = dict(vars(trainer))
        self.model_attributes = dict(vars(trainer.model))  # accelerate marks a model it has prepared
        self.callbacks = list(trainer.callback_handler.callbacks)
        self.gradient_state = _gradient_state()

    def after_run(self) -> None:
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
        model = self.model
        for name in set(vars(model)) - set(self.model_attributes):
            delattr(model, name)
        for name, value in self.model_attributes.items():
            if name.startswith("_is_accelerate") and getattr(model, name, None) is not value:
                setattr(model, name, value)

    def restore(self) -> None:
        self.after_run()
        vars(self.trainer).clear()
        vars(self.trainer).update(self.attributes)
        self.trainer.callback_handler.callbacks[:] = self.callbacks


class TrainerDriver:
    """Runs a Trainer's own ``train()`` for a few steps, watched and then undone."""

    def __init__(self, trainer: Any, budget: SetupBudget, progress: Progress | None,
                 rebuild: Callable[[int], Any] | None = None, factory: str | None = None) -> None:
        self.trainer, self.model, self.progress, self.rebuild = trainer, trainer.model, progress, rebuild
        self.factory = factory
        self.saved = TrainerState(trainer)
        self.snapshot = Snapshot(self.model, tuple(x for x in (trainer.optimizer, trainer.lr_scheduler)
                                                   if x is not None))
        self.calls = min(budget.steps, 3)  # the first losses the reproducibility check compares
        self.overfit_examples = 0  # set by overfit_batches
        mixed = bool(trainer.args.bf16 or trainer.args.fp16)  # autocast: the user's side is rounded more
        self.gradient_rtol = GRADIENT_RTOL[torch.bfloat16] if mixed else None
        self.max_grad_norm: float | None = 0.0  # the first run does not clip
        self.schedule: Callable[[int], float] | None = None
        self.tokenizer, self.collator = trainer.processing_class, trainer.data_collator
        self.curve = LossCurve()
        self.changed_inputs: list[str] = []
        self.seen: list[dict[str, torch.Tensor]] = []  # the first run's micro-batches (64 at most)
        self.scheduler: Any = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)
        try:
            self.loader_batches = self._first_batches(max(budget.overfit_batches, 8))
        except BaseException:
            self.restore()
            raise
        self.lm_batches = [converter(None)(b, i) for i, b in enumerate(self.loader_batches)]
        self.preference = Preference(trainer, self.loader_batches[0]) if is_preference_trainer(trainer) else None
        args = trainer.args
        self.setup: dict[str, Any] = {
            "kind": f"transformers {type(trainer).__name__}", "model": type(self.model).__name__,
            "dtype": str(parameter_dtype(self.model)).replace("torch.", ""),
            "per-device batch": args.per_device_train_batch_size,
            "gradient accumulation": args.gradient_accumulation_steps, "learning rate": args.learning_rate,
            "scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "max grad norm": args.max_grad_norm, "seed": args.seed,
        }
        if args.bf16 or args.fp16:  # the Trainer's autocast, for the precision check
            self.setup["mixed precision"] = "bf16" if args.bf16 else "fp16"

    def restore(self) -> None:
        self.snapshot.restore()
        self.saved.restore()

    def _first_batches(self, count: int) -> list[Any]:
        with quiet():
            return take(self.trainer.get_train_dataloader(), count, "the Trainer's train dataloader")

    def _arguments(self, output_dir: str, **changes: Any) -> contextlib.AbstractContextManager[None]:
        return lmcheck_arguments(self.trainer, output_dir, self.saved.callbacks, **changes)

    def run(self, steps: int, *, phase: str, first: bool = False, batches: Sequence[int] | None = None,
            peak_lrs: tuple[float, ...] | None = None, after_step: Callable[[int], bool] | None = None,
            on_first_step: FirstStep | None = None, seed: int | None = None) -> Run:
        """``trainer.train()`` from the saved state until ``steps`` optimizer steps; ``batches``
        (indices into the overfitting batches) limits the train set to their examples; ``seed``
        replaces ``args.seed`` and seeds the generators with it. The first run turns clipping and
        label smoothing off and gives its micro-batches unequal lengths."""
        self.snapshot.restore()
        trainer = self.trainer
        for name in ("optimizer", "lr_scheduler"):
            setattr(trainer, name, self.saved.attributes[name])
        run = Run([], [], [])
        self.seen = []
        recorder = Recorder(self.model, grad_steps=0, seen_steps=int(first), flag_steps=steps if first else 0,
                            peak_lrs=peak_lrs, on_first_sight=self._first_sight,
                            at_first_step=first_step_hook(on_first_step, partial(self.step_batches, run)))
        run.steps = recorder.steps
        changes = _changes(steps, first, batches, seed)
        quiet_dropout = no_dropout(self.model) if first else contextlib.nullcontext()
        with tempfile.TemporaryDirectory(prefix="lmcheck-setup-") as output_dir, \
                self._arguments(output_dir, **changes), recorder.active(), quiet_dropout, \
                self._swapped(recorder, run, first, batches):
            trainer.callback_handler.callbacks.append(_Stop(recorder, steps, phase, after_step, self.progress))
            if seed is not None:
                from transformers.trainer_utils import set_seed

                set_seed(seed)  # what the Trainer's constructor does with args.seed (the model is built already)
            try:
                with quiet(), heap_frozen():  # train() begins with a full gc.collect()
                    trainer.train()
            except LmcheckError:
                raise
            except Exception as error:  # the user's Trainer, model or data: named, traceback chained
                raise InputError(f"'trainer': its train() raised {type(error).__name__} while lmcheck ran "
                                 f"{steps} steps ({phase}): {error}") from error
        self.saved.after_run()
        run.batches = list(range(len(run.losses)))
        return run

    @contextlib.contextmanager
    def _swapped(self, recorder: Recorder, run: Run, first: bool, batches: Sequence[int] | None) -> Iterator[None]:
        """The Trainer with lmcheck's training step (it records each micro-batch and its loss), the
        overfitting examples as its train set where ``batches``, and for the first run no label
        smoother and a collator giving unequal lengths; all put back afterwards."""
        trainer = self.trainer
        dataset, collator, smoother = trainer.train_dataset, trainer.data_collator, trainer.label_smoother
        trainer.training_step = self._recording_step(recorder, run, keep=first)
        if batches is not None:
            # the examples overfit_batches collated: under DDP each rank holds only its share of them
            trainer.train_dataset = subset(dataset, self.overfit_examples or
                                           len(batches) * trainer.args.per_device_train_batch_size)
        if first:  # the update is compared with plain, unclipped cross-entropy
            trainer.label_smoother = None
            trainer.data_collator = unequal_lengths(collator)
        try:
            yield
        finally:
            trainer.train_dataset, trainer.data_collator, trainer.label_smoother = dataset, collator, smoother
            del trainer.training_step

    def _recording_step(self, recorder: Recorder, run: Run, *, keep: bool) -> Callable[..., Any]:
        """The Trainer's training step, counted, its loss and changes to its ids noted; with
        ``keep``, its first 64 micro-batches copied (the first step's check reads them)."""
        original = self.trainer.training_step
        changed, seen = self.changed_inputs, self.seen

        def training_step(model: Any, inputs: Any, *rest: Any, **kwargs: Any) -> Any:
            recorder.calls += 1
            if keep and len(seen) < 64:
                seen.append({k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
            before = ids_copy(inputs)
            loss = original(model, inputs, *rest, **kwargs)
            note_changed_ids(changed, before, ids_copy(inputs), f"micro-batch {recorder.calls}")
            run.losses.append(loss_value(loss, f"the Trainer's training step {recorder.calls}"))
            return loss

        return training_step

    def _first_sight(self, optimizer: torch.optim.Optimizer) -> None:
        self.snapshot.add(optimizer)
        scheduler = self.trainer.lr_scheduler
        scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper
        if scheduler is not None and self.scheduler is not scheduler:
            self.scheduler = scheduler  # created by train(): saved before its first step
            self.snapshot.add(scheduler)

    def step_batches(self, run: Run, calls: range) -> list[dict[str, torch.Tensor]]:
        return [self.seen[i] for i in calls]

    def collating(self) -> Collated:
        """The train set's first examples against what ``trainer.data_collator`` makes of them,
        after the Trainer's own removal of the columns the model's forward does not take."""
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

        with quiet():
            return collating_problems(dataset, trainer.data_collator, columns)

    def overfit_batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        """The first ``count`` batches' worth of examples, collated by the Trainer's own dataloader."""
        dataset = self.trainer.train_dataset
        self.overfit_examples = count * self.trainer.args.per_device_train_batch_size
        self.trainer.train_dataset = subset(dataset, self.overfit_examples)
        try:
            with quiet():
                loader = self.trainer.get_train_dataloader()
            return [converter(None)(b, i) for i, b in enumerate(take(loader, count * 64, "the Trainer's train dataloader"))]
        finally:
            self.trainer.train_dataset = dataset

    def epochs(self) -> Epochs:
        with quiet():
            loader = self.trainer.get_train_dataloader()
        passes = tuple(epoch_keys(at_epoch(loader, epoch), converter(None)) for epoch in range(2))
        return Epochs(passes=passes, dataset=dataset_keys(self.trainer.train_dataset))

    def seeding(self) -> tuple[int, str] | str:
        return int(self.trainer.args.seed), "rebuilt with" if self.rebuild is not None else "args.seed"

    def first_losses(self, seed: int) -> list[float]:
        if self.rebuild is None:
            return self.run(self.calls, seed=seed, phase="reproducibility").losses
        built = call_rebuild(self.rebuild, seed)
        if not is_trainer(built):
            raise InputError(f"'rebuild' must return a transformers.Trainer (got {describe(built)})")
        other = TrainerDriver(built, SetupBudget(steps=self.calls), None)
        try:
            return other.run(self.calls, phase="reproducibility").losses
        finally:
            other.restore()

    def evaluate_twice(self) -> tuple[list[float], str] | str:
        trainer = self.trainer
        dataset = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
        if isinstance(dataset, Mapping):
            dataset = next(iter(dataset.values()))
        part = subset(dataset, 2 * trainer.args.per_device_eval_batch_size)
        precomputed = [c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in (getattr(part, "column_names", None) or ())]
        if precomputed:  # TRL's DPO evaluate() precomputes them for a dataset it is given, and refuses one that has them
            part = part.remove_columns(precomputed)
        self.snapshot.restore()
        losses = []
        with tempfile.TemporaryDirectory(prefix="lmcheck-setup-") as output_dir, self._arguments(output_dir):
            for _ in range(2):
                with quiet():
                    metrics = trainer.evaluate(eval_dataset=part)
                losses.append(metrics.get("eval_loss"))
        self.saved.after_run()
        if any(not isinstance(v, (int, float)) for v in losses):
            return f"Trainer.evaluate() returned no eval_loss (got {losses[0]!r})"
        return [float(v) for v in losses], "Trainer.evaluate()"

    def rank_checks(self) -> list[Result]:
        """Under torchrun: the Trainer's gradients and parameters the same on every rank at each
        of a few steps of its own train(), its ranks' shares of each epoch, and their dropout."""
        from lmcheck.setup import distributed

        watch = distributed.SyncWatch(self.model)
        with watch.active():
            self.run(3, phase="ranks")
        self.snapshot.restore()
        with quiet():
            loader = self.trainer.get_train_dataloader()
        return [watch.result(), distributed.data_sharding(lambda epoch: at_epoch(loader, epoch)),
                distributed.rank_randomness(self.model, self.loader_batches[0])]

    def resumable(self) -> Resumable | str:
        if self.rebuild is None:
            return ("no rebuild(seed) was given, so no Trainer can be built afresh to resume from the checkpoint "
                    "(pass rebuild=lambda seed: make_trainer(seed), or name a function taking a seed to "
                    "lmcheck train-check)")
        return TrainerResume(self.trainer, self.rebuild, factory=self.factory, driver=self)


class TrainerResume:
    """The runs of the ``resume`` check on a Trainer: its own ``train()``, its own checkpoints
    (``save_strategy`` aside, as the user's arguments make them: ``save_only_model``,
    safetensors), resumed with ``train(resume_from_checkpoint=...)`` on a Trainer
    ``rebuild(args.seed)`` builds. The train set is cut to ``2k + 1`` micro-batches per rank, so
    that an epoch ends within a few steps and, with accumulation, on a partial one. The straight
    run and the first half run on the user's Trainer (``driver``), put back after each."""

    kind = "trainer"

    def __init__(self, trainer: Any, rebuild: Callable[[int], Any], *, factory: str | None,
                 driver: TrainerDriver | None = None) -> None:
        self.trainer, self.rebuild, self.factory, self.driver = trainer, rebuild, factory, driver

    def plan(self) -> Plan | str:
        trainer = self.trainer
        args = trainer.args
        k = max(1, int(args.gradient_accumulation_steps))
        dataset = trainer.train_dataset
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            return (f"the train set is not map-style ({describe(dataset)}), so it cannot be cut to a few steps "
                    f"per epoch for the resumes")
        examples = (2 * k + 1) * int(args.per_device_train_batch_size) * max(1, int(args.world_size))
        trainer.train_dataset = subset(dataset, examples)
        try:
            with quiet():
                epoch_calls = len(trainer.get_train_dataloader())
            examples = len(trainer.train_dataset)
        finally:
            trainer.train_dataset = dataset
        return plan_for(epoch_calls, k, int(args.seed), examples=examples)

    def straight(self, plan: Plan) -> Trace:
        with tempfile.TemporaryDirectory(prefix="lmcheck-resume-") as output_dir:
            return self._run(self.trainer, plan, start=0, stop=plan.steps, keep=plan.saves, output_dir=output_dir)

    def first_half(self, plan: Plan, folder: Path) -> Trace:
        return self._run(self.trainer, plan, start=0, stop=plan.saves[-1], keep=plan.saves, output_dir=str(folder),
                         save=True)

    def resumed(self, plan: Plan, step: int, folder: Path) -> Trace:
        built = call_rebuild(self.rebuild, plan.seed)
        if not is_trainer(built):
            raise InputError(f"'rebuild' must return a transformers.Trainer (got {describe(built)})")
        saved = TrainerState(built)
        try:
            with tempfile.TemporaryDirectory(prefix="lmcheck-resume-") as output_dir:
                return self._run(built, plan, start=step, stop=plan.steps, keep=(step,), output_dir=output_dir,
                                 resume_from=str(folder / f"checkpoint-{step}"))
        finally:
            saved.after_run()

    def _run(self, trainer: Any, plan: Plan, *, start: int, stop: int, keep: Sequence[int], output_dir: str,
             save: bool = False, resume_from: str | None = None) -> Trace:
        """The Trainer's own train() on the cut train set to optimizer step ``stop``, a checkpoint
        saved at each step of ``keep`` where ``save``; dropout as the user has it."""
        driver = self.driver if trainer is self.trainer else None  # the user's Trainer: put back after
        if driver is not None:
            driver.snapshot.restore()
            for name in ("optimizer", "lr_scheduler"):
                setattr(trainer, name, driver.saved.attributes[name])

        def others() -> list[tuple[str, Any]]:
            scheduler = trainer.lr_scheduler
            return [("scheduler", getattr(scheduler, "scheduler", scheduler)),
                    ("grad scaler", getattr(trainer.accelerator, "scaler", None))]

        watch = RunWatch(trainer.model, start=start, capture=keep, others=others)
        original, dataset = trainer.training_step, trainer.train_dataset
        convert = converter(None)

        def training_step(model: Any, inputs: Any, *rest: Any, **kwargs: Any) -> Any:
            watch.begin_call(convert(inputs, watch.calls))
            loss = original(model, inputs, *rest, **kwargs)
            watch.end_call(loss_value(loss, f"the Trainer's training step {watch.calls}"))
            return loss

        changes = {"max_steps": max(int(trainer.args.max_steps), plan.steps), "save_total_limit": None}
        callbacks = list(trainer.callback_handler.callbacks)
        trainer.training_step, trainer.train_dataset = training_step, subset(dataset, plan.examples or len(dataset))
        try:
            with lmcheck_arguments(trainer, output_dir, callbacks, **changes), watch.active():
                trainer.callback_handler.callbacks.append(_Resume(watch, stop, keep if save else ()))
                try:
                    with quiet(), heap_frozen():
                        trainer.train(resume_from_checkpoint=resume_from)
                except LmcheckError:
                    raise
                except Exception as error:  # the user's Trainer, model or data: named, traceback chained
                    raise InputError(f"'trainer': its train() raised {type(error).__name__} in the resume check "
                                     + (f"(resuming from {os.path.basename(resume_from)})" if resume_from else "")
                                     + f": {error}") from error
        finally:
            trainer.train_dataset = dataset
            if "training_step" in vars(trainer):
                del trainer.training_step
            if driver is not None:
                driver.saved.after_run()
        return watch.trace


class _Resume(TrainerCallback):
    """Saves a checkpoint at each step of ``saves`` and stops at ``stop`` (after its save, where
    it saves there: a stop set before the save would be saved with it, and a resume from that
    checkpoint would stop at once); keeps the state at the end of a run that does not save."""

    def __init__(self, watch: RunWatch, stop: int, saves: Sequence[int]) -> None:
        self.watch, self.stop, self.saves = watch, stop, tuple(saves)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step in self.saves:
            control.should_save = True
        if state.global_step >= self.stop and state.global_step not in self.saves:
            if not self.saves:
                self.watch.keep_state(state.global_step)
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= self.stop:
            control.should_training_stop = True


@contextlib.contextmanager
def lmcheck_arguments(trainer: Any, output_dir: str, callbacks: list[Any], **changes: Any) -> Iterator[None]:
    """The Trainer's arguments for lmcheck's runs: outputs to ``output_dir``, no saving (but
    where a callback of lmcheck's asks for it), evaluation, logging or hub, and only the flow
    callback (the user's own, early stopping, logging, their state, are not part of the update
    and must not count lmcheck's steps); its arguments and ``callbacks`` put back after."""
    from transformers.trainer_callback import DefaultFlowCallback
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    original = trainer.args
    fields = {f.name for f in dataclasses.fields(original)}
    updates = {"output_dir": output_dir, "logging_dir": os.path.join(output_dir, "logs"),
               "save_strategy": SaveStrategy.NO, "eval_strategy": IntervalStrategy.NO,
               "logging_strategy": IntervalStrategy.NO, "report_to": [], "disable_tqdm": True,
               "load_best_model_at_end": False, "push_to_hub": False, "dataloader_num_workers": 0,
               "dataloader_persistent_workers": False, **changes}
    handler = trainer.callback_handler
    flow = [c for c in handler.callbacks if isinstance(c, DefaultFlowCallback)] or [DefaultFlowCallback()]
    try:
        changed = copy.copy(original)  # dataclasses.replace would rerun __post_init__, which resets accelerate
        for key, value in updates.items():
            if key in fields:
                setattr(changed, key, value)
        trainer.args = changed
        handler.callbacks[:] = flow
        yield
    finally:
        trainer.args = original
        handler.callbacks[:] = callbacks


def _changes(steps: int, first: bool, batches: Sequence[int] | None, seed: int | None) -> dict[str, Any]:
    """The Trainer arguments one run changes: its step budget where it trains on chosen batches,
    clipping and label smoothing off for the first, the seed for a reproducibility run."""
    changes: dict[str, Any] = {"max_steps": steps} if batches is not None else {}
    if first:
        changes.update(max_grad_norm=0.0, label_smoothing_factor=0.0)
    if seed is not None:
        changes.update(seed=seed, data_seed=seed)
    return changes


class _Stop(TrainerCallback):
    """Stops ``train()`` after ``steps`` optimizer steps, or where ``after_step(n)`` says so."""

    def __init__(self, recorder: Recorder, steps: int, phase: str, after_step: Callable[[int], bool] | None,
                 progress: Progress | None) -> None:
        self.recorder, self.steps, self.phase, self.after_step, self.progress = recorder, steps, phase, after_step, progress

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        taken = len(self.recorder.steps)
        if self.progress is not None:
            self.progress(self.phase, taken, self.steps)
        stop = self.after_step is not None and self.after_step(taken)
        if stop or taken >= self.steps:
            control.should_training_stop = True


def subset(dataset: Any, count: int) -> Any:
    """The first ``count`` examples of a map-style dataset (a Trainer's train or eval set)."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise InputError(f"the Trainer's dataset must be map-style (with len() and indexing) for the "
                         f"overfitting and evaluation runs, which take its first examples (got "
                         f"{describe(dataset)}; a streaming dataset can be cut with .take(n) and "
                         f"turned into one with datasets.Dataset.from_list(list(...)))")
    count = max(1, min(count, len(dataset)))
    if hasattr(dataset, "select"):
        return dataset.select(range(count))
    return torch.utils.data.Subset(dataset, range(count))


def unequal_lengths(collator: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The collator, then fewer supervised positions in some batches than others (the later
    labels set to -100), so that micro-batches of one step hold unequal token counts."""
    counter = [0]

    def collate(examples: Any) -> Any:
        batch = collator(examples)
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] > 4:
            # each row keeps the first quarter, half, three quarters or all of its supervised
            # positions (at least one): a completion-only row keeps part of its completion
            share = 1 + counter[0] % 4
            supervised = labels != IGNORE_INDEX
            supervised[:, 0] = False  # never a target
            rank = supervised.long().cumsum(dim=1)  # (B, T) the how-many-th supervised position
            keep = (supervised.sum(dim=1, keepdim=True) * share // 4).clamp(min=1)  # (B, 1)
            labels = labels.clone()
            labels[supervised & (rank > keep)] = IGNORE_INDEX
            batch["labels"] = labels
        counter[0] += 1
        return batch

    return collate


def at_epoch(loader: Any, epoch: int) -> Any:
    """The Trainer's dataloader set to ``epoch``, as ``Trainer.train()`` sets it."""
    for target in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        set_epoch = getattr(target, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
    return loader


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the Trainer's warnings and logs while lmcheck drives it."""
    from transformers.utils import logging as transformers_logging

    level, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # a checkpoint's "Writing model shards"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers_logging.set_verbosity(level)
        if bars:
            transformers_logging.enable_progress_bar()


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
