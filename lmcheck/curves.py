"""The loss curve of a training run, and the probes that judge a run from its curve alone.

A :class:`LossCurve` holds the training loss per optimizer step and the validation loss per
evaluation. lmcheck's loops record one (``lmcheck.loops.pretraining``); a user can fill one from any loop
with ``curve.record_train(step, loss)``. The probes here read only the curve: does the loss fall
(:func:`loss_decreases`), can the model overfit (:func:`overfits`), does validation stay above
training (:func:`generalization_gap`), is every loss finite (:func:`finite_loss`), do two seeded
runs agree (:func:`reproducible`). Probes that need the model or a batch are in
``lmcheck.training``. None of them prints, asserts or raises on a failed check.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcheck._finite import non_finite_result, probe
from lmcheck._validate import check_int, check_number, describe
from lmcheck.errors import InputError
from lmcheck.results import Result, headroom_above, headroom_below

__all__ = [
    "LossCurve",
    "finite_loss",
    "generalization_gap",
    "loss_decreases",
    "overfits",
    "reproducible",
]


@dataclass
class LossCurve:
    """Training loss per optimizer step and validation loss per evaluation, with metadata.

    Attributes:
        train: ``(step, loss)`` for every optimizer step (steps count from 1).
        valid: ``(step, loss)`` for every evaluation.
        metadata: how the curve was made (backend, learning rate, tokens/s, ...), JSON-ready.
        stop_reason: why training ended: ``"max_steps"``, ``"memorized"`` or ``"non-finite loss"``.
        non_finite_step: the first step whose training loss was NaN or infinite, else None.
    """

    train: list[tuple[int, float]] = field(default_factory=list)
    valid: list[tuple[int, float]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    stop_reason: str = ""
    non_finite_step: int | None = None

    def record_train(self, step: int, loss: float) -> bool:
        """Record one step's training loss; returns False (and notes the step) if it is not finite."""
        self.train.append((int(step), float(loss)))
        if not math.isfinite(loss):
            if self.non_finite_step is None:
                self.non_finite_step = int(step)
            return False
        return True

    def record_valid(self, step: int, loss: float) -> None:
        self.valid.append((int(step), float(loss)))

    @property
    def steps(self) -> int:
        """The last recorded optimizer step (0 before training)."""
        return self.train[-1][0] if self.train else 0

    def to_dict(self) -> dict[str, Any]:
        def number(value: float) -> float | str:
            return value if math.isfinite(value) else str(value)

        return {
            "train": [[s, number(v)] for s, v in self.train],
            "valid": [[s, number(v)] for s, v in self.valid],
            "metadata": self.metadata,
            "stop_reason": self.stop_reason,
            "non_finite_step": self.non_finite_step,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossCurve:
        return cls(
            train=[(int(s), float(v)) for s, v in data.get("train", [])],
            valid=[(int(s), float(v)) for s, v in data.get("valid", [])],
            metadata=dict(data.get("metadata", {})),
            stop_reason=str(data.get("stop_reason", "")),
            non_finite_step=data.get("non_finite_step"),
        )

    def to_json(self, path: str | Path) -> Path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=1))
        return target


# ---------------------------------------------------------------- probes that read a loss curve


@probe("loss_decreases")
def loss_decreases(
    curve: LossCurve, *, steps: int | None = None, min_relative_drop: float = 0.5, window: int = 3,
) -> Result:
    """The training loss falls by at least ``min_relative_drop`` (a fraction) within ``steps``.

    The drop compares the mean of the first ``window`` losses with the mean of the ``window``
    losses up to step ``steps`` (default: the whole curve). Fails on a non-finite loss.
    """
    name = "loss_decreases"
    _check_curve(curve, "curve")
    check_int(window, "window", 1)
    check_number(min_relative_drop, "min_relative_drop")
    if steps is not None:
        check_int(steps, "steps", 1)
    if (bad := _non_finite(name, curve)) is not None:
        return bad
    losses = [v for s, v in curve.train if steps is None or s <= steps]
    if len(losses) < 2 * window:
        return Result(name=name, passed=False, metrics={"steps": len(losses)},
                      threshold=min_relative_drop, headroom=None,
                      explanation=f"the curve has {len(losses)} training losses; {2 * window} are needed "
                      f"to compare two windows of {window}")
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    drop = (first - last) / abs(first) if first else 0.0
    passed = drop >= min_relative_drop
    explanation = (f"training loss went from {first:.3f} to {last:.3f} over {len(losses)} steps, "
                   f"a {drop:.1%} drop (needed {min_relative_drop:.0%})")
    if not passed:
        explanation += ("; the optimizer is not moving the model: check the learning rate, that "
                        "the optimizer holds the parameters, and that gradients reach them")
    return Result(name=name, passed=passed,
                  metrics={"first": first, "last": last, "relative_drop": drop,
                                 "steps": len(losses)},
                  threshold=min_relative_drop, headroom=headroom_above(drop, min_relative_drop),
                  explanation=explanation)


@probe("overfits")
def overfits(curve: LossCurve, *, max_loss: float = 0.5, within_steps: int | None = None) -> Result:
    """The training loss reaches ``max_loss`` (nats) or less within ``within_steps`` steps."""
    name = "overfits"
    _check_curve(curve, "curve")
    check_number(max_loss, "max_loss")
    if within_steps is not None:
        check_int(within_steps, "within_steps", 1)
    if (bad := _non_finite(name, curve)) is not None:
        return bad
    losses = [(s, v) for s, v in curve.train if within_steps is None or s <= within_steps]
    if not losses:
        return Result(name=name, passed=False, metrics={}, threshold=max_loss, headroom=None,
                      explanation="the curve has no training losses")
    best_step, best = min(losses, key=lambda item: item[1])
    reached = next((s for s, v in losses if v <= max_loss), None)
    budget = f"within {within_steps} steps" if within_steps is not None else f"in {len(losses)} steps"
    if reached is not None:
        explanation = (f"training loss reached {max_loss} at step {reached} {budget} "
                       f"(lowest {best:.4f} at step {best_step})")
    else:
        explanation = (f"training loss never reached {max_loss} {budget}: lowest {best:.4f} at "
                       f"step {best_step}. A model that cannot overfit a few chunks has a bug "
                       f"(labels not aligned with inputs, learning rate, masking) or too little capacity")
    return Result(name=name, passed=reached is not None,
                  metrics={"lowest_loss": best, "lowest_step": best_step, "reached_at_step": reached},
                  threshold=max_loss, headroom=headroom_below(best, max_loss),
                  explanation=explanation)


@probe("generalization_gap")
def generalization_gap(curve: LossCurve, *, min_gap: float = 1.0, window: int = 3) -> Result:
    """After overfitting a small subset, validation loss stays ``min_gap`` nats above training loss.

    This is the honest overfit signature (the tutorial's Figure 1). A validation loss that falls
    with the training loss means the model sees something it should not: validation data in the
    training set, or future tokens through the attention mask.
    """
    name = "generalization_gap"
    _check_curve(curve, "curve")
    check_int(window, "window", 1)
    check_number(min_gap, "min_gap")
    if (bad := _non_finite(name, curve)) is not None:
        return bad
    if not curve.valid or not curve.train:
        return Result(name=name, passed=False, metrics={}, threshold=min_gap, headroom=None,
                      explanation="the curve needs at least one training and one validation loss")
    step, valid = curve.valid[-1]
    recent = [v for s, v in curve.train if s <= step][-window:] or [curve.train[0][1]]
    train = sum(recent) / len(recent)
    gap = valid - train
    passed = gap >= min_gap
    explanation = (f"at step {step} validation loss {valid:.3f} is {gap:.3f} above training loss "
                   f"{train:.3f} (needed {min_gap})")
    explanation += (": the model memorized its chunks without learning what transfers" if passed else
                    ": validation fell with training; check for validation documents in the "
                    "training data or an attention mask that lets positions see the future")
    return Result(name=name, passed=passed,
                  metrics={"step": step, "valid_loss": valid, "train_loss": train, "gap": gap},
                  threshold=min_gap, headroom=headroom_above(gap, min_gap), explanation=explanation)


@probe("finite_loss")
def finite_loss(curve: LossCurve) -> Result:
    """Every recorded training and validation loss is finite; a failure names the first bad step."""
    _check_curve(curve, "curve")
    bad = _non_finite("finite_loss", curve)
    if bad is not None:
        return bad
    return Result(name="finite_loss", passed=True, metrics={"steps": curve.steps}, threshold=None,
                  headroom=None,
                  explanation=f"all {len(curve.train)} training and {len(curve.valid)} validation losses are finite")


@probe("reproducible")
def reproducible(
    first: LossCurve, second: LossCurve, *, steps: int = 5, atol: float = 0.0,
) -> Result:
    """Two runs with the same seed give the same first ``steps`` training losses (within ``atol``).

    On a CPU the default ``atol=0`` asks for bit-identical losses; GPU kernels may need a little.
    """
    name = "reproducible"
    _check_curve(first, "first")
    _check_curve(second, "second")
    check_int(steps, "steps", 1)
    check_number(atol, "atol", low=0)
    a, b = first.train[:steps], second.train[:steps]
    for argument, curve in (("first", first), ("second", second)):
        bad_curve = _non_finite(name, LossCurve(train=curve.train[:steps]), argument)
        if bad_curve is not None:
            return bad_curve
    if len(a) < steps or len(b) < steps:
        return Result(name=name, passed=False, metrics={"lengths": [len(a), len(b)]},
                      threshold=atol, headroom=None,
                      explanation=f"both curves need {steps} training losses (got {len(a)} and {len(b)})")
    differences = [abs(x - y) if math.isfinite(x) and math.isfinite(y) else math.inf
                   for (_, x), (_, y) in zip(a, b, strict=True)]
    worst = max(differences)
    bad = next((i for i, d in enumerate(differences) if d > atol), None)
    if bad is None:
        explanation = f"the first {steps} training losses agree (largest difference {worst:.3g}, allowed {atol})"
    else:
        explanation = (f"step {a[bad][0]}: losses {a[bad][1]!r} and {b[bad][1]!r} differ by "
                       f"{differences[bad]:.3g} (allowed {atol}); something is not seeded "
                       f"(initialisation, data order, dropout) or a kernel is not deterministic")
    return Result(name=name, passed=bad is None,
                  metrics={"max_difference": worst, "first_bad_step": None if bad is None else a[bad][0]},
                  threshold=atol, headroom=None, explanation=explanation,
                  details=tuple({"step": s, "first": x, "second": y} for (s, x), (_, y) in zip(a, b, strict=True)))


def _check_curve(curve: object, argument: str) -> None:
    if not isinstance(curve, LossCurve):
        raise InputError(f"'{argument}' must be a LossCurve (as pretrain records, or filled with "
                         f"record_train) (got {describe(curve)})")


def _non_finite(name: str, curve: LossCurve, argument: str = "") -> Result | None:
    """A failed Result naming the first non-finite training (else validation) loss, or None."""
    found = next(((s, v, "training") for s, v in curve.train if not math.isfinite(v)), None)
    if found is None:
        found = next(((s, v, "validation") for s, v in curve.valid if not math.isfinite(v)), None)
    if found is None:
        return None
    step, value, where = found
    stopped = " and training stopped there" if curve.stop_reason == "non-finite loss" else ""
    curve_name = f"'{argument}': " if argument else ""
    return non_finite_result(
        name, f"{curve_name}the {where} loss at step {step} is {value} (not finite){stopped}: look "
              f"for a NaN or Inf in that step's batch, logits or gradients (learning rate, fp16 "
              f"overflow)", non_finite_step=step)
