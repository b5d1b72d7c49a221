"""The one result type that every probe returns.

A probe never raises on a failed check: it returns ``Result(passed=False, ...)`` whose
``explanation`` says what went wrong and where. A result cannot pass with a NaN in its metrics or
headroom (NaN compares False with everything, so a ``difference > tolerance`` test would let it
through): such a result is made a failure that names the NaN, and a NaN headroom becomes -inf. A
result is truthy when it passed, so the idiom in tests and in user code is
``assert result, result.explanation``; outside tests, ``if not result: print(result.explanation)``.

A probe that needs something the model lacks (an attention-mask argument, a KV cache,
``generate``) returns a *not-applicable* result (:meth:`Result.not_applicable`): ``status`` is
``"n/a"``, ``passed`` is False (it never counts as a pass) and ``skip_reason`` says why. The
pytest plugin shows it as a skip, ``lmcheck check`` as "n/a".

A check of a battery that raised (inside the model, or inside lmcheck) is an *error*
(:meth:`Result.from_exception`): ``status`` is ``"error"``, ``passed`` is False, and ``error``
holds the exception and where it was raised. It is neither a pass nor a failure of the model:
the check could not say. The other checks of the battery still run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lmcheck.errors import InputError

__all__ = ["Result", "headroom_above", "headroom_below"]


@dataclass(frozen=True, kw_only=True)
class Result:
    """The outcome of one probe, built by keyword: ``Result(name=..., passed=..., ...)``.

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
        skip_reason: why the check did not apply to this model; empty when it ran.
        error: the exception that stopped the check and where it was raised (``"RuntimeError:
            ... (modeling_ctrl.py:316, in forward)"``); empty when the check ran to its verdict.
    """

    name: str
    passed: bool
    metrics: Mapping[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    headroom: float | None = None
    explanation: str = ""
    details: tuple[Mapping[str, Any], ...] = ()
    skip_reason: str = ""
    error: str = ""

    @classmethod
    def from_exception(cls, name: str, error: BaseException) -> Result:
        """The outcome of a check that raised: ``status == "error"``, the exception and the
        innermost frame it came from in ``error``, the whole chain's messages in the explanation."""
        if not isinstance(error, BaseException):
            raise InputError(f"'error' must be an exception (got {type(error).__name__})")
        message = " ".join(str(error).split()) or "(no message)"
        where = raised_at(error)
        said = f"{type(error).__name__}: {message}" + (f" ({where})" if where else "")
        return cls(name=name, passed=False, error=said,
                   explanation=f"error: the check could not run to a verdict; it raised {said}")

    @classmethod
    def not_applicable(cls, name: str, reason: str) -> Result:
        """The outcome of a check that did not apply: neither a pass nor a failure."""
        if not (isinstance(reason, str) and reason):
            raise InputError(f"'reason' must say why the check does not apply (got {reason!r})")
        return cls(name=name, passed=False, explanation=f"not applicable: {reason}", skip_reason=reason)

    @property
    def status(self) -> str:
        """``"pass"``, ``"fail"``, ``"n/a"`` or ``"error"``."""
        if self.error:
            return "error"
        return "n/a" if self.skip_reason else "pass" if self.passed else "fail"

    def __post_init__(self) -> None:
        if self.skip_reason and self.passed:
            raise InputError(f"a not-applicable result cannot pass ({self.name!r}: {self.skip_reason})")
        if self.error and self.passed:
            raise InputError(f"a result that raised cannot pass ({self.name!r}: {self.error})")
        if self.headroom is not None and math.isnan(self.headroom):
            object.__setattr__(self, "headroom", -math.inf)
            if self.passed:
                self._fail("the headroom is NaN")
        if self.passed:
            where = _first_nan(self.metrics, "metrics")
            if where is not None:
                self._fail(f"{where} is NaN")

    def _fail(self, reason: str) -> None:
        """Make this result a failure: NaN or Inf never passes (set only from __post_init__)."""
        object.__setattr__(self, "passed", False)
        object.__setattr__(self, "headroom", -math.inf)
        object.__setattr__(self, "explanation", f"{reason}, so the check cannot pass: a NaN "
                           f"compares False with every bound (the check said: {self.explanation})")

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (non-finite floats become strings)."""
        return {
            "name": self.name,
            "passed": self.passed,
            "status": self.status,
            "metrics": _jsonable(dict(self.metrics)),
            "threshold": _jsonable(self.threshold),
            "headroom": _jsonable(self.headroom),
            "explanation": self.explanation,
            "details": _jsonable([dict(row) for row in self.details]),
            "skip_reason": self.skip_reason,
            "error": self.error,
        }

    def __str__(self) -> str:
        return f"[{self.status.upper()}] {self.name}: {self.explanation}"


def raised_at(error: BaseException) -> str:
    """Where ``error`` was raised: the innermost frame's file, line and function
    (``"modeling_ctrl.py:316, in forward"``); empty without a traceback."""
    frame = error.__traceback__
    if frame is None:
        return ""
    while frame.tb_next is not None:
        frame = frame.tb_next
    code = frame.tb_frame.f_code
    return f"{code.co_filename.replace(chr(92), '/').rsplit('/', 1)[-1]}:{frame.tb_lineno}, in {code.co_name}"


def headroom_below(value: float, threshold: float) -> float:
    """Headroom of a value that must stay below ``threshold`` (1.0 = value is zero).

    A NaN value or threshold has no headroom: -inf.
    """
    _check_real(value, "value")
    _check_real(threshold, "threshold")
    if math.isnan(value) or math.isnan(threshold):
        return -math.inf
    if threshold == 0:
        return 0.0 if value <= 0 else -math.inf
    return (threshold - value) / abs(threshold)


def headroom_above(value: float, threshold: float) -> float:
    """Headroom of a value that must reach ``threshold`` or more (-inf for a NaN)."""
    _check_real(value, "value")
    _check_real(threshold, "threshold")
    if math.isnan(value) or math.isnan(threshold):
        return -math.inf
    if threshold == 0:
        return math.inf if value > 0 else 0.0
    return (value - threshold) / abs(threshold)


def _check_real(number: object, argument: str) -> None:
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        raise InputError(f"'{argument}' must be a real number (got {number!r} that is a "
                         f"{type(number).__name__})")


def _first_nan(value: Any, path: str) -> str | None:
    """The path of the first NaN among numbers, mappings and lists: ``metrics['loss']``."""
    if isinstance(value, float):
        return path if math.isnan(value) else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if (found := _first_nan(item, f"{path}[{key!r}]")) is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if (found := _first_nan(item, f"{path}[{index}]")) is not None:
                return found
    elif hasattr(value, "dtype") and hasattr(value, "isnan") and getattr(value, "numel", lambda: 0)() == 1:
        return path if bool(value.isnan()) else None  # a 0-d tensor
    return None


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
