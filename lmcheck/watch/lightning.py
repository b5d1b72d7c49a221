"""The guard in Lightning: a ``lightning.pytorch.Callback`` (Lightning is an optional dependency)."""

from __future__ import annotations

import importlib.util
from typing import Any

from lmcheck.errors import InputError
from lmcheck.watch.guard import Guard, GuardStop, Rules

__all__ = ["LightningGuard"]

if importlib.util.find_spec("lightning") is None:  # without Lightning the name exists and says what is missing
    class LightningGuard:
        """Needs Lightning: ``pip install lightning``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise InputError("lmcheck.watch.LightningGuard needs Lightning (pip install lightning)")

else:
    from lightning.pytorch import Callback

    class LightningGuard(Callback):  # type: ignore[no-redef]
        """``lightning.pytorch.Trainer(..., callbacks=[lmcheck.watch.LightningGuard()])``.

        Lightning steps its optimizers with a closure (the forward and backward run inside
        ``optimizer.step``): the guard judges the step when the closure returns, before the
        update, and reads the loss the closure gives. A stop sets ``trainer.should_stop`` (the step
        that caused it is not applied where it could be withheld). A checkpoint whose weights or
        optimizer state are not finite is refused in ``on_save_checkpoint``: the error stops the
        fit before anything is written. Its state is saved in the checkpoint and restored on
        resume.

        Args:
            rules: a :class:`~lmcheck.watch.Rules`.
            log_dir: where the events and the summary go (default: the Trainer's ``log_dir``).
        """

        def __init__(self, rules: Rules | None = None, log_dir: str | None = None) -> None:
            if rules is not None and not isinstance(rules, Rules):
                raise InputError(f"'rules' must be a lmcheck.watch.Rules (got {type(rules).__name__})")
            self.rules = rules or Rules()
            self.log_dir = log_dir
            self.guard: Guard | None = None
            self._restored: dict[str, Any] | None = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            optimizers = trainer.optimizers
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs
                          if config.interval == "step" and config.frequency == 1]
            self.guard = Guard(pl_module, optimizers[0] if len(optimizers) == 1 else None, rules=self.rules,
                               scheduler=schedulers[0] if len(schedulers) == 1 else None,
                               log_dir=self.log_dir or trainer.log_dir, stop="request")
            if self._restored is not None:
                self.guard.load_state_dict(self._restored)
            self.guard.arm()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.guard is not None and self.guard.stop_requested is not None:
                trainer.should_stop = True

        def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
            if self.guard is None:
                return
            event = self.guard.check_save()
            if event is not None:
                trainer.should_stop = True
                raise GuardStop(event)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.guard is not None:
                self.guard.close()

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if self.guard is not None:
                self.guard.close()

        def state_dict(self) -> dict[str, Any]:
            return self.guard.state_dict() if self.guard is not None else dict(self._restored or {})

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self._restored = dict(state_dict)
