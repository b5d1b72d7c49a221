"""A guard for the real run: ``lmcheck.watch`` stops a long run before a bad step is applied or a
bad checkpoint is saved.

Three ways in, one guard (:class:`Guard`) behind them::

    # a plain loop, unchanged
    with lmcheck.watch(model, optimizer, log_dir="runs/x") as guard:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    # the Hugging Face Trainer (and TRL's trainers)
    Trainer(..., callbacks=[lmcheck.watch.TrainerGuard()])

    # Lightning
    L.Trainer(..., callbacks=[lmcheck.watch.LightningGuard()])

At every optimizer step, before the update is applied, it reads the loss, the gradient norm, the
learning rates, the sampled update of each parameter group, the loss scale and the throughput, and
warns, skips the step or stops the run (:class:`Rules`). Before every checkpoint save, the weights
and the optimizer state must be finite, else the save is refused and the run stops. Every event
goes to the ``lmcheck.watch`` logger and, with a ``log_dir``, to ``lmcheck-watch.jsonl``; at the
end a Markdown summary with the loss and gradient-norm curves as a PNG.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lmcheck.watch.guard import ACTIONS, Event, Guard, GuardStop, Rules

__all__ = ["ACTIONS", "Event", "Guard", "GuardStop", "LightningGuard", "Rules", "TrainerGuard", "watch"]


def watch(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *, rules: Rules | None = None,
          scheduler: Any = None, lr_schedule: Callable[[int], float | Sequence[float]] | None = None,
          scaler: Any = None, log_dir: str | Path | None = None) -> Guard:
    """The guard over ``model``'s optimizer steps, to use as a context manager around a loop.

    Args:
        model: the model being trained (a DDP wrapper is looked through).
        optimizer: its optimizer; None: whichever optimizer steps the model's parameters.
        rules: a :class:`Rules` (the actions and thresholds); the defaults skip non-finite steps
            (ten at most) and warn on the rest.
        scheduler: the learning-rate scheduler, whose course (recorded at the start) the learning
            rates are judged against.
        lr_schedule: else a function of the step (0-based) giving the planned learning rate (one,
            or one per parameter group).
        scaler: the ``torch.amp.GradScaler``, whose loss scale is watched.
        log_dir: where the events (JSON lines) and the summary (Markdown and PNG) are written.

    A step the guard stops raises :class:`GuardStop` from ``optimizer.step()`` (or from the save it
    refused), before anything is changed.
    """
    return Guard(model, optimizer, rules=rules, scheduler=scheduler, lr_schedule=lr_schedule, scaler=scaler,
                 log_dir=log_dir)


def __getattr__(name: str) -> Any:
    if name == "TrainerGuard":
        from lmcheck.watch.trainer import TrainerGuard

        return TrainerGuard
    if name == "LightningGuard":
        from lmcheck.watch.lightning import LightningGuard

        return LightningGuard
    raise AttributeError(f"module 'lmcheck.watch' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """``lmcheck.watch(model, optimizer)`` calls :func:`watch`; the module's names stay reachable."""

    def __call__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 **options: Any) -> Guard:
        return watch(model, optimizer, **options)


sys.modules[__name__].__class__ = _CallableModule
