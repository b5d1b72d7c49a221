"""The guard's summary at the end of a run: a Markdown page (the events, the skipped steps, the
rules it judged by) and the loss and gradient-norm curves as a PNG, events marked."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmcheck.watch.guard import Guard

COLOURS = {"warn": "tab:orange", "skip": "tab:purple", "stop": "tab:red", "refuse": "tab:red"}


def write_summary(guard: Guard, folder: str | os.PathLike[str]) -> Path:
    """``lmcheck-watch.md`` and ``lmcheck-watch.png`` in ``folder``; returns the Markdown's path."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    picture = plot_curves(guard, target / "lmcheck-watch.png")
    counts: dict[str, int] = {}
    for event in guard.events:
        counts[event.condition] = counts.get(event.condition, 0) + 1
    lines = ["# lmcheck.watch: the run's guard", "",
             f"- optimizer steps watched: {guard.step}",
             f"- events: {len(guard.events)}" + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))})"
                                                 if counts else ""),
             f"- steps skipped (not applied): {len(guard.skipped)}" + (f" ({_steps(guard.skipped)})" if guard.skipped else ""),
             f"- stopped: {guard.stop_requested.message}" if guard.stop_requested else "- stopped: no", ""]
    if picture is not None:
        lines += [f"![loss and gradient norm]({picture.name})", ""]
    if guard.events:
        lines += ["| step | condition | action | value | threshold | what |", "|---|---|---|---|---|---|"]
        for event in guard.events:
            lines.append(f"| {event.step} | {event.condition} | {event.action} | {_cell(event.value)} | "
                         f"{_cell(event.threshold)} | {event.message.replace('|', '/')} |")
        lines.append("")
    rules = guard.rules
    lines += ["## Rules", "", "| rule | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in vars(rules).items()]
    path = target / "lmcheck-watch.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def plot_curves(guard: Guard, path: Path) -> Path | None:
    """The loss and the gradient norm against the step, events as vertical lines; None where no
    step was seen. Drawn on matplotlib's Agg canvas directly (pyplot's backend is left alone)."""
    steps = guard.history["step"]
    if not steps:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 1, sharex=True)
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "grad_norm", "gradient norm")):
        points = [(s, v) for s, v in zip(steps, guard.history[key], strict=True) if v is not None and math.isfinite(v)]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, "-", linewidth=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "grad_norm" and points and min(ys) > 0:
            ax.set_yscale("log")
    marked: set[str] = set()
    for event in guard.events:
        legend = f"{event.condition} ({event.action})"
        for ax in axes:
            ax.axvline(event.step, color=COLOURS.get(event.action, "grey"), linestyle=":", linewidth=1,
                       label=legend if ax is axes[0] and legend not in marked else None)
        marked.add(legend)
    if marked:
        axes[0].legend(fontsize=8)
    axes[1].set_xlabel("optimizer step")
    axes[0].set_title(f"lmcheck.watch: {guard.step} steps, {len(guard.events)} events")
    figure.tight_layout()
    figure.savefig(path)
    return path


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _steps(steps: list[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:10])
    return shown + (f" and {len(steps) - 10} more" if len(steps) > 10 else "")
