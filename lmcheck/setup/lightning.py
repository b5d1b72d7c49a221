"""The setup checks on a PyTorch Lightning setup, through Lightning's own ``fit``.

:func:`check_lightning` takes the user's ``lightning.pytorch.Trainer``, their ``LightningModule``
and (optionally) their ``LightningDataModule``, and runs the battery of
:func:`lmcheck.setup.check_loop` on them. Each run is a ``Trainer.fit`` of the user's
module, on a Trainer made with the user's Trainer's settings (accumulation, clipping, precision,
device), stopped after the optimizer steps the check needs: so Lightning's own accumulation,
clipping, scheduler interval and precision plugin are what is checked, not a copy of its loop.
The same optimizer-step hook watches every step. The runs train on the first batches of the
user's train dataloader, read once; the user's callbacks, loggers and checkpoints sit out, and
the weights, the random generators and the module's attributes are put back afterwards.

Lightning is optional (``pip install lightning``); without it :func:`check_lightning` raises an
InputError that says so.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from lmcheck._model import hf_model, no_dropout, parameter_dtype
from lmcheck._recording import Recorder, Snapshot
from lmcheck._validate import check_bool, check_callable, describe
from lmcheck.curves import LossCurve
from lmcheck.errors import InputError, LmcheckError
from lmcheck.recipes import SetupBudget
from lmcheck.results import Result
from lmcheck.setup.batches import (
    Collated,
    converter,
    ids_copy,
    loader_collating,
    loss_value,
    note_changed_ids,
    packing_of,
    take,
)
from lmcheck.setup.battery import (
    DISTRIBUTED_CHECKS,
    FirstStep,
    Progress,
    Run,
    first_step_hook,
    run_battery,
)
from lmcheck.setup.gradients import GRADIENT_RTOL
from lmcheck.setup.order import Epochs, loop_epochs
from lmcheck.setup.report import SetupReport
from lmcheck.setup.seeds import evaluate_twice, rebuilt, seeding
from lmcheck.setup.trainer import quiet

__all__ = ["check_lightning"]


def check_lightning(
    trainer: Any, module: Any, datamodule: Any = None, *, model: torch.nn.Module | None = None,
    tokenizer: Any = None, as_batch: Callable[[Any], Mapping[str, torch.Tensor]] | None = None,
    pretrained: bool | None = None, rebuild: Callable[[int], Any] | None = None, seed: int = 0,
    steps: int | None = None, overfit_batches: int | None = None, overfit_steps: int | None = None,
    check_every: int | None = None, expect_eos: bool | None = None, progress: Progress | None = None,
    packed: bool = False,
) -> SetupReport:
    """Run the setup checks on a Lightning setup through ``Trainer.fit``, and leave it as it was.

    Args:
        trainer: the user's ``lightning.pytorch.Trainer`` (its settings are read, it is not fitted).
        module: the ``LightningModule`` whose ``training_step`` and ``configure_optimizers`` train.
        datamodule: the ``LightningDataModule`` with ``train_dataloader()``, where the module has none.
        model: the language model inside ``module`` that lmcheck's own forwards call (a Hugging
            Face model, a plain module returning logits, or one made by :func:`lmcheck.adapt`);
            default: the module's only Hugging Face model, else the module itself.
        tokenizer: as :func:`~lmcheck.setup.check_loop`.
        as_batch: as :func:`~lmcheck.setup.check_loop`.
        pretrained: as :func:`~lmcheck.setup.check_loop`.
        rebuild: ``rebuild(seed)`` returns ``(trainer, module)`` or ``(trainer, module,
            datamodule)`` built afresh, for the reproducibility check (n/a without it).
        seed: the seed given to ``rebuild``.
        steps: the budget, as :class:`~lmcheck.setup.SetupBudget`.
        overfit_batches: the budget, as :class:`~lmcheck.setup.SetupBudget`.
        overfit_steps: the budget, as :class:`~lmcheck.setup.SetupBudget`.
        check_every: the budget, as :class:`~lmcheck.setup.SetupBudget`.
        expect_eos: as :func:`~lmcheck.setup.check_loop`.
        packed: as :func:`~lmcheck.setup.check_loop`.
        progress: as :func:`~lmcheck.setup.check_loop`.
    """
    try:
        import lightning.pytorch as pl
    except ImportError as error:
        raise InputError("check_lightning needs Lightning: pip install lightning") from error
    budget = SetupBudget.of(steps=steps, overfit_batches=overfit_batches, overfit_steps=overfit_steps,
                            check_every=check_every)
    if not isinstance(trainer, pl.Trainer):
        raise InputError(f"'trainer' must be a lightning.pytorch.Trainer (got {describe(trainer)})")
    if not isinstance(module, pl.LightningModule):
        raise InputError(f"'module' must be a lightning.pytorch.LightningModule (got {describe(module)})")
    if datamodule is not None and not isinstance(datamodule, pl.LightningDataModule):
        raise InputError(f"'datamodule' must be a lightning.pytorch.LightningDataModule or None "
                         f"(got {describe(datamodule)})")
    for argument, value in (("as_batch", as_batch), ("rebuild", rebuild), ("progress", progress)):
        if value is not None:
            check_callable(value, argument, "a function")
    check_bool(packed, "packed")
    lm = _language_model(module, model)
    driver = LightningDriver(trainer, module, lm, _train_loader(module, datamodule), as_batch, progress, budget,
                             tokenizer=tokenizer, rebuild=rebuild, seed=seed)
    return run_battery(driver, budget, pretrained=pretrained, expect_eos=expect_eos,
                       packing=packing_of(driver.collator, None, packed))


def _language_model(module: torch.nn.Module, model: torch.nn.Module | None) -> torch.nn.Module:
    if model is not None:
        if not isinstance(model, torch.nn.Module) or not any(model is m for m in module.modules()):
            raise InputError(f"'model' must be the language model inside 'module' (one of its submodules) "
                             f"(got {describe(model)})")
        return model
    inside = [m for m in module.children() if hf_model(m) is not None]
    return inside[0] if len(inside) == 1 else module


def _train_loader(module: Any, datamodule: Any) -> Any:
    owner = datamodule if datamodule is not None else module
    try:
        with quiet():
            return owner.train_dataloader()
    except LmcheckError:
        raise
    except Exception as error:  # the user's code (a MisconfigurationException where none is defined)
        raise InputError(f"the {'datamodule' if datamodule is not None else 'module'}'s train_dataloader() raised "
                         f"{type(error).__name__}: {error}") from error


class LightningDriver:
    """Runs ``fit`` of the user's module on a Trainer made like theirs, watched and then undone."""

    def __init__(self, trainer: Any, module: Any, model: torch.nn.Module, loader: Any, as_batch: Any,
                 progress: Progress | None, budget: SetupBudget, *, tokenizer: Any = None,
                 rebuild: Callable[[int], Any] | None = None, seed: int = 0) -> None:
        self.user_trainer, self.module, self.model, self.loader = trainer, module, model, loader
        self.progress = progress
        self.accumulate = int(trainer.accumulate_grad_batches)
        chosen = trainer.gradient_clip_algorithm  # None: Lightning's default, by norm
        algorithm = "norm" if chosen is None else str(getattr(chosen, "value", chosen))
        clip = trainer.gradient_clip_val
        self.clip_value, self.clip_algorithm = clip, (None if chosen is None else algorithm)
        self.max_grad_norm = float(clip) if clip and algorithm == "norm" else (None if clip else 0.0)
        precision = str(trainer.precision)
        self.gradient_rtol = GRADIENT_RTOL[torch.bfloat16] if "mixed" in precision or "16" in precision else None
        self.batches = take(loader, max(budget.steps * 8, budget.overfit_batches * self.accumulate, 8),
                            "the train dataloader")
        self.convert = converter(as_batch)
        self.lm_batches = [self.convert(b, i) for i, b in enumerate(self.batches[:8])]
        self.calls = min(budget.steps, 3)  # the first losses the reproducibility check compares
        self.tokenizer, self.rebuild, self.seed = tokenizer, rebuild, seed
        self.collator = getattr(loader, "collate_fn", None)
        self.schedule: Callable[[int], float] | None = None
        self.module_attributes = dict(vars(module))
        self.snapshot = Snapshot(model)
        self.curve = LossCurve()
        self.changed_inputs: list[str] = []
        self.scheduler: Any = None
        self.interval: str | None = None
        self._running: Any = None
        self.setup: dict[str, Any] = {
            "kind": "lightning Trainer.fit", "module": type(module).__name__, "model": type(model).__name__,
            "dtype": str(parameter_dtype(model)).replace("torch.", ""), "precision": str(trainer.precision),
            "accumulate_grad_batches": self.accumulate, "gradient_clip_val": trainer.gradient_clip_val,
            "gradient_clip_algorithm": str(trainer.gradient_clip_algorithm or "norm"),
            "batches seen": len(self.batches),
        }

    def restore(self) -> None:
        self.snapshot.restore()
        for name in set(vars(self.module)) - set(self.module_attributes):
            delattr(self.module, name)
        vars(self.module).update(self.module_attributes)

    def _first_sight(self, optimizer: torch.optim.Optimizer) -> None:
        self.snapshot.add(optimizer)
        configs = getattr(self._running, "lr_scheduler_configs", None) or []
        if configs:
            config = configs[0]
            self.interval = f"{config.interval} (every {config.frequency})"
            # a schedule stepped once per optimizer step can be replayed; one per epoch cannot
            replayable = config.interval == "step" and config.frequency == 1
            self.scheduler = config.scheduler if replayable else None
            self.snapshot.add(config.scheduler)

    def overfit_batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        return [self.convert(b, i) for i, b in enumerate(self.batches[:count])]

    def run(self, steps: int, *, phase: str, first: bool = False, batches: Sequence[int] | None = None,
            peak_lrs: tuple[float, ...] | None = None, after_step: Callable[[int], bool] | None = None,
            on_first_step: FirstStep | None = None) -> Run:
        """``fit`` from the saved state until ``steps`` optimizer steps, on the first batches (or
        those ``batches`` index), in order, each epoch whole accumulation windows."""
        import lightning.pytorch as pl

        self.snapshot.restore()
        run = Run([], [], [])
        recorder = Recorder(self.model, grad_steps=0, seen_steps=int(first), flag_steps=steps if first else 0,
                            peak_lrs=peak_lrs, on_first_sight=self._first_sight,
                            at_first_step=first_step_hook(on_first_step, partial(self.step_batches, run)))
        run.steps = recorder.steps
        order = list(batches) if batches is not None else list(range(len(self.batches)))
        # Lightning steps on an epoch's last, partial window too: whole windows only
        feed_index = [order[j % len(order)] for j in range(len(order) * self.accumulate)]
        module = self.module
        quiet_dropout = no_dropout(self.model) if first else contextlib.nullcontext()
        with tempfile.TemporaryDirectory(prefix="lmcheck-setup-") as folder, _lightning_quiet(), \
                recorder.active(), quiet_dropout:
            fitter = pl.Trainer(
                max_steps=steps, max_epochs=-1, accumulate_grad_batches=self.accumulate,
                gradient_clip_val=self.clip_value, gradient_clip_algorithm=self.clip_algorithm,
                precision=self.user_trainer.precision, accelerator=self.user_trainer.strategy.root_device.type,
                devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                callbacks=[_stopper(recorder, steps, phase, after_step, self.progress)], default_root_dir=folder)
            self._running = fitter
            module.training_step = self._recording_step(recorder, run, feed_index)
            try:
                fitter.fit(module, train_dataloaders=_Feed([self.batches[i] for i in feed_index]))
            except LmcheckError:
                raise
            except Exception as error:  # the user's module or data: named, traceback chained
                raise InputError(f"'module': Trainer.fit raised {type(error).__name__} while lmcheck ran "
                                 f"{steps} steps ({phase}): {error}") from error
            finally:
                del module.training_step
                self._running = None
        return run

    def _recording_step(self, recorder: Recorder, run: Run, feed_index: list[int]) -> Callable[..., Any]:
        original, changed = self.module.training_step, self.changed_inputs

        def training_step(batch: Any, batch_idx: int, *rest: Any, **kwargs: Any) -> Any:
            recorder.calls += 1
            run.batches.append(feed_index[batch_idx % len(feed_index)])  # before: the first step's check reads it
            before = ids_copy(batch)
            out = original(batch, batch_idx, *rest, **kwargs)
            note_changed_ids(changed, before, ids_copy(batch), f"micro-batch {recorder.calls}")
            loss = out.get("loss") if isinstance(out, Mapping) else out
            run.losses.append(loss_value(loss, f"the module's training_step on micro-batch {recorder.calls}"))
            return out

        return training_step

    def step_batches(self, run: Run, calls: range) -> list[dict[str, torch.Tensor]]:
        return [self.convert(self.batches[run.batches[i]], run.batches[i]) for i in calls]

    def collating(self) -> Collated:
        return loader_collating(self.loader)

    def epochs(self) -> Epochs:
        self.setup["scheduler interval"] = self.interval or "none"  # known once fit has run
        return loop_epochs(self.loader, self.convert)

    def seeding(self) -> tuple[int, str] | str:
        return seeding(self.rebuild, self.seed)

    def first_losses(self, seed: int) -> list[float]:
        built = rebuilt(self.rebuild, seed)
        if not isinstance(built, (tuple, list)) or len(built) not in (2, 3):
            raise InputError(f"'rebuild' must return (trainer, module) or (trainer, module, datamodule) "
                             f"(got {describe(built)})")
        trainer, module, *rest = built
        other = LightningDriver(trainer, module, _language_model(module, None),
                                _train_loader(module, rest[0] if rest else None), None, None,
                                SetupBudget(steps=self.calls, overfit_batches=1))
        try:
            return other.run(self.calls, phase="reproducibility").losses
        finally:
            other.restore()

    def evaluate_twice(self) -> tuple[list[float], str] | str:
        return evaluate_twice(self.model, self.lm_batches, None)

    def rank_checks(self) -> list[Result]:
        return [Result.not_applicable(name, "check_lightning runs Lightning's fit on one device; under torchrun "
                                      "use check_loop or check_trainer") for name in DISTRIBUTED_CHECKS]

    def resumable(self) -> str:
        return ("check_lightning does not drive Lightning's checkpointing yet: the resume check runs on "
                "check_trainer and check_loop")


def _stopper(recorder: Recorder, steps: int, phase: str, after_step: Callable[[int], bool] | None,
             progress: Progress | None) -> Any:
    """A Lightning callback that shows each new optimizer step to ``progress`` and ``after_step``
    and stops ``fit`` where ``after_step`` says so. (Made here: Lightning is optional, so its
    Callback class cannot be a base at import time.)"""
    import lightning.pytorch as pl

    class Stop(pl.Callback):
        shown = 0  # optimizer steps already shown to after_step

        def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            if len(recorder.steps) == self.shown:
                return
            self.shown = len(recorder.steps)
            if progress is not None:
                progress(phase, self.shown, steps)
            if after_step is not None and after_step(self.shown):
                trainer.should_stop = True

    return Stop()


class _Feed:
    """The batches of one epoch, in order: one iterable (a list would be many dataloaders to fit)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@contextlib.contextmanager
def _lightning_quiet() -> Iterator[None]:
    """Lightning's own info lines ("GPU available", "`Trainer.fit` stopped") while lmcheck drives it."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with quiet():
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
