"""Golden loss curves, keyed by device: catch a training setup that silently changed.

A golden file holds the first training losses of a fixed recipe (the embedded default: same
data, seed, model and optimizer), one entry per *device key* (``cpu-x86_64-AVX512/torch-2.13/transformers-5.24``,
``cuda-NVIDIA_H100_80GB_HBM3/torch-2.13/transformers-5.24``): kernels differ between devices
and library versions, so golden values from one never judge another (torchtune #2578, llm.c PR #615).
A device without an entry is not a failure: :class:`GoldenMissingError` says how to record one
(``lmcheck golden --update``), and the test suite skips with that reason.

The comparison is llm.c's: step by step, ``|loss - golden| <= atol + rtol * |golden|``.
``lmcheck golden --update --runs 3`` runs the recipe several times and stores a tolerance that
covers the run-to-run spread it measured (Megatron's ``--recommend-tolerances``), never below
the default ``rtol``.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import torch
import transformers

from lmcheck._finite import probe
from lmcheck._validate import check_int, check_number, check_path, check_str, describe
from lmcheck.curves import LossCurve
from lmcheck.errors import GoldenMissingError, InputError
from lmcheck.results import Result, headroom_below

__all__ = [
    "DEFAULT_GOLDEN",
    "DEFAULT_RTOL",
    "GOLDEN_STEPS",
    "device_key",
    "matches_golden",
    "record_golden",
]

DEFAULT_GOLDEN = Path(__file__).with_name("golden") / "pretrain-cpu-default.json"
DEFAULT_RTOL = 1e-4  # torchtune's recipe tests use rtol 1e-4 on losses
GOLDEN_STEPS = 10
RECIPE = "the first steps of PRETRAIN_CPU (chapter 4's CPU default), lean loop"


def device_key(device: str | torch.device | None = None) -> str:
    """Which golden entry applies here: the device (CPU instruction set or GPU name), torch and
    transformers (whose loss and initialisation code can change between minor releases)."""
    versions = f"torch-{_minor(torch.__version__)}/transformers-{_minor(transformers.__version__)}"
    if device is not None and not isinstance(device, (str, torch.device)):
        raise InputError(f"'device' must be a str or torch.device such as 'cpu' or 'cuda:0' "
                         f"(got {describe(device)})")
    try:
        chosen = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError as error:
        raise InputError(f"'device' must name a torch device such as 'cpu' or 'cuda:0' "
                         f"(got {describe(device)}: {error})") from None
    if chosen.type == "cuda":
        name = torch.cuda.get_device_name(chosen).replace(" ", "_")
        return f"cuda-{name}/{versions}"
    capability = torch.backends.cpu.get_cpu_capability()
    return f"cpu-{platform.machine()}-{capability}/{versions}"


def installed_read_only() -> bool:
    """True when the shipped golden file lives in an installed package (site-packages), which
    ``--update`` must not rewrite; False in a source checkout (an editable install)."""
    return any(part in ("site-packages", "dist-packages") for part in DEFAULT_GOLDEN.resolve().parts)


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"entries": {}}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise InputError(f"'path' {str(path)!r} is not a golden file (no 'entries' mapping)")
    return data


@probe("matches_golden")
def matches_golden(
    curve: LossCurve, path: str | os.PathLike[str] = DEFAULT_GOLDEN, *, key: str | None = None,
    rtol: float | None = None, atol: float = 0.0,
) -> Result:
    """Compare a curve's first training losses with the golden ones recorded for this device.

    Args:
        curve: the run to check; it needs at least as many steps as the golden entry.
        path: the golden file (default: the embedded default's, shipped with lmcheck).
        key: the device key (default :func:`device_key`).
        rtol: relative tolerance (default: the entry's own, else :data:`DEFAULT_RTOL`).

    Raises:
        GoldenMissingError: the file has no entry for this device key.
    """
    if not isinstance(curve, LossCurve):
        raise InputError(f"'curve' must be a LossCurve (got {describe(curve)})")
    check_number(atol, "atol", low=0)
    if rtol is not None:
        check_number(rtol, "rtol", low=0)
    target = check_path(path, "path")
    key = device_key() if key is None else check_str(key, "key")
    entry = _read(target)["entries"].get(key)
    if entry is None:
        raise GoldenMissingError(
            f"no golden values for {key!r} in {target}: record them on this device with "
            f"'lmcheck golden --update' (and commit the file)")
    golden: list[float] = [float(v) for v in entry["train"]]
    tolerance = float(entry.get("rtol", DEFAULT_RTOL)) if rtol is None else rtol
    losses = [loss for _, loss in curve.train[: len(golden)]]
    if len(losses) < len(golden):
        return Result(name="matches_golden", passed=False,
                      metrics={"steps": len(losses), "golden_steps": len(golden)},
                      threshold=tolerance, headroom=None,
                      explanation=f"the curve has {len(losses)} training losses, the golden "
                      f"entry {len(golden)}: train at least that many steps")
    rows = []
    worst = 0.0  # largest |loss - golden| as a fraction of what was allowed at that step
    for step, (loss, reference) in enumerate(zip(losses, golden, strict=True), start=1):
        allowed = atol + tolerance * abs(reference)
        used = abs(loss - reference) / allowed if allowed > 0 else (0.0 if loss == reference else math.inf)
        used = used if math.isfinite(loss) else math.inf
        worst = max(worst, used)
        rows.append({"step": step, "loss": loss, "golden": reference, "allowed": allowed, "used": used})
    bad = next((row for row in rows if row["used"] > 1), None)
    if bad is not None and not math.isfinite(bad["loss"]):
        explanation = (f"step {bad['step']}: the training loss is {bad['loss']} (not finite), golden "
                       f"{bad['golden']:.6f} for {key}: look for a NaN or Inf in that step's batch, "
                       f"logits or gradients")
    elif bad is None:
        explanation = (f"the first {len(golden)} training losses match the golden values for {key} "
                       f"(within rtol {tolerance:g}; at most {worst:.0%} of the allowed difference)")
    else:
        explanation = (f"step {bad['step']}: loss {bad['loss']:.6f}, golden {bad['golden']:.6f} "
                       f"for {key}, off by {abs(bad['loss'] - bad['golden']):.3g} (allowed "
                       f"{bad['allowed']:.3g}): the data, seed, model, optimizer or kernels changed; "
                       "if the change is intended, record new values with 'lmcheck golden --update'")
    return Result(name="matches_golden", passed=bad is None,
                  metrics={"key": key, "steps": len(golden), "rtol": tolerance, "atol": atol,
                   "max_used_fraction": worst},
                  threshold=tolerance, headroom=headroom_below(worst, 1.0), explanation=explanation,
                  details=tuple(rows))


def record_golden(
    curves: Sequence[LossCurve], path: str | os.PathLike[str] = DEFAULT_GOLDEN, *,
    steps: int, key: str | None = None, recipe: str = "",
) -> dict[str, Any]:
    """Store the first ``steps`` training losses of the first curve as this device's entry.

    With several curves (repeated runs), the stored ``rtol`` covers four times the largest
    relative spread between them, and never less than :data:`DEFAULT_RTOL`. Returns the entry.
    """
    if not isinstance(curves, Sequence) or isinstance(curves, (str, bytes)) or not curves \
            or not all(isinstance(c, LossCurve) for c in curves):
        raise InputError(f"'curves' must be a non-empty list of LossCurve (got {describe(curves)})")
    check_int(steps, "steps", 1)
    target = check_path(path, "path")
    key = device_key() if key is None else check_str(key, "key")
    runs = [[loss for _, loss in c.train[:steps]] for c in curves]
    short = next((i for i, run in enumerate(runs) if len(run) < steps), None)
    if short is not None:
        raise InputError(f"'curves' must each hold at least 'steps' = {steps} training losses "
                         f"(curve {short} has {len(runs[short])})")
    for index, run in enumerate(runs):
        bad = next((s for s, loss in enumerate(run, start=1) if not math.isfinite(loss)), None)
        if bad is not None:
            raise InputError(f"'curves' must hold finite losses: curve {index} has {run[bad - 1]} at "
                             f"step {bad}; a non-finite run cannot be a golden reference")
    reference = runs[0]
    spread = max((abs(v - r) / abs(r) for run in runs[1:] for v, r in zip(run, reference, strict=True)),
                 default=0.0)
    entry = {"train": reference, "rtol": max(DEFAULT_RTOL, 4 * spread), "measured_spread": spread,
             "runs": len(runs), "recorded": date.today().isoformat(), "torch": torch.__version__,
             "transformers": transformers.__version__}
    data = _read(target)
    data["recipe"] = recipe or data.get("recipe", "")
    data["entries"][key] = entry
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    partial.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(partial, target)
    return entry
