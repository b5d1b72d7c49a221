"""What the setup checks found: one result per check, the overfitting run's loss curve and the
setup's settings, as a report that prints, serialises and writes itself as Markdown."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcheck.curves import LossCurve
from lmcheck.results import Result

__all__ = ["SetupReport"]


@dataclass
class SetupReport:
    """What :func:`check_loop` and :func:`check_trainer` found.

    Attributes:
        results: one :class:`~lmcheck.results.Result` per check of :data:`lmcheck.setup.SETUP_CHECKS`, in that order.
        curve: the training loss per optimizer step of the overfitting run.
        setup: what was found about the setup (kind, accumulation steps, optimizer, dtype, ...).
    """

    results: list[Result]
    curve: LossCurve
    setup: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when no check failed or raised and at least one passed (n/a is neither)."""
        return (all(r.status not in ("fail", "error") for r in self.results)
                and any(r.passed for r in self.results))

    def __bool__(self) -> bool:
        return self.passed

    def __getitem__(self, name: str) -> Result:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no check named {name!r} in this report (checks: {', '.join(r.name for r in self.results)})")

    def __iter__(self) -> Iterator[Result]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def failures(self) -> list[Result]:
        """The failed checks, root causes first: a failure that follows from an earlier one
        (its ``metrics["follows_from"]``) comes after the one it follows from."""
        failed = [r for r in self.results if r.status == "fail"]
        return sorted(failed, key=lambda r: "follows_from" in r.metrics)

    def errors(self) -> list[Result]:
        """The checks that raised instead of reaching a verdict (``status == "error"``)."""
        return [r for r in self.results if r.status == "error"]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "setup": self.setup, "results": [r.to_dict() for r in self.results],
                "curve": self.curve.to_dict()}

    def to_markdown(self, path: str | os.PathLike[str], *, plot: bool = True) -> Path:
        """Write a Markdown report and, with ``plot``, the loss curve beside it as
        ``<name>-loss-curve.png`` (and its numbers as ``<name>-loss-curve.json``)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        passed = sum(r.status == "pass" for r in self.results)
        skipped = sum(r.status == "n/a" for r in self.results)
        errors = len(self.errors())
        lines = [f"# lmcheck training-setup report: {'PASS' if self.passed else 'FAIL'}", "",
                 f"{passed} of {len(self.results)} checks passed"
                 + (f", {skipped} not applicable" if skipped else "")
                 + (f", {errors} could not run (error)" if errors else "") + ".", "",
                 "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_md(v)} |" for k, v in self.setup.items()]
        lines += ["", "| check | result | explanation |", "|---|---|---|"]
        lines += [f"| {r.name} | {r.status.upper()} | {_md(r.error or r.explanation)} |" for r in self.results]
        if plot and self.curve.train:
            from lmcheck.report import plot_loss_curve

            image = plot_loss_curve(self.curve, target.with_name(f"{target.stem}-loss-curve.png"),
                                    title="training loss while overfitting a handful of batches")
            lines += ["", f"![loss curve]({image.name})"]
        target.write_text("\n".join(lines) + "\n")
        return target


def _md(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
