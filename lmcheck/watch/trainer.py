"""The guard in the Hugging Face Trainer (and TRL's trainers, which are Trainers)."""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from lmcheck.errors import InputError
from lmcheck.watch.guard import Guard, Rules

__all__ = ["TrainerGuard"]


class TrainerGuard(TrainerCallback, ExportableState):
    """``Trainer(..., callbacks=[lmcheck.watch.TrainerGuard()])``.

    The guard arms at the first step (a resumed Trainer loads the checkpoint's state after
    ``on_train_begin``; with ``restore_callback_states_from_checkpoint`` it makes a new instance
    of the callback) and disarms at the end of training. A stop sets
    ``control.should_training_stop`` (the step that caused it is not applied where it could be
    withheld); before every checkpoint save the Trainer is about to make (``control.should_save``
    at the end of a step or an epoch) the weights and the optimizer state must be finite, else the
    save is called off and training stops, so the last checkpoint saved stays the last healthy one
    and no rotation deletes it. Its state (windows, counts, events) is saved in each checkpoint's
    ``trainer_state.json`` and restored on resume. Events and the summary go to ``output_dir``
    unless ``log_dir`` says otherwise.

    Args:
        rules: a :class:`~lmcheck.watch.Rules`, or a dict of its fields.
        log_dir: where the events and the summary go (default: the Trainer's ``output_dir``).
    """

    def __init__(self, rules: Rules | dict[str, Any] | None = None, log_dir: str | None = None,
                 restored: str | None = None) -> None:
        if isinstance(rules, dict):
            rules = Rules(**rules)
        if rules is not None and not isinstance(rules, Rules):
            raise InputError(f"'rules' must be a lmcheck.watch.Rules or a dict of its fields (got {type(rules).__name__})")
        self.rules = rules or Rules()
        self.log_dir = log_dir
        self.restored = restored  # the guard's state from a checkpoint
        self.guard: Guard | None = None

    def _arm(self, args: Any, kwargs: dict[str, Any]) -> Guard:
        if self.guard is None:
            optimizer = kwargs.get("optimizer")
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
            self.guard = Guard(kwargs["model"], inner, rules=self.rules, scheduler=kwargs.get("lr_scheduler"),
                               scaler=getattr(optimizer, "scaler", None), log_dir=self.log_dir or args.output_dir,
                               stop="request")
            restored = self.restored if self.restored is not None else _saved_state(kwargs.get("state"))
            if restored is not None:
                self.guard.load_state_dict({"lmcheck_watch": restored})
            self.guard.arm()
        return self.guard

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._arm(args, {**kwargs, "state": state})

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._before_save(args, control, kwargs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._before_save(args, control, kwargs)

    def _before_save(self, args: Any, control: Any, kwargs: dict[str, Any]) -> None:
        guard = self._arm(args, kwargs)
        if control.should_save and guard.check_save() is not None:
            control.should_save = False  # the last checkpoint saved stays the newest
        if guard.stop_requested is not None:
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.guard is not None:
            self.guard.close()

    def state(self) -> dict[str, Any]:
        """What the Trainer writes into each checkpoint's ``trainer_state.json``."""
        restored = self.guard.state_dict()["lmcheck_watch"] if self.guard is not None else self.restored
        return {"args": {"rules": dataclasses.asdict(self.rules), "log_dir": self.log_dir, "restored": restored},
                "attributes": {}}


def _saved_state(state: Any) -> str | None:
    """The guard's state in a resumed Trainer's ``TrainerState`` (loaded from the checkpoint's
    ``trainer_state.json`` whether or not ``restore_callback_states_from_checkpoint`` is set)."""
    saved = getattr(state, "stateful_callbacks", None)
    saved = saved.get(TrainerGuard.__name__) if isinstance(saved, dict) else None
    saved = saved[0] if isinstance(saved, list) and saved else saved
    restored = saved.get("args", {}).get("restored") if isinstance(saved, dict) else None
    return restored if isinstance(restored, str) else None
