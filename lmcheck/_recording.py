"""Watching a user's training run from outside: what each optimizer step saw, and putting every
object back as it was.

The setup checks run the user's own step function or Trainer, never a copy of lmcheck's loop. To
see inside it without changing it they hook two places that every PyTorch loop passes through:

- every optimizer's ``step`` (``torch.optim.optimizer.register_optimizer_step_pre_hook``): the
  gradients and learning rates at the moment the update is applied, after accumulation, the
  loss scaler's unscaling and clipping, and how many micro-batches went into it;
- the model's state, the optimizers' and schedulers' state and the random generators, saved
  before a run and put back after it, so a check leaves the user's objects as it found them.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from lmcheck._finite import locate
from lmcheck._ranks import local

__all__ = ["GradientSeen", "OptimizerStep", "Recorder", "Snapshot", "clipping_seen", "counted_steps", "cpu_copy", "once_gradients_exist",
           "rng_state", "set_rng_state"]


@dataclass(frozen=True)
class GradientSeen:
    """What a judge reads of one parameter's gradient at a step, without a copy of it."""

    present: bool  # the parameter has a gradient at all
    nonzero: bool  # it has a non-zero (or NaN) entry
    norm: float | None  # its L2 norm, None where absent
    non_finite: str | None  # where it holds NaN or Inf (the first entry and how many), else None

    @classmethod
    def of(cls, grad: torch.Tensor | None) -> GradientSeen:
        if grad is None:
            return cls(False, False, None, None)
        grad = grad.detach()
        return cls(True, bool(grad.any()), float(grad.float().norm()), locate(grad, ("index",) * grad.dim()))


@dataclass
class OptimizerStep:
    """One optimizer step of the user's loop, as the hook saw it."""

    index: int  # 1-based
    micro_batches: int  # train_step calls (or training forwards) since the previous step
    lrs: tuple[float, ...]  # the learning rate of each parameter group, as used by this step
    grads: dict[str, torch.Tensor | None] | None = None  # at the step, for the first steps only
    seen: dict[str, GradientSeen] | None = None  # what the judges read of each gradient, where kept
    nonzero: frozenset[str] | None = None  # parameters with a non-zero gradient, where flagged
    clip: tuple[float, float] | None = None  # (total norm before clipping, max_norm) of the last
    # torch.nn.utils.clip_grad_norm_ call since the previous step, if any


@dataclass
class Recorder:
    """Records every step of an optimizer that updates ``model``'s parameters while active.

    ``calls`` is advanced by the driver once per micro-batch; ``grad_steps`` is how many of the
    first steps keep a copy of the gradients (on the CPU), ``seen_steps`` how many keep what the
    judges read of them (:class:`GradientSeen`, no copy). ``at_first_step`` is called at the first
    step, before it is taken, with the calls so far and the last clipping seen (total norm,
    max_norm): the gradients it reads are the update about to be applied. ``on_first_sight`` is called with each optimizer
    the first time it steps (before the step), so its state can be saved. ``flag_steps`` is how
    many of the first steps note which parameters have a non-zero gradient (a set of names, no
    copy). ``peak_lrs``, where given, is the learning rate of each parameter group for every step
    while active: set just before the step and the user's value put back just after it, so the
    user's schedule goes on as it would (a scheduler that reads the groups' rates reads its own).
    """

    model: torch.nn.Module
    grad_steps: int = 0
    seen_steps: int = 0
    flag_steps: int = 0
    peak_lrs: tuple[float, ...] | None = None
    on_first_sight: Callable[[torch.optim.Optimizer], None] | None = None
    at_first_step: Callable[[int, tuple[float, float] | None], None] | None = None
    steps: list[OptimizerStep] = field(default_factory=list)
    calls: int = 0
    _calls_at_last_step: int = 0
    _primary: int | None = None
    _seen: set[int] = field(default_factory=set)
    _users_lrs: list[float] = field(default_factory=list)

    @contextmanager
    def active(self) -> Iterator[Recorder]:
        names = {id(p): n for n, p in self.model.named_parameters()}

        def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
            if not any(id(p) in names for group in optimizer.param_groups for p in group["params"]):
                return None  # an optimizer of something else
            if id(optimizer) not in self._seen:
                self._seen.add(id(optimizer))
                if self.on_first_sight is not None:
                    self.on_first_sight(optimizer)
            if self._primary is None:
                self._primary = id(optimizer)
            if id(optimizer) != self._primary:
                return None  # a second optimizer of the same model: its state is saved, its steps not counted
            return once_gradients_exist(args, kwargs, lambda loss: record(optimizer))

        def record(optimizer: torch.optim.Optimizer) -> None:
            if not self.steps and self.at_first_step is not None:
                self.at_first_step(self.calls, clips[-1] if clips else None)
            seen = None
            if len(self.steps) < self.seen_steps:
                seen = {n: GradientSeen.of(p.grad) for n, p in self.model.named_parameters()}
            grads = None
            if len(self.steps) < self.grad_steps:
                # on the CPU: the step's gradient is read by the judges after the run
                grads = {n: None if p.grad is None else cpu_copy(p.grad) for n, p in self.model.named_parameters()}
            nonzero = None
            if len(self.steps) < self.flag_steps:
                nonzero = frozenset(n for n, p in self.model.named_parameters()
                                    if p.grad is not None and bool(p.grad.any()))
            if self.peak_lrs is not None:
                self._users_lrs = [float(group["lr"]) for group in optimizer.param_groups]
                for group, lr in zip(optimizer.param_groups, self.peak_lrs, strict=False):
                    group["lr"] = lr
            self.steps.append(OptimizerStep(
                index=len(self.steps) + 1, micro_batches=self.calls - self._calls_at_last_step,
                lrs=tuple(float(group["lr"]) for group in optimizer.param_groups), grads=grads, seen=seen,
                nonzero=nonzero, clip=clips[-1] if clips else None))
            self._calls_at_last_step = self.calls
            clips.clear()

        def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if self.peak_lrs is not None and id(optimizer) == self._primary and self._users_lrs:
                for group, lr in zip(optimizer.param_groups, self._users_lrs, strict=False):
                    group["lr"] = lr
                self._users_lrs = []

        handles = [register_optimizer_step_pre_hook(before_step), register_optimizer_step_post_hook(after_step)]
        clips: list[tuple[float, float]] = []
        try:
            with clipping_seen(_noted(clips)):
                yield self
        finally:
            for handle in handles:
                handle.remove()


def once_gradients_exist(args: Any, kwargs: Any, then: Callable[[Any], None]) -> tuple[Any, Any] | None:
    """For a global optimizer-step pre-hook given the step's ``args`` and ``kwargs``: call
    ``then(loss)`` once the step's gradients exist, before the update. Without a closure that is
    now (``loss`` None), and the hook returns None; with one (``optimizer.step(closure)``, as
    Lightning steps: the forward, backward and clipping run inside the step) it is when the closure
    returns, with its loss, and the hook returns the arguments with the closure wrapped. The
    hook's args begin with the optimizer itself: a closure given by position is ``args[1]``."""
    closure = kwargs.get("closure", args[1] if len(args) > 1 and callable(args[1]) else None)
    if closure is None:
        then(None)
        return None

    def wrapped() -> Any:
        loss = closure()
        then(loss)
        return loss

    if "closure" in kwargs:
        return args, {**kwargs, "closure": wrapped}
    return (args[0], wrapped, *args[2:]), kwargs


@contextmanager
def counted_steps() -> Iterator[list[int]]:
    """Count every optimizer step taken while active, of any optimizer: ``[count]``."""
    count = [0]

    def counted(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        count[0] += 1

    handle = register_optimizer_step_post_hook(counted)
    try:
        yield count
    finally:
        handle.remove()


@contextmanager
def clipping_seen(note: Callable[[Any, float], None]) -> Iterator[None]:
    """Call ``note(total_norm, max_norm)`` at every gradient clipping while active, with the
    total as the clipping computed it (a tensor: nothing is read from the device here). The step
    hook sees only clipped gradients, and a clipped update hides its scale (a loss not divided by
    the accumulation steps clips to the same norm as the right one). Seen: ``clip_grad_norm_``,
    and ``clip_grads_with_norm_`` given the total (accelerate 1.16 clips that way, after its own
    ``get_total_norm``). The Trainer, accelerate and most loops call them through
    ``torch.nn.utils`` at call time; a loop that imported the function itself before is not seen."""
    import torch.nn.utils as utils
    import torch.nn.utils.clip_grad as clip_grad

    norm_then_clip, clip_with_norm = clip_grad.clip_grad_norm_, utils.clip_grads_with_norm_

    def clip_grad_norm_(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
        total = norm_then_clip(parameters, max_norm, *args, **kwargs)
        note(total, max_norm)
        return total

    def clip_grads_with_norm_(parameters: Any, max_norm: float, total_norm: Any, *args: Any, **kwargs: Any) -> Any:
        note(total_norm, max_norm)
        return clip_with_norm(parameters, max_norm, total_norm, *args, **kwargs)

    utils.clip_grad_norm_ = clip_grad.clip_grad_norm_ = clip_grad_norm_
    utils.clip_grads_with_norm_ = clip_grads_with_norm_
    try:
        yield
    finally:
        utils.clip_grad_norm_ = clip_grad.clip_grad_norm_ = norm_then_clip
        utils.clip_grads_with_norm_ = clip_with_norm


def _noted(calls: list[tuple[float, float]]) -> Callable[[Any, float], None]:
    """A ``clipping_seen`` note that keeps (total, max_norm) as floats."""
    def note(total: Any, max_norm: Any) -> None:
        try:
            calls.append((float(total), float(max_norm)))
        except (TypeError, ValueError, RuntimeError):  # a DTensor norm or an odd max_norm: not noted
            pass
    return note


class Snapshot:
    """The state of a model, the optimizers and schedulers added to it, and every random
    generator; :meth:`restore` puts all of it back (as often as needed).

    Everything is saved on the CPU, once (pinned where CUDA is present, so that copying back is
    fast): a checked setup needs no second model's worth of memory on its device. Tied tensors
    share one copy; an FSDP2 parameter saves this rank's shard. An optimizer whose state has the
    layout it had when saved is restored in place, without a second copy of its state.
    """

    def __init__(self, model: torch.nn.Module, stateful: tuple[Any, ...] = ()) -> None:
        self.model = model
        copies: dict[int, torch.Tensor] = {}  # one copy per tensor: tied weights are one Parameter
        self.state: dict[str, torch.Tensor] = {}
        for key, value in model.state_dict(keep_vars=True).items():
            if id(value) not in copies:
                copies[id(value)] = cpu_copy(value)
            self.state[key] = copies[id(value)]
        self.grads = {n: None if p.grad is None else cpu_copy(p.grad) for n, p in model.named_parameters()}
        self.modes = {module: module.training for module in model.modules()}  # each one's train/eval
        self.objects: dict[int, tuple[Any, Any]] = {}
        for item in stateful:
            self.add(item)
        self.rng = rng_state()

    def add(self, item: Any) -> None:
        """Save an optimizer's or a scheduler's state now, unless it is saved already."""
        if item is not None and id(item) not in self.objects:
            self.objects[id(item)] = (item, _on_cpu(item.state_dict()))

    @torch.no_grad()
    def restore(self) -> None:
        for key, value in self.model.state_dict(keep_vars=True).items():
            local(value).copy_(self.state[key])
        for name, parameter in self.model.named_parameters():
            saved = self.grads[name]
            parameter.grad = None if saved is None else saved.to(parameter.device, copy=True)
        for module, training in self.modes.items():
            module.training = training
        for item, state in self.objects.values():
            if not (isinstance(item, torch.optim.Optimizer) and _restored_in_place(item, state)):
                item.load_state_dict(_on_cpu(state))  # a fresh copy: load_state_dict may keep what it is given
        set_rng_state(self.rng)

    def parameters(self) -> dict[str, torch.Tensor]:
        """The saved values of the named parameters (tied ones once), on the CPU."""
        return {n: self.state[n] for n, _ in self.model.named_parameters() if n in self.state}


def cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy on the CPU (pinned where CUDA is present; this rank's shard of a DTensor)."""
    tensor = local(tensor.detach())
    if tensor.is_cuda:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        return out.copy_(tensor)
    return tensor.to("cpu", copy=True)


def _on_cpu(value: Any) -> Any:
    """A deep copy of a state dict with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return cpu_copy(value)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return copy.deepcopy(value)


def _restored_in_place(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> bool:
    """Copy the saved state into the optimizer's own tensors where every parameter's state has
    the saved keys, shapes and dtypes (the state after a run of the same optimizer); False, and
    nothing changed, otherwise."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    states = saved.get("state", {})
    groups = saved.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups) or set(states) != {i for i, p in enumerate(params)
                                                                      if p in optimizer.state}:
        return False
    for index, values in states.items():
        live = optimizer.state[params[index]]
        if set(live) != set(values) or any(
                isinstance(v, torch.Tensor) != isinstance(live[k], torch.Tensor)
                or isinstance(v, torch.Tensor) and (v.shape != live[k].shape or v.dtype != live[k].dtype)
                for k, v in values.items()):
            return False
    with torch.no_grad():
        for index, values in states.items():
            live = optimizer.state[params[index]]
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    live[key].copy_(value)
                else:
                    live[key] = copy.deepcopy(value)
    for group, saved_group in zip(optimizer.param_groups, groups, strict=True):
        for key in [k for k in group if k != "params" and k not in saved_group]:
            del group[key]  # as load_state_dict would: a key added since (a scheduler's initial_lr) goes
        group.update({k: copy.deepcopy(v) for k, v in saved_group.items() if k != "params"})
    return True


def rng_state() -> dict[str, Any]:
    """Every random generator lmcheck's runs may advance: torch (and CUDA), Python's, NumPy's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:  # numpy is optional
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
