"""The guard's engine: what it reads at every optimizer step, what it decides, and what it keeps.

One :class:`Guard` serves the three ways in (a plain loop, the Hugging Face Trainer, Lightning).
It hooks every optimizer step of the model's parameters (torch's global step hooks, as the setup
checks do) and, *before the update is applied*, reads one small vector: the step's loss, the
gradient norm, the sampled update of the step before, the loss scale and the step's time. That
vector is the one device synchronisation of the step; under torchrun it is all-reduced first, so
every rank reads the same numbers and takes the same decision (a NaN on one rank reaches all).

It keeps scalars only: no copy of the weights, the gradients or the optimizer state. The update of
each parameter group is measured on a fixed slice of at most :data:`SAMPLED_ELEMENTS` elements of a
few of its parameters, copied before the step and compared after it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from lmcheck._ranks import rank, unwrap_parallel, world_size
from lmcheck._recording import clipping_seen, once_gradients_exist
from lmcheck._validate import check_int, check_model, check_number, check_str, describe
from lmcheck.errors import InputError

__all__ = ["ACTIONS", "Event", "Guard", "GuardStop", "Rules"]

log = logging.getLogger("lmcheck.watch")

Action = Literal["warn", "skip", "stop"]
ACTIONS = ("warn", "skip", "stop")
# conditions judged before the update, whose step can be withheld; the others are seen after it
SKIPPABLE = ("nonfinite", "loss_spike", "grad_spike")
CONDITIONS = (*SKIPPABLE, "learning_rate", "stalled", "loss_scale", "throughput", "checkpoint")
SAMPLED_PARAMETERS = 4  # per parameter group: the parameters whose update is measured
SAMPLED_ELEMENTS = 1024  # per sampled parameter: a contiguous slice, copied before the step
HISTORY_POINTS = 4096  # the loss and gradient-norm curves kept for the summary (thinned beyond)


class GuardStop(RuntimeError):
    """The guard stopped the run: raised in a plain loop from the optimizer step (before the
    update), from a checkpoint save it refused, or from the loss scaler's update. ``event`` is
    the :class:`Event` that stopped it."""

    def __init__(self, event: Event) -> None:
        super().__init__(event.message)
        self.event = event


@dataclass(frozen=True)
class Rules:
    """What the guard does on each condition, and the thresholds it judges by.

    Actions: ``"warn"`` logs the event; ``"skip"`` withholds the step (its gradients are dropped
    before the optimizer reads them, so neither the weights nor the optimizer's state move; only
    the conditions judged before the update can skip); ``"stop"`` withholds the step and ends the
    run (an exception in a plain loop, ``should_training_stop`` in the Trainer, ``should_stop`` in
    Lightning). A non-finite save is always refused and stops the run.

    The spike thresholds are the field's, made robust: a value is a spike when it lies more than
    ``spike_sigmas`` robust standard deviations (1.4826 x the median absolute deviation, of the
    logarithms: losses and gradient norms spike by factors and have heavy tails) above the median
    of the last ``window`` steps (OLMo-core's stability monitor: 6 sigma over 128 steps, of the
    mean and standard deviation) *and* at least ``spike_ratio`` times that median (llm-foundry's
    KillLossSpike: outlier x2); a ``"stop"`` on a spike waits for ``spike_patience`` spikes in a
    row (KillLossSpike: 4). Spikes are judged from ``min_history`` steps on.
    """

    nonfinite: Action = "skip"  # a non-finite loss, gradient or gradient norm
    loss_spike: Action = "warn"
    grad_spike: Action = "warn"
    learning_rate: Action = "warn"  # the learning rate off its schedule, or 0 where it was not
    stalled: Action = "warn"  # a parameter group's update per unit of learning rate collapses
    loss_scale: Action = "warn"  # the GradScaler's scale below min_loss_scale
    throughput: Action = "warn"  # tokens (or steps) per second below a fraction of the start
    max_skipped: int = 10  # skipped steps in all before the run is stopped
    window: int = 128
    min_history: int = 64  # steps in the window before spikes are judged (early steps move fast)
    spike_sigmas: float = 6.0
    spike_ratio: float = 2.0
    spike_patience: int = 4
    stall_factor: float = 1e-3  # of the group's first steps' update per unit of learning rate
    stall_baseline: int = 10  # the first steps (with a learning rate above 0) that set it
    min_loss_scale: float = 1.0  # DeepSpeed's default floor for its dynamic loss scale
    throughput_fraction: float = 0.5
    throughput_window: int = 50
    throughput_warmup: int = 5  # first steps left out of the start's throughput (compilation, caches)
    lr_rtol: float = 1e-6

    def __post_init__(self) -> None:
        for condition in ("nonfinite", "loss_spike", "grad_spike"):
            check_str(getattr(self, condition), f"Rules.{condition}", choices=ACTIONS)
        for condition in ("learning_rate", "stalled", "loss_scale", "throughput"):
            check_str(getattr(self, condition), f"Rules.{condition}", choices=("warn", "stop"))
        for name in ("max_skipped", "window", "min_history", "spike_patience", "stall_baseline",
                     "throughput_window", "throughput_warmup"):
            check_int(getattr(self, name), f"Rules.{name}", 0 if name in ("throughput_warmup",) else 1)
        for name in ("spike_sigmas", "spike_ratio", "stall_factor", "min_loss_scale", "lr_rtol"):
            check_number(getattr(self, name), f"Rules.{name}", low=0.0)
        check_number(self.throughput_fraction, "Rules.throughput_fraction", low=0.0, high=1.0)

    def action(self, condition: str) -> Action:
        return "stop" if condition == "checkpoint" else getattr(self, condition)


@dataclass
class Event:
    """One thing the guard saw: where, what, the values and the window it was judged against."""

    step: int  # the optimizer step it happened at (1-based, counting the steps the guard saw)
    condition: str
    action: str  # what was done: warn, skip, stop, refuse
    message: str
    value: float | None = None
    threshold: float | None = None
    window: dict[str, float] = field(default_factory=dict)  # the statistics it was judged against
    names: list[str] = field(default_factory=list)  # parameters or groups involved

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in asdict(self).items()}


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats as strings ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


class _Window:
    """The last ``size`` accepted values and their robust statistics."""

    def __init__(self, size: int, values: Sequence[float] = ()) -> None:
        self.size, self.values = size, list(values)[-size:]
        self.logs = [math.log(v) if v > 0 else math.nan for v in self.values]  # each taken once

    def add(self, value: float) -> None:
        self.values.append(value)
        self.logs.append(math.log(value) if value > 0 else math.nan)
        del self.values[:-self.size], self.logs[:-self.size]


def _spike_threshold(window: _Window, rules: Rules) -> tuple[float, dict[str, float]] | None:
    """The value above which the next one is a spike, and the window's statistics; None before
    ``min_history`` steps. Losses and gradient norms are positive and spike by factors, with heavy
    tails: the median and MAD are taken of their logarithms (a value 6 robust sigma above in log
    space), and of the values themselves where one is not positive (a loss that can be negative)."""
    values = window.values
    if len(values) < rules.min_history:
        return None
    median = statistics.median(values)
    if min(values) > 0:
        logs = window.logs
        centre = statistics.median(logs)
        sigma = 1.4826 * statistics.median(abs(v - centre) for v in logs)
        bound = math.exp(centre + rules.spike_sigmas * sigma)
        stats = {"median": median, "log_sigma": sigma, "steps": float(len(values))}
    else:
        sigma = 1.4826 * statistics.median(abs(v - median) for v in values)
        bound = median + rules.spike_sigmas * sigma
        stats = {"median": median, "sigma": sigma, "steps": float(len(values))}
    return max(bound, rules.spike_ratio * median) if median > 0 else bound, stats


class _Slices:
    """Fixed slices of a few of one group's parameters, copied before the step as one tensor and
    compared after it (a handful of kernels per group, whatever the slices' count)."""

    def __init__(self, parameters: Sequence[torch.Tensor]) -> None:
        self.slices = [(p, (p.numel() - min(p.numel(), SAMPLED_ELEMENTS)) // 2, min(p.numel(), SAMPLED_ELEMENTS))
                       for p in parameters]
        self.taken: list[tuple[torch.Tensor, int, int]] = []
        self.before: torch.Tensor | None = None

    @staticmethod
    def _gather(slices: list[tuple[torch.Tensor, int, int]]) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1)[start:start + length].float() for p, start, length in slices])

    def take(self) -> None:
        """Copy the slices of the parameters that have a gradient this step."""
        self.taken = [item for item in self.slices if item[0].grad is not None]
        self.before = self._gather(self.taken) if self.taken else None

    def change(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(squared norm of the slices' update, squared norm of the slices) on the device; None
        where nothing was taken before the step."""
        if self.before is None:
            return None
        now = self._gather(self.taken)
        before, self.before = self.before, None
        return (now - before).square().sum(), now.square().sum()


class Guard:
    """The guard over one model's optimizer steps; see :func:`lmcheck.watch`.

    Use it as a context manager around a plain loop, or through :class:`~lmcheck.watch.TrainerGuard`
    and :class:`~lmcheck.watch.LightningGuard`. ``events`` lists what it saw, ``skipped`` the
    steps it withheld, ``history`` the loss and gradient-norm curves.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 rules: Rules | None = None, scheduler: Any = None,
                 lr_schedule: Callable[[int], float | Sequence[float]] | None = None,
                 scaler: Any = None, log_dir: Any = None, stop: Literal["raise", "request"] = "raise") -> None:
        self.model = unwrap_parallel(check_model(model))
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise InputError(f"'optimizer' must be a torch.optim.Optimizer or None (got {describe(optimizer)})")
        if rules is not None and not isinstance(rules, Rules):
            raise InputError(f"'rules' must be a lmcheck.watch.Rules (got {describe(rules)})")
        if lr_schedule is not None and not callable(lr_schedule):
            raise InputError(f"'lr_schedule' must be a function of the step (0-based) giving the learning rate "
                             f"or one per parameter group (got {describe(lr_schedule)})")
        if scheduler is not None and not hasattr(scheduler, "state_dict"):
            raise InputError(f"'scheduler' must be a torch learning-rate scheduler (got {describe(scheduler)})")
        if scaler is not None and not callable(getattr(scaler, "update", None)):
            raise InputError(f"'scaler' must be a torch.amp.GradScaler (got {describe(scaler)})")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise InputError(f"'log_dir' must be a folder's path or None (got {describe(log_dir)})")
        check_str(stop, "stop", choices=("raise", "request"))
        self.rules = rules or Rules()
        self.optimizer, self.scheduler, self.lr_schedule, self.scaler = optimizer, scheduler, lr_schedule, scaler
        self.log_dir = log_dir
        self.stop_mode = stop
        self.stop_requested: Event | None = None
        self.events: list[Event] = []
        self.skipped: list[int] = []
        self.step = 0  # optimizer steps seen
        self.history: dict[str, list[Any]] = {"step": [], "loss": [], "grad_norm": []}  # step, loss or None, norm
        self._stride = 1  # the history keeps every stride-th step
        self._loss_window = _Window(self.rules.window)
        self._grad_window = _Window(self.rules.window)
        self._spikes = {"loss_spike": 0, "grad_spike": 0}  # spikes in a row
        self._stall_baseline: dict[int, list[float]] = {}  # group -> update per unit lr, first steps
        self._stalled: set[int] = set()
        self._rates: list[float] = []  # tokens (or steps) per second, each step
        self._slow = False
        self._lr_zero_said = False
        # within a step
        self._losses: list[torch.Tensor] = []
        self._tokens = 0
        self._clip_norm: torch.Tensor | None = None
        self._samples: dict[int, _Slices] = {}
        self._pending_change: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # group, lr, d2, w2
        self._last_time: float | None = None
        self._summed = False  # the step's loss is the sum of its micro-batches' (else their mean)
        self._seen_max_lrs: list[float] = []
        self._scale_said = False
        self._last_scale: torch.Tensor | None = None
        self._steps_since_update = 0
        self._shadow: Any = None
        self._handles: list[Any] = []
        self._patches: list[tuple[Any, str, Any]] = []
        self._names: dict[int, str] = {}
        self._armed = False
        self._clipping = contextlib.ExitStack()
        self._jsonl: Any = None

    # ---- arming -------------------------------------------------------------------------------

    def __enter__(self) -> Guard:
        self.arm()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def arm(self) -> None:
        """Hook the optimizer steps, the model's forward (its loss and tokens), gradient clipping,
        the loss scaler and the checkpoint savers."""
        if self._armed:
            return
        self._armed = True
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        self._handles = [register_optimizer_step_pre_hook(self._before_step),
                         register_optimizer_step_post_hook(self._after_step),
                         self.model.register_forward_hook(self._seen_forward, with_kwargs=True)]
        self._clipping = contextlib.ExitStack()
        self._clipping.enter_context(clipping_seen(self._seen_clipping))  # the norm before clipping
        self._patch_savers()
        if self.scaler is not None:
            self._patch_scaler(self.scaler)
        if self.log_dir is not None and rank() == 0:
            from pathlib import Path

            folder = Path(self.log_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self._jsonl = (folder / "lmcheck-watch.jsonl").open("a", encoding="utf-8")

    def close(self) -> None:
        """Unhook everything and write the summary (where a ``log_dir`` was given)."""
        if not self._armed:
            return
        self._armed = False
        for handle in self._handles:
            handle.remove()
        for owner, name, original in reversed(self._patches):
            if original is None:
                delattr(owner, name)  # an instance attribute over the class's method
            else:
                setattr(owner, name, original)
        self._handles, self._patches = [], []
        self._clipping.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.log_dir is not None and rank() == 0:
            from lmcheck.watch.summary import write_summary

            try:
                write_summary(self, self.log_dir)
            except (OSError, ValueError, RuntimeError) as error:  # the run's end is not to fail on its summary
                log.error("lmcheck.watch: the summary could not be written to %s: %s", self.log_dir, error)

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        self._patches.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def _patch_savers(self) -> None:
        """Every ``torch.save``, safetensors save and ``torch.distributed.checkpoint.save`` while
        armed first checks the weights and the optimizer state (a loop that imported the function
        itself before the guard is not seen: call :meth:`check_save` before saving there)."""
        import safetensors.torch as safetensors_torch

        def guarded(original: Callable[..., Any]) -> Callable[..., Any]:
            def save(*args: Any, **kwargs: Any) -> Any:
                event = self.check_save()
                if event is not None:
                    raise GuardStop(event)
                return original(*args, **kwargs)
            return save

        self._patch(torch, "save", guarded(torch.save))
        for name in ("save_file", "save_model"):
            self._patch(safetensors_torch, name, guarded(getattr(safetensors_torch, name)))
        with contextlib.suppress(ImportError):
            import torch.distributed.checkpoint as dcp

            self._patch(dcp, "save", guarded(dcp.save))

    def _patch_scaler(self, scaler: Any) -> None:
        """The scale after each ``scaler.update()``: judged at once where no optimizer step was
        taken since the last update (the scaler skipped it), else read with the next step."""
        original = scaler.update

        def update(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            scale = getattr(scaler, "_scale", None)
            if isinstance(scale, torch.Tensor):
                self._last_scale = scale.detach().clone()
                self._steps_since_update, taken = 0, self._steps_since_update
                if not taken:  # a skipped step: the scale is all there is to read
                    self._judge_scale(float(self._last_scale), self.step)
                    self._maybe_stop()
            return result

        self._patches.append((scaler, "update", None))  # an instance attribute: deleted on close
        scaler.update = update

    # ---- what the forward and clipping give -------------------------------------------------------

    def loss(self, value: torch.Tensor | float) -> None:
        """The step's loss, where the model's forward does not return one (a plain module): call it
        after each forward; the mean of the calls since the last step is the step's loss."""
        if isinstance(value, torch.Tensor):
            self._losses.append(value.detach().float().reshape(-1).mean())
        else:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise InputError(f"'value' must be the step's loss, a number or a tensor (got {describe(value)})")
            self._losses.append(torch.tensor(float(value)))

    def _seen_clipping(self, total: Any, max_norm: float) -> None:
        if isinstance(total, torch.Tensor):  # the step hook sees the clipped gradients only
            self._clip_norm = total.detach()

    def _seen_forward(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            self._tokens += ids.numel()
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().float().reshape(()))
            # a loss divided by the step's token count (the Trainer's num_items_in_batch): the
            # micro-batches' losses add up to the step's
            self._summed = kwargs.get("num_items_in_batch") is not None

    # ---- the step ------------------------------------------------------------------------------

    def _ours(self, optimizer: torch.optim.Optimizer) -> bool:
        if self.optimizer is not None:
            return optimizer is self.optimizer
        return any(id(p) in self._names for group in optimizer.param_groups for p in group["params"])

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        if not self._ours(optimizer):
            return None
        if self.optimizer is None:
            self.optimizer = optimizer
        return once_gradients_exist(args, kwargs, lambda loss: self._judge_step(optimizer, loss))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._ours(optimizer):
            return
        self._steps_since_update += 1
        for group, slices in self._samples.items():
            change = slices.change()
            if change is not None:
                lr = float(optimizer.param_groups[group].get("lr", 0.0))
                self._pending_change.append((group, lr, *change))

    def _judge_step(self, optimizer: torch.optim.Optimizer, closure_loss: Any = None) -> None:
        if isinstance(closure_loss, torch.Tensor) and closure_loss.numel() == 1 and not self._losses:
            self._losses.append(closure_loss.detach().float().reshape(()))  # Lightning's: the closure's loss
        self.step += 1
        step = self.step
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else next(iter(self.model.parameters())).device
        if self._clip_norm is not None:
            norm = self._clip_norm.to(device).float()
        elif grads:
            norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False).to(device).float()
        else:
            norm = torch.zeros((), device=device)
        # a fused optimizer under a GradScaler: the scaler sets grad_scale and found_inf on the
        # optimizer for the step, and the gradients are still scaled
        scale, found_inf = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
        if isinstance(scale, torch.Tensor):
            norm = norm / scale.reshape(()).float().to(device)
        loss = None
        if self._losses:
            losses = torch.stack([v.to(device) for v in self._losses])
            loss = losses.sum() if self._summed else losses.mean()
        now = time.perf_counter()
        elapsed = now - self._last_time if self._last_time is not None else float("nan")
        self._last_time = now
        lr_event = self._judge_lr(optimizer, step)
        # groups that moved before and get no gradient now (frozen, or cut off from the loss)
        no_grad_groups = [i for i, g in enumerate(optimizer.param_groups)
                          if g["params"] and all(p.grad is None for p in g["params"])]
        # the one synchronisation of the step: every number it judges, reduced across ranks
        host = [float(loss is not None), float(lr_event is not None), elapsed, float(self._tokens)]
        parts = [loss if loss is not None else torch.zeros((), device=device), norm, torch.tensor(host, device=device),
                 found_inf.to(device) if isinstance(found_inf, torch.Tensor) else torch.zeros((), device=device)]
        parts += [v for _, _, d2, w2 in self._pending_change for v in (d2.to(device), w2.to(device))]
        if self._last_scale is not None:
            parts.append(self._last_scale.reshape(()).float().to(device))
        vector = torch.cat([p.reshape(-1).float() for p in parts])
        if world_size() > 1:
            dist.all_reduce(vector)
            vector = vector / world_size()
        values = vector.tolist()
        self._losses, self._clip_norm, self._tokens, self._summed = [], None, 0, False
        loss_value = values[0] if values[2] > 0 else None
        norm_value, elapsed, tokens, scaler_skips = values[1], values[4], int(values[5]), values[6] > 0
        changes = [(g, lr, values[7 + 2 * i], values[8 + 2 * i]) for i, (g, lr, _, _) in enumerate(self._pending_change)]
        self._pending_change = []
        scale_value = values[-1] if self._last_scale is not None else None
        if scaler_skips:  # the GradScaler found inf or NaN and the fused step does nothing: its scale says it
            self.step -= 1
            return
        self._record(step, loss_value, norm_value)

        withheld = self._judge_before(optimizer, step, loss_value, norm_value)
        if lr_event is not None or values[3] > 0:
            self._act(lr_event or Event(step, "learning_rate", self.rules.learning_rate,
                                        f"step {step}: the learning rate is off its schedule on another rank"
                                        + _act_said(self.rules.learning_rate)))
        self._judge_stalled(step, changes, no_grad_groups, optimizer)
        if scale_value is not None:
            self._judge_scale(scale_value, step)
        self._judge_throughput(step, elapsed, tokens)
        if withheld:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        else:
            self._take_samples(optimizer)
        self._maybe_stop()

    def _record(self, step: int, loss: float | None, norm: float) -> None:
        if step % self._stride:
            return
        self.history["step"].append(step)
        self.history["loss"].append(loss)
        self.history["grad_norm"].append(norm)
        if len(self.history["step"]) > HISTORY_POINTS:
            self._stride *= 2
            for key, values in self.history.items():
                self.history[key] = [v for s, v in zip(self.history["step"], values, strict=True)
                                     if s % self._stride == 0]

    def _judge_before(self, optimizer: torch.optim.Optimizer, step: int, loss: float | None, norm: float) -> bool:
        """The conditions that can withhold the step: True where it is withheld."""
        rules = self.rules
        if (loss is not None and not math.isfinite(loss)) or not math.isfinite(norm):
            where = self._non_finite_gradients(optimizer)
            what = (f"the loss is {loss}" if loss is not None and not math.isfinite(loss) else
                    f"the gradient norm is {norm}")
            event = Event(step, "nonfinite", rules.nonfinite,
                          f"step {step}: {what}" + (f"; non-finite gradients in {', '.join(where[:3])}"
                                                    + (f" and {len(where) - 3} more" if len(where) > 3 else "")
                                                    if where else "") + _act_said(rules.nonfinite),
                          value=loss if loss is not None and not math.isfinite(loss) else norm, names=where)
            return self._act(event)
        withheld = False
        for condition, value, window in (("loss_spike", loss, self._loss_window), ("grad_spike", norm, self._grad_window)):
            if value is None:
                continue
            judged = _spike_threshold(window, rules)
            if judged is not None and not value <= judged[0]:
                self._spikes[condition] += 1
                threshold, stats = judged
                action = rules.action(condition)
                if action == "stop" and self._spikes[condition] < rules.spike_patience:
                    action = "warn"
                what = "loss" if condition == "loss_spike" else "gradient norm"
                spread = (f"x{math.exp(rules.spike_sigmas * stats['log_sigma']):.3g} (the median's {rules.spike_sigmas:g} "
                          f"robust sigma in log space)" if "log_sigma" in stats else
                          f"+ {rules.spike_sigmas:g} robust sigma {stats['sigma']:.3g}")
                event = Event(step, condition, action,
                              f"step {step}: the {what} {value:.4g} is above {threshold:.4g}: the median "
                              f"{stats['median']:.4g} of the last {int(stats['steps'])} steps {spread}, and at least "
                              f"x{rules.spike_ratio:g} the median"
                              + (f", {self._spikes[condition]} in a row" if self._spikes[condition] > 1 else "")
                              + _act_said(action), value=value, threshold=threshold, window=stats)
                withheld = self._act(event) or withheld
                if action == "warn":
                    window.add(value)
            else:
                self._spikes[condition] = 0
                window.add(value)
        return withheld

    def _non_finite_gradients(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """The parameters whose gradient holds a NaN or Inf (one check each: only on the rare step
        where the norm is not finite)."""
        found = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    found.append(self._names.get(id(p), "an unnamed parameter"))
        return found

    def _judge_lr(self, optimizer: torch.optim.Optimizer, step: int) -> Event | None:
        """The learning rates against the given schedule, else the scheduler's own course recorded
        at the start (a copy of it stepped beside the real one), else: none falls to 0 from above."""
        lrs = [float(g.get("lr", 0.0)) for g in optimizer.param_groups]
        expected: list[float] | None = None
        source = ""
        if self.lr_schedule is not None:
            planned = self.lr_schedule(step - 1)
            expected = [float(v) for v in planned] if isinstance(planned, Sequence) else [float(planned)] * len(lrs)
            source = "the schedule it was given"
        elif self.scheduler is not None:
            expected = self._shadow_lrs(optimizer)
            source = "the scheduler's course recorded at the start"
        bad = [] if expected is None else [
            i for i, (got, want) in enumerate(zip(lrs, expected, strict=False))
            if not abs(got - want) <= self.rules.lr_rtol * max(abs(want), 1e-12)]
        if bad and expected is not None:
            i = bad[0]
            return Event(step, "learning_rate", self.rules.learning_rate,
                         f"step {step}: the learning rate of parameter group {i} is {lrs[i]:.6g}, not {expected[i]:.6g} "
                         f"({source})" + _act_said(self.rules.learning_rate), value=lrs[i], threshold=expected[i],
                         names=[f"param_groups[{j}]" for j in bad])
        if expected is None:
            zero = [i for i, (lr, first) in enumerate(zip(lrs, self._max_lrs(lrs), strict=True)) if lr == 0 < first]
            if zero and not self._lr_zero_said:
                self._lr_zero_said = True
                return Event(step, "learning_rate", self.rules.learning_rate,
                             f"step {step}: the learning rate of parameter group {zero[0]} is 0 after it was "
                             f"{self._max_lrs(lrs)[zero[0]]:.6g}: its weights stop moving (give the guard the "
                             f"scheduler or lr_schedule to judge a schedule)" + _act_said(self.rules.learning_rate),
                             value=0.0, names=[f"param_groups[{j}]" for j in zero])
            if not zero:
                self._lr_zero_said = False
        return None

    def _max_lrs(self, lrs: list[float]) -> list[float]:
        seen = self._seen_max_lrs
        self._seen_max_lrs = [max(a, b) for a, b in zip(seen, lrs, strict=False)] + lrs[len(seen):]
        return self._seen_max_lrs

    def _shadow_lrs(self, optimizer: torch.optim.Optimizer) -> list[float] | None:
        """The scheduler's learning rates at its current step, from a copy of it made at the
        start over stand-in parameters (no copy of the weights or the optimizer's state)."""
        scheduler = self.scheduler
        last = getattr(scheduler, "last_epoch", None)
        stepwise = isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) and not isinstance(
            scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)  # a plateau's course depends on the metric
        if not stepwise or not isinstance(last, int):
            return None
        if self._shadow is None:
            memo: dict[int, Any] = {}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    memo[id(p)] = torch.zeros(())
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        memo[id(value)] = torch.zeros(())
            try:
                self._shadow = copy.deepcopy(scheduler, memo)
            except Exception as error:  # noqa: BLE001 -- a scheduler that cannot be copied: judged without it
                log.warning("lmcheck.watch: the scheduler %s could not be copied (%s): the learning rate is judged "
                            "without its course", type(scheduler).__name__, error)
                self.scheduler = None
                return None
        shadow = self._shadow
        if last < shadow.last_epoch:  # the schedule went back: restarted, or loaded from elsewhere
            return [math.nan] * len(optimizer.param_groups)
        if shadow.last_epoch < last:
            with _quiet_scheduler():
                while shadow.last_epoch < last:
                    shadow.step()
        return [float(g["lr"]) for g in shadow.optimizer.param_groups]

    def _judge_stalled(self, step: int, changes: list[tuple[int, float, float, float]], no_grad: list[int],
                       optimizer: torch.optim.Optimizer) -> None:
        rules = self.rules
        stalled: list[tuple[int, str, float, float]] = []
        for group in no_grad:
            if group in self._stall_baseline and group not in self._stalled:
                stalled.append((group, "none of its parameters has a gradient any more (frozen, or cut off "
                                       "from the loss)", 0.0, 0.0))
        for group, lr, d2, w2 in changes:
            if not (lr > 0 and w2 > 0) or group in no_grad:
                continue
            per_lr = math.sqrt(d2 / w2) / lr
            first = self._stall_baseline.setdefault(group, [])
            if len(first) < rules.stall_baseline:
                first.append(per_lr)
                continue
            start = statistics.median(first)
            if not start > 0:  # a group that did not move in its first steps: nothing to fall from
                continue
            floor = rules.stall_factor * start
            if not per_lr > floor:
                if group not in self._stalled:
                    stalled.append((group, f"its update per unit of learning rate is {per_lr:.3g}, below "
                                           f"{rules.stall_factor:g} x its first steps' {start:.3g}",
                                    per_lr, floor))
            else:
                self._stalled.discard(group)
        for group, why, value, floor in stalled:
            self._stalled.add(group)
            names = [self._names.get(id(p), "?") for p in optimizer.param_groups[group]["params"]][:5]
            self._act(Event(step, "stalled", rules.stalled,
                            f"step {step}: parameter group {group} stopped moving: {why} (first: {names[0]})"
                            + _act_said(rules.stalled), value=value, threshold=floor, names=names))

    def _judge_scale(self, scale: float, step: int) -> None:
        if not scale >= self.rules.min_loss_scale:
            if self._scale_said:
                return
            self._scale_said = True
            self._act(Event(step, "loss_scale", self.rules.loss_scale,
                            f"step {step}: the GradScaler's loss scale is {scale:.4g}, below {self.rules.min_loss_scale:g}: "
                            f"its gradients overflow at every scale it tries (inf or NaN in the fp16 backward)"
                            + _act_said(self.rules.loss_scale), value=scale, threshold=self.rules.min_loss_scale))
        else:
            self._scale_said = False

    def _judge_throughput(self, step: int, elapsed: float, tokens: int) -> None:
        rules = self.rules
        if not (elapsed > 0):  # the first step, or a clock that did not move
            return
        self._rates.append((tokens or 1) / elapsed)
        start = rules.throughput_warmup
        if len(self._rates) < start + 2 * rules.throughput_window:
            return
        base = statistics.median(self._rates[start:start + rules.throughput_window])
        now = statistics.median(self._rates[-rules.throughput_window:])
        del self._rates[start + rules.throughput_window:-rules.throughput_window]
        unit = "tokens" if tokens else "steps"
        if not now >= rules.throughput_fraction * base:
            if not self._slow:
                self._slow = True
                self._act(Event(step, "throughput", rules.throughput,
                                f"step {step}: {now:.4g} {unit}/s over the last {rules.throughput_window} steps, below "
                                f"{rules.throughput_fraction:g} x the start's {base:.4g}" + _act_said(rules.throughput),
                                value=now, threshold=rules.throughput_fraction * base,
                                window={"start": base, "steps": float(rules.throughput_window)}))
        else:
            self._slow = False

    def _take_samples(self, optimizer: torch.optim.Optimizer) -> None:
        """Copy the sampled slices before the update (the same slices every step)."""
        if not self._samples:
            for i, group in enumerate(optimizer.param_groups):
                trainable = [p for p in group["params"] if p.requires_grad and p.numel()]
                if not trainable:
                    continue
                chosen = trainable[:: max(1, len(trainable) // SAMPLED_PARAMETERS)][:SAMPLED_PARAMETERS]
                self._samples[i] = _Slices(chosen)
        for slices in self._samples.values():
            slices.take()

    # ---- actions -------------------------------------------------------------------------------

    def _act(self, event: Event) -> bool:
        """Record the event and do its action: True where the step is withheld."""
        if event.action == "skip":
            self.skipped.append(event.step)
            if len(self.skipped) > self.rules.max_skipped:
                event.action = "stop"
                event.message += f"; {len(self.skipped)} steps skipped, above max_skipped={self.rules.max_skipped}: stopped"
        self.events.append(event)
        (log.error if event.action in ("stop", "refuse") else log.warning)("lmcheck.watch: %s", event.message)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(event.to_dict()) + "\n")
            self._jsonl.flush()
        if event.action in ("stop", "refuse") and self.stop_requested is None:
            self.stop_requested = event
        return event.action in ("skip", "stop") and event.condition in SKIPPABLE

    def _maybe_stop(self) -> None:
        if self.stop_requested is not None and self.stop_mode == "raise":
            raise GuardStop(self.stop_requested)

    # ---- checkpoints ---------------------------------------------------------------------------

    def check_save(self) -> Event | None:
        """Before a checkpoint is saved: the weights and the optimizer's state are finite, else the
        save is refused (an ``Event``, and the run is to stop). One synchronisation."""
        tensors = [p.detach() for p in self.model.parameters()]
        names = [self._names.get(id(p), "?") for p in self.model.parameters()]
        if self.optimizer is not None:
            for p, state in self.optimizer.state.items():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                        tensors.append(value.detach())
                        names.append(f"optimizer state {key} of {self._names.get(id(p), '?')}")
        if not tensors:
            return None
        flags = torch.stack([torch.isfinite(t).all().to(tensors[0].device) for t in tensors])
        if bool(flags.all()):
            return None
        bad = [n for n, ok in zip(names, flags.tolist(), strict=True) if not ok]
        event = Event(self.step, "checkpoint", "refuse",
                      f"step {self.step}: checkpoint save refused: non-finite values in {', '.join(bad[:3])}"
                      + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
                      + "; the last checkpoint saved is kept as it is and the run stops", names=bad[:20])
        self._act(event)
        return event

    # ---- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The guard's windows, counts, baselines, events and curves, as one JSON string (so that
        ``torch.distributed.checkpoint`` and the Trainer's callback state both take it as is)."""
        state = {
            "version": 1, "step": self.step, "skipped": self.skipped, "stride": self._stride,
            "loss_window": self._loss_window.values, "grad_window": self._grad_window.values,
            "spikes": self._spikes, "stall_baseline": {str(k): v for k, v in self._stall_baseline.items()},
            "stalled": sorted(self._stalled), "rates": self._rates, "slow": self._slow,
            "history": self.history, "events": [e.to_dict() for e in self.events],
        }
        return {"lmcheck_watch": json.dumps(_plain(state))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or not isinstance(state.get("lmcheck_watch"), (str, bytes)):
            raise InputError(f"'state' must be a dict made by Guard.state_dict() (got {describe(state)})")
        saved = json.loads(state["lmcheck_watch"])
        self.step, self.skipped, self._stride = saved["step"], saved["skipped"], saved["stride"]
        self._loss_window = _Window(self.rules.window, saved["loss_window"])
        self._grad_window = _Window(self.rules.window, saved["grad_window"])
        self._spikes = saved["spikes"]
        self._stall_baseline = {int(k): v for k, v in saved["stall_baseline"].items()}
        self._stalled, self._rates, self._slow = set(saved["stalled"]), saved["rates"], saved["slow"]
        self.history = {k: [float(v) if isinstance(v, str) else v for v in values]  # "nan" back to a float
                        for k, values in saved["history"].items()}
        events: list[dict[str, Any]] = saved["events"]
        for event in events:
            for key in ("value", "threshold"):
                if isinstance(event.get(key), str):  # "nan", "inf" back to floats
                    event[key] = float(event[key])
        self.events = [Event(**event) for event in events]


def _act_said(action: str) -> str:
    return {"warn": "", "skip": ": step skipped (not applied)", "stop": ": step not applied; the run stops"}.get(action, "")


@contextlib.contextmanager
def _quiet_scheduler() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
