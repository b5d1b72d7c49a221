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
        costs: for each check, the wall-clock ``seconds`` it took and the ``optimizer_steps`` it
            ran (a run a check starts, such as the first run, is counted where it starts).
    """

    results: list[Result]
    curve: LossCurve
    setup: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def optimizer_steps(self) -> int:
        """Every optimizer step the checks ran."""
        return int(sum(c.get("optimizer_steps", 0) for c in self.costs.values()))

    @property
    def seconds(self) -> float:
        return float(sum(c.get("seconds", 0.0) for c in self.costs.values()))

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
                "curve": self.curve.to_dict(), "costs": self.costs}

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
                 + (f", {errors} could not run (error)" if errors else "") + "."
                 + (f" They ran {self.optimizer_steps} optimizer steps in {self.seconds:.1f} s." if self.costs else ""),
                 "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_md(v)} |" for k, v in self.setup.items()]
        lines += ["", "| check | result | seconds | optimizer steps | explanation |", "|---|---|---|---|---|"]
        lines += [f"| {r.name} | {r.status.upper()} | {self.costs.get(r.name, {}).get('seconds', '')} | "
                  f"{self.costs.get(r.name, {}).get('optimizer_steps', '')} | {_md(r.error or r.explanation)} |"
                  for r in self.results]
        if plot and self.curve.train:
            from lmcheck.report import plot_loss_curve

            image = plot_loss_curve(self.curve, target.with_name(f"{target.stem}-loss-curve.png"),
                                    title="training loss while overfitting a handful of batches")
            lines += ["", f"![loss curve]({image.name})"]
        target.write_text("\n".join(lines) + "\n")
        return target


def _md(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
