"""The setup checks on a PyTorch Lightning setup, through Lightning's own ``fit``.

:func:`check_lightning` takes the user's ``lightning.pytorch.Trainer``, their ``LightningModule``
and (optionally) their ``LightningDataModule``, and runs the battery of
:func:`lmcheck.setup_checks.check_loop` on them. Each run is a ``Trainer.fit`` of the user's
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
from typing import Any

import torch

from lmcheck._model import hf_model, no_dropout, parameter_dtype
from lmcheck._recording import Recorder, Snapshot
from lmcheck._setup_results import (
    GRADIENT_RTOL,
    _call_rebuild,
    _collating_problems,
    _converter,
    _data_order_of_loop,
    _eval_twice,
    _ids_copy,
    _loss_value,
    _note_changed_ids,
    _quiet,
    _reproducible,
    _take,
)
from lmcheck._validate import check_callable, describe
from lmcheck.curves import LossCurve
from lmcheck.errors import InputError, LmcheckError
from lmcheck.results import Result

__all__ = ["check_lightning"]


def check_lightning(
    trainer: Any, module: Any, datamodule: Any = None, *, model: torch.nn.Module | None = None,
    tokenizer: Any = None, as_batch: Callable[[Any], Mapping[str, torch.Tensor]] | None = None,
    pretrained: bool | None = None, rebuild: Callable[[int], Any] | None = None, seed: int = 0,
    steps: int = 8, overfit_batches: int = 4, overfit_steps: int = 200, check_every: int = 5,
    expect_eos: bool | None = None, progress: Callable[[str, int, int], None] | None = None,
) -> Any:
    """Run the setup checks on a Lightning setup through ``Trainer.fit``, and leave it as it was.

    Args:
        trainer: the user's ``lightning.pytorch.Trainer`` (its settings are read, it is not fitted).
        module: the ``LightningModule`` whose ``training_step`` and ``configure_optimizers`` train.
        datamodule: the ``LightningDataModule`` with ``train_dataloader()``, where the module has none.
        model: the language model inside ``module`` that lmcheck's own forwards call (a Hugging
            Face model, a plain module returning logits, or one made by :func:`lmcheck.adapt`);
            default: the module's only Hugging Face model, else the module itself.
        tokenizer, as_batch, pretrained, steps, overfit_batches, overfit_steps, check_every,
        expect_eos, progress: as :func:`lmcheck.check_loop`.
        rebuild: ``rebuild(seed)`` returns ``(trainer, module)`` or ``(trainer, module,
            datamodule)`` built afresh, for the reproducibility check (n/a without it).
        seed: the seed given to ``rebuild``.
    """
    try:
        import lightning.pytorch as pl
    except ImportError as error:
        raise InputError("check_lightning needs Lightning: pip install lightning") from error
    from lmcheck.setup_checks import (
        SetupReport,
        _battery,
        _check_options,
        _finite_or_fail,
        _ordered,
        _root_causes_first,
        _unsupervised,
    )

    if not isinstance(trainer, pl.Trainer):
        raise InputError(f"'trainer' must be a lightning.pytorch.Trainer (got {describe(trainer)})")
    if not isinstance(module, pl.LightningModule):
        raise InputError(f"'module' must be a lightning.pytorch.LightningModule (got {describe(module)})")
    if datamodule is not None and not isinstance(datamodule, pl.LightningDataModule):
        raise InputError(f"'datamodule' must be a lightning.pytorch.LightningDataModule or None "
                         f"(got {describe(datamodule)})")
    _check_options(steps, overfit_batches, overfit_steps, check_every, None)
    for argument, value in (("as_batch", as_batch), ("rebuild", rebuild), ("progress", progress)):
        if value is not None:
            check_callable(value, argument, "a function")
    lm = _language_model(module, model)
    loader = _train_loader(module, datamodule)
    driver = _LightningDriver(trainer, module, lm, loader, as_batch, progress, steps, overfit_batches)
    lm_batches = [driver.convert(b, i) for i, b in enumerate(driver.batches[:8])]
    setup: dict[str, Any] = {
        "kind": "lightning Trainer.fit", "module": type(module).__name__, "model": type(lm).__name__,
        "dtype": str(parameter_dtype(lm)).replace("torch.", ""), "precision": str(trainer.precision),
        "accumulate_grad_batches": driver.accumulate, "gradient_clip_val": trainer.gradient_clip_val,
        "gradient_clip_algorithm": str(trainer.gradient_clip_algorithm or "norm"), "batches seen": len(driver.batches),
    }
    try:
        results = _battery(driver, lm_batches, tokenizer=tokenizer, schedule=None,
                           max_grad_norm=driver.max_grad_norm, pretrained=pretrained, evaluate=None,
                           expect_eos=expect_eos, steps=steps, overfit_batches=overfit_batches,
                           overfit_steps=overfit_steps, check_every=check_every, setup=setup,
                           collated=_collated(loader), collator=getattr(loader, "collate_fn", None))
        setup["scheduler interval"] = driver.interval or "none"
        results.append(_data_order_of_loop(loader, driver.convert))
        unsupervised = _unsupervised(results)
        if unsupervised is not None:
            results += [Result.not_applicable(n, unsupervised) for n in ("reproducible", "eval_deterministic")]
        else:
            results.append(driver.reproducible(rebuild, seed, steps) if rebuild is not None else
                           Result.not_applicable("reproducible", "no rebuild(seed) was given, so the setup "
                                                 "cannot be built again with another seed"))
            results.append(_finite_or_fail("eval_deterministic", lambda: _eval_twice(lm, lm_batches, None)))
    finally:
        driver.restore()
    return SetupReport(results=_root_causes_first(_ordered(results)), curve=driver.curve, setup=setup)


def _collated(loader: Any) -> tuple[list[str], int, int]:
    """The loader's first examples against what its collate_fn makes of them, as check_loop does."""
    dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
    if getattr(loader, "batch_size", None) is None or not callable(collate) \
            or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return [], 0, 0
    return _collating_problems(dataset, collate, lambda examples: examples)


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
        with _quiet():
            return owner.train_dataloader()
    except LmcheckError:
        raise
    except Exception as error:  # the user's code (a MisconfigurationException where none is defined)
        raise InputError(f"the {'datamodule' if datamodule is not None else 'module'}'s train_dataloader() raised "
                         f"{type(error).__name__}: {error}") from error


class _LightningDriver:
    """Runs ``fit`` of the user's module on a Trainer made like theirs, watched and then undone."""

    def __init__(self, trainer: Any, module: Any, model: torch.nn.Module, loader: Any, as_batch: Any,
                 progress: Any, steps: int, overfit_batches: int) -> None:
        self.user_trainer, self.module, self.model = trainer, module, model
        self.progress = progress
        self.accumulate = int(trainer.accumulate_grad_batches)
        chosen = trainer.gradient_clip_algorithm  # None: Lightning's default, by norm
        algorithm = "norm" if chosen is None else str(getattr(chosen, "value", chosen))
        clip = trainer.gradient_clip_val
        self.clip_value, self.clip_algorithm = clip, (None if chosen is None else algorithm)
        self.max_grad_norm = float(clip) if clip and algorithm == "norm" else (None if clip else 0.0)
        precision = str(trainer.precision)
        self.gradient_rtol = GRADIENT_RTOL[torch.bfloat16] if "mixed" in precision or "16" in precision else None
        self.batches = _take(loader, max(steps * 8, overfit_batches * self.accumulate, 8), "the train dataloader")
        self.convert = _converter(as_batch)
        self.module_attributes = dict(vars(module))
        self.snapshot = Snapshot(model)
        self.curve = LossCurve()
        self.changed_inputs: list[str] = []
        self.scheduler: Any = None
        self.interval: str | None = None
        self._running: Any = None

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

    def run(self, optimizer_steps: int, *, batches: Sequence[int] | None = None, grad_steps: int = 0,
            flag_steps: int = 0, peak_lrs: tuple[float, ...] | None = None, phase: str = "",
            after_step: Callable[[int], bool] | None = None,
            dropout: bool = True) -> tuple[Recorder, list[float], list[int]]:
        """``fit`` from the saved state until ``optimizer_steps`` optimizer steps, on the first
        batches (or those ``batches`` index), in order, each epoch whole accumulation windows."""
        import lightning.pytorch as pl

        self.snapshot.restore()
        recorder = Recorder(self.model, grad_steps=grad_steps, flag_steps=flag_steps, peak_lrs=peak_lrs,
                            on_first_sight=self._first_sight)
        order = list(batches) if batches is not None else list(range(len(self.batches)))
        # Lightning steps on an epoch's last, partial window too: whole windows only
        feed_index = [order[j % len(order)] for j in range(len(order) * self.accumulate)]
        feed = [self.batches[i] for i in feed_index]
        losses: list[float] = []
        used: list[int] = []
        driver = self
        module = self.module
        original = module.training_step

        def training_step(batch: Any, batch_idx: int, *rest: Any, **kwargs: Any) -> Any:
            recorder.calls += 1
            before = _ids_copy(batch)
            out = original(batch, batch_idx, *rest, **kwargs)
            _note_changed_ids(driver.changed_inputs, before, _ids_copy(batch), f"micro-batch {recorder.calls}")
            loss = out.get("loss") if isinstance(out, Mapping) else out
            losses.append(_loss_value(loss, f"the module's training_step on micro-batch {recorder.calls}"))
            used.append(feed_index[batch_idx % len(feed_index)])
            return out

        stepped = [0]  # optimizer steps already shown to after_step

        class Watch(pl.Callback):
            def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
                if len(recorder.steps) == stepped[0]:
                    return
                stepped[0] = len(recorder.steps)
                if driver.progress is not None:
                    driver.progress(phase, stepped[0], optimizer_steps)
                if after_step is not None and after_step(stepped[0]):
                    trainer.should_stop = True

        quiet = contextlib.nullcontext() if dropout else no_dropout(self.model)
        with tempfile.TemporaryDirectory(prefix="lmcheck-setup-") as folder, _lightning_quiet(), \
                recorder.active(), quiet:
            fitter = pl.Trainer(
                max_steps=optimizer_steps, max_epochs=-1, accumulate_grad_batches=self.accumulate,
                gradient_clip_val=self.clip_value, gradient_clip_algorithm=self.clip_algorithm,
                precision=self.user_trainer.precision, accelerator=self.user_trainer.strategy.root_device.type,
                devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Watch()],
                default_root_dir=folder)
            self._running = fitter
            module.training_step = training_step
            try:
                fitter.fit(module, train_dataloaders=_Feed(feed))
            except LmcheckError:
                raise
            except Exception as error:  # the user's module or data: named, traceback chained
                raise InputError(f"'module': Trainer.fit raised {type(error).__name__} while lmcheck ran "
                                 f"{optimizer_steps} steps ({phase}): {error}") from error
            finally:
                del module.training_step
                self._running = None
        return recorder, losses, used

    def reproducible(self, rebuild: Callable[[int], Any], seed: int, steps: int) -> Result:
        runs = min(steps, 3)

        def first_losses(value: int) -> list[float]:
            built = _call_rebuild(rebuild, value)
            if not isinstance(built, (tuple, list)) or len(built) not in (2, 3):
                raise InputError(f"'rebuild' must return (trainer, module) or (trainer, module, datamodule) "
                                 f"(got {describe(built)})")
            trainer, module, *rest = built
            other = _LightningDriver(trainer, module, _language_model(module, None),
                                     _train_loader(module, rest[0] if rest else None), None, None, runs, 1)
            try:
                return other.run(runs, phase="reproducibility")[1]
            finally:
                other.restore()

        return _reproducible([first_losses(seed), first_losses(seed), first_losses(seed + 1)], seed, "rebuilt with")


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
        with _quiet():
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
