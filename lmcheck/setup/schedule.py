"""The schedule family of the setup checks: ``lr_schedule`` (the learning rate at each recorded
optimizer step is the schedule's value for that step, never zero after the first) and the peak
of the schedule the overfitting run holds."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lmcheck._recording import OptimizerStep, Snapshot
from lmcheck.results import Result


def lr_schedule(steps: Sequence[OptimizerStep], scheduler: Any, snapshot: Snapshot,
                schedule: Callable[[int], float] | None) -> Result:
    """The learning rate at each recorded step against ``schedule`` (the expected rate at optimizer
    step i), else ``scheduler`` replayed from its saved state (``snapshot``) once per step."""
    name = "lr_schedule"
    observed = [s.lrs[0] for s in steps]
    k = max(1, min(s.micro_batches for s in steps))
    metrics: dict[str, Any] = {"observed": observed, "micro_batches_per_step": k}
    problems = []
    zeros = [s.index for s in steps if all(lr == 0 for lr in s.lrs)]
    if any(i > 1 for i in zeros):
        problems.append(f"the learning rate is 0 at optimizer step{'s' if len(zeros) > 1 else ''} "
                        f"{', '.join(map(str, zeros[:5]))}: nothing is learned there (a warmup that never "
                        f"starts, or a scheduler that is never stepped)")
    expected: list[float] | None = None
    source = ""
    if schedule is not None:
        expected = [float(schedule(i)) for i in range(len(steps) * k + k + 1)]
        source = "the given schedule"
    elif isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        source = ""  # it follows a metric, not the step count: nothing to replay
    elif scheduler is not None:
        expected = _replay(scheduler, snapshot, len(steps) * k + k + 1)
        source = f"{type(scheduler).__name__} stepped once per optimizer step"
    if expected is not None:
        metrics["expected"] = expected[: len(steps)]
        wrong = [i for i, lr in enumerate(observed) if not math.isclose(lr, expected[i], rel_tol=1e-6, abs_tol=1e-12)]
        if wrong:
            i = wrong[0]
            per_micro = k > 1 and any(all(math.isclose(lr, expected[j * k + offset], rel_tol=1e-6, abs_tol=1e-12)
                                          for j, lr in enumerate(observed)) for offset in range(k + 1))
            problems.append(
                f"at optimizer step {i + 1} the learning rate is {observed[i]:.4g}, but {source} gives "
                f"{expected[i]:.4g}" + (f"; the observed rates are the schedule counted in micro-batches ({k} per step): "
                                        f"the scheduler is stepped on every micro-batch, so warmup and decay "
                                        f"run {k} times too fast (Lightning #1476)" if per_micro else ""))
    passed = not problems
    if passed:
        explanation = (f"the learning rate at {len(steps)} optimizer steps follows {source}" if expected is not None
                       else f"the learning rate at {len(steps)} optimizer steps is never 0 after the first; no "
                            + ("step-counted schedule to compare with (ReduceLROnPlateau follows a metric)"
                               if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
                               else "schedule to compare with (pass scheduler= or schedule=)"))
        explanation += f" ({', '.join(f'{lr:.3g}' for lr in observed[:4])}{' ...' if len(observed) > 4 else ''})"
    else:
        explanation = "; ".join(problems)
    return Result(name=name, passed=passed, metrics=metrics, explanation=explanation)


def _replay(scheduler: Any, snapshot: Snapshot, count: int) -> list[float]:
    """The scheduler's learning rate over ``count`` steps from its saved start, stepped once per
    optimizer step; the states are put back afterwards."""
    snapshot.restore()
    optimizer = scheduler.optimizer
    last = getattr(scheduler, "_last_lr", None)
    if isinstance(last, (list, tuple)) and len(last) == len(optimizer.param_groups):
        # the rates the scheduler set when it was saved: an optimizer the user built before the
        # Trainer made its scheduler was saved with the rate of its construction
        for group, lr in zip(optimizer.param_groups, last, strict=True):
            group["lr"] = float(lr)
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(count):
            rates.append(float(optimizer.param_groups[0]["lr"]))
            scheduler.step()
    snapshot.restore()
    return rates


def peak_lrs(steps: Sequence[OptimizerStep], snapshot: Snapshot, scheduler: Any) -> tuple[float, ...] | None:
    """The peak of the user's schedule for each parameter group: the highest of the rates seen in
    the first run, the groups' ``initial_lr`` (what a torch scheduler scales) and the scheduler's
    ``base_lrs``; None where no step was seen."""
    if not steps:
        return None
    groups = len(steps[0].lrs)
    peaks = [max(s.lrs[i] for s in steps if i < len(s.lrs)) for i in range(groups)]
    candidates: list[Sequence[float]] = []
    base = getattr(scheduler, "base_lrs", None)
    if isinstance(base, (list, tuple)) and len(base) == groups:
        candidates.append([float(v) for v in base])
    for item, state in snapshot.objects.values():
        if isinstance(item, torch.optim.Optimizer) and len(state.get("param_groups", ())) == groups:
            candidates.append([float(g.get("initial_lr", g.get("lr", 0.0))) for g in state["param_groups"]])
    for values in candidates:
        peaks = [max(a, b) for a, b in zip(peaks, values, strict=True)]
    return tuple(peaks) if any(p > 0 for p in peaks) else None
