"""Turning results into something to read: a console report, JSON, and the loss-curve plot.

Probes never print; the CLI and the pytest plugin hand their results to a :class:`Report`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmcheck._validate import check_path, check_str, describe
from lmcheck.errors import InputError
from lmcheck.results import Result

if TYPE_CHECKING:  # only for the annotation
    from lmcheck.curves import LossCurve

__all__ = ["Report", "plot_loss_curve", "write_results_json"]


class Report:
    """A console report: chapter titles, prose, tables, and a results summary at the end."""

    def __init__(self, console: Console | None = None) -> None:
        if console is None:
            console = Console(highlight=False)
            if not console.is_terminal:  # logs and pipes: wide enough for the results table
                console = Console(highlight=False, width=120)
        self.console = console
        self.results: list[Result] = []

    def title(self, text: str) -> None:
        self.console.rule(f"[bold]{text}")

    def text(self, text: str) -> None:
        self.console.print(text, markup=False)  # "[MASK]" and "[1, 11, 30522]" are text, not style

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None) -> None:
        table = Table(*columns, title=title, show_lines=False)
        for row in rows:
            table.add_row(*(escape(_cell(value)) for value in row))
        self.console.print(table)

    def result(self, result: Result) -> Result:
        """Record a result and print its one-line verdict."""
        self.results.append(result)
        mark = f"[{_COLOURS[result.status]}]{_LABELS[result.status]}[/{_COLOURS[result.status]}]"
        headroom = "" if result.headroom is None else f" (headroom {_cell(result.headroom)})"
        self.console.print(f"{mark} {escape(result.name)}{headroom}: {escape(result.explanation)}")
        return result

    def summary(self, *, table: bool = True) -> bool:
        """Print the table of all recorded results, or with ``table=False`` only the count (for a
        report whose results were each printed already). True when none failed or raised and at
        least one passed: a not-applicable check is neither, and never counts as a pass."""
        counts = {status: sum(r.status == status for r in self.results) for status in _LABELS}
        count = (f"{counts['pass']} of {len(self.results)} checks passed"
                 + (f", {counts['fail']} failed" if counts["fail"] and counts["error"] else "")
                 + (f", {counts['n/a']} not applicable" if counts["n/a"] else "")
                 + (f", {counts['error']} could not run (error)" if counts["error"] else ""))
        ok = counts["fail"] == 0 and counts["error"] == 0 and counts["pass"] > 0
        if not table:
            self.console.print(f"[bold]{count}")
            return ok
        self.table(
            ("check", "result", "headroom", "explanation"),
            ((r.name, _LABELS[r.status], r.headroom, _shorten(r.explanation, 90))
             for r in self.results),
            title=count,
        )
        return ok


_LABELS = {"pass": "PASS", "fail": "FAIL", "n/a": "n/a", "error": "ERROR"}  # a Result's status as shown
_COLOURS = {"pass": "green", "fail": "red", "n/a": "yellow", "error": "magenta"}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def write_results_json(results: Iterable[Result], path: str | Path) -> Path:
    """Write results as a JSON list; returns the path."""
    if isinstance(results, (str, bytes, Result, torch.Tensor)) or not isinstance(results, Iterable):
        raise InputError(f"'results' must be a list of Result (got {describe(results)})")
    results = list(results)
    bad = next((i for i, r in enumerate(results) if not isinstance(r, Result)), None)
    if bad is not None:
        raise InputError(f"'results[{bad}]' must be a Result (got {describe(results[bad])})")
    target = check_path(path, "path")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps([r.to_dict() for r in results], indent=2))
    return target


def plot_loss_curve(curve: LossCurve, path: str | Path, *, title: str | None = None) -> Path:
    """Training and validation loss against steps as a PNG (the tutorial's Figure 1), with the
    curve as JSON beside it (same name, ``.json``); returns the PNG's path.

    Draws with matplotlib's Agg canvas directly, so pyplot's global backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lmcheck.curves import LossCurve

    if not isinstance(curve, LossCurve):
        raise InputError(f"'curve' must be a LossCurve (got {describe(curve)})")
    if title is not None:
        check_str(title, "title")
    target = check_path(path, "path")
    target.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for points, label, style in ((curve.train, "training loss", "-"), (curve.valid, "validation loss", "o-")):
        if points:
            steps, losses = zip(*points, strict=True)
            axes.plot(steps, losses, style, label=label, markersize=3)
    if curve.non_finite_step is not None:
        axes.axvline(curve.non_finite_step, color="red", linestyle=":", label=f"non-finite loss (step {curve.non_finite_step})")
    axes.set(xlabel="optimizer step", ylabel="loss (nats per token)",
             title=title or f"{curve.metadata.get('preset', 'model')}: stopped at step {curve.steps} ({curve.stop_reason or 'running'})")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(target)
    curve.to_json(target.with_suffix(".json"))
    return target
