"""The one result type that every probe returns.

A probe never raises on a failed check: it returns ``Result(passed=False, ...)`` whose
``explanation`` says what went wrong and where. A result is truthy when it passed, so the
idiom in tests and in user code is ``assert result, result.explanation``; outside tests,
``if not result: print(result.explanation)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Result", "headroom_above", "headroom_below"]


@dataclass(frozen=True)
class Result:
    """The outcome of one probe.

    Attributes:
        name: the probe's name, e.g. ``"greedy_matches_generate"``.
        passed: whether the check held.
        metrics: what the probe measured (numbers, short lists, strings), JSON-serialisable.
        threshold: the bound the main metric was held to, or None where the check is exact.
        headroom: how far the main metric stood from failing, as a fraction of the threshold
            (positive: passed with that margin; negative: failed by that much). None where the
            check is exact (equal or not).
        explanation: one or two sentences a person can act on.
        details: per-item rows (per case, per step, per parameter) for reports.
    """

    name: str
    passed: bool
    metrics: Mapping[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    headroom: float | None = None
    explanation: str = ""
    details: tuple[Mapping[str, Any], ...] = ()

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (non-finite floats become strings)."""
        return {
            "name": self.name,
            "passed": self.passed,
            "metrics": _jsonable(dict(self.metrics)),
            "threshold": _jsonable(self.threshold),
            "headroom": _jsonable(self.headroom),
            "explanation": self.explanation,
            "details": _jsonable([dict(row) for row in self.details]),
        }

    def __str__(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        return f"[{status}] {self.name}: {self.explanation}"


def headroom_below(value: float, threshold: float) -> float:
    """Headroom of a value that must stay below ``threshold`` (1.0 = value is zero)."""
    if threshold == 0:
        return 0.0 if value <= 0 else -math.inf
    return (threshold - value) / abs(threshold)


def headroom_above(value: float, threshold: float) -> float:
    """Headroom of a value that must reach ``threshold`` or more."""
    if threshold == 0:
        return math.inf if value > 0 else 0.0
    return (value - threshold) / abs(threshold)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError, RuntimeError):
            return str(value)
    return value
