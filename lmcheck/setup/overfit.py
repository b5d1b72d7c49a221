"""The overfitting family of the setup checks: ``overfits`` (a handful of the user's batches is
memorized within a budget of their own steps). :class:`MemorizationWatch` is called after each
optimizer step of the run and stops it once every row is memorized; the judge reads what it saw."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lmcheck._finite import non_finite_result
from lmcheck._model import IGNORE_INDEX, eval_mode, model_device, model_forward
from lmcheck._ranks import gathered, world_size
from lmcheck._recording import OptimizerStep
from lmcheck.curves import LossCurve
from lmcheck.errors import NonFiniteError
from lmcheck.results import Result, headroom_below
from lmcheck.setup.batches import supervised_count


def memorized_rows(model: torch.nn.Module, lm_batches: Sequence[Mapping[str, torch.Tensor]],
                    ) -> tuple[int, int, float, int]:
    """(rows whose every supervised next token is the argmax given the true prefix, rows, the
    summed cross-entropy of the supervised tokens, their count): the loss tells a run that is
    still learning from one that has stalled.

    A position whose prefix recurs in another row with another next token cannot be right in
    both (two examples that open alike, a shared prompt template); such positions are left out.
    """
    targets_of, predicted_of, keys_of = [], [], []
    nll, tokens = 0.0, 0
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        for batch in lm_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            ids = batch["input_ids"]
            logits, _ = model_forward(model, ids, batch.get("attention_mask"), None,
                                      use_cache=False, what="the logits while overfitting",
                                      positions=batch.get("position_ids"))
            if "targets" in batch:
                predicted, targets, prefix = logits.argmax(-1), batch["targets"], ids
            else:
                predicted, targets, prefix = logits[:, :-1].argmax(-1), batch["labels"][:, 1:], ids[:, :-1]
            scores = logits if "targets" in batch else logits[:, :-1]
            nll += float(F.cross_entropy(scores.float().reshape(-1, scores.shape[-1]), targets.reshape(-1),
                                         ignore_index=IGNORE_INDEX, reduction="sum"))
            tokens += int((targets != IGNORE_INDEX).sum())
            predicted_of.append(predicted.cpu())
            targets_of.append(targets.cpu())
            positions = batch.get("position_ids")
            if positions is not None and "targets" not in batch:
                positions = positions[:, :-1]
            keys_of.append(_prefix_hashes(prefix.cpu(), None if positions is None else positions.cpu()))
    width = max(t.shape[1] for t in targets_of)
    pad = lambda t, v: F.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    targets = torch.cat([pad(t, IGNORE_INDEX) for t in targets_of])
    predicted = torch.cat([pad(t, IGNORE_INDEX) for t in predicted_of])
    keys = torch.cat([pad(t, 0) for t in keys_of])
    supervised = targets != IGNORE_INDEX
    pairs = torch.stack([keys[supervised], targets[supervised]], dim=1).unique(dim=0)
    if world_size() > 1:  # one model for every rank's rows: a prefix shared across ranks is ambiguous too
        pairs = torch.cat(gathered(pairs)).unique(dim=0)
    prefixes, counts = pairs[:, 0].unique(return_counts=True)
    ambiguous_keys = prefixes[counts > 1]
    ambiguous = supervised & torch.isin(keys, ambiguous_keys)
    right = (predicted == targets) | ~supervised | ambiguous
    counted = (supervised & ~ambiguous).any(dim=1)  # a row with nothing to predict is not memorized
    return int((right.all(dim=1) & counted).sum()), int(counted.sum()), nll, tokens


def _prefix_hashes(ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) int64 hash of each prefix ``ids[:, :t + 1]`` (a polynomial hash; int64 wraps); in a
    packed row (``positions`` that restart at 0), of the prefix within its own document."""
    def hashed(part: torch.Tensor) -> torch.Tensor:
        powers = torch.full((part.shape[-1],), 1_000_003, dtype=torch.int64).cumprod(0)
        return ((part.to(torch.int64) + 1) * powers).cumsum(dim=-1) * 31 + torch.arange(part.shape[-1])

    if positions is None or positions.shape != ids.shape:
        return hashed(ids)
    out = torch.empty(ids.shape, dtype=torch.int64)
    for row in range(ids.shape[0]):
        starts = (positions[row] == 0).nonzero().flatten().tolist()
        starts = starts if starts and starts[0] == 0 else [0, *starts]
        for a, b in zip(starts, starts[1:] + [ids.shape[1]], strict=True):
            out[row, a:b] = hashed(ids[row, a:b])
    return out


@dataclass
class MemorizationWatch:
    """Called after each optimizer step of the overfitting run (``watch(step)``, True stops it):
    every ``check_every`` steps it measures how many rows of ``batches`` the model has memorized,
    stops once all are, and at the budget lets a run whose loss still falls fast go on to twice it."""

    model: torch.nn.Module
    batches: list[dict[str, torch.Tensor]]
    budget: int
    check_every: int
    memorized: tuple[int, int] = (0, 1)  # (rows memorized, rows) at the last measurement
    at: int | None = None  # the optimizer step at which every row was memorized
    non_finite: str | None = None
    extended: bool = False
    losses: dict[int, float] = field(default_factory=dict)  # optimizer step -> the measured loss

    @property
    def limit(self) -> int:
        return 2 * self.budget  # a run still learning fast at the budget may go on to twice it

    def __call__(self, step: int) -> bool:
        if step % self.check_every and step not in (self.budget, self.limit):
            return False
        try:
            measured = memorized_rows(self.model, self.batches)
        except NonFiniteError as error:
            self.non_finite = f"after optimizer step {step} of the overfitting run, {error}"
            return True
        hits, rows, nll, tokens = (sum(v) for v in zip(*gathered(measured), strict=True))
        self.memorized = (hits, rows)
        self.losses[step] = nll / max(tokens, 1)
        if hits == rows:  # on every rank together: a rank that stopped alone would hang the others
            self.at = step
            return True
        if step == self.budget:
            halfway = min(self.losses, key=lambda s: abs(s - self.budget / 2))
            self.extended = self.losses[step] < _STILL_LEARNING * self.losses[halfway]
            return not self.extended
        return False


def nothing_to_memorize(batches: Sequence[Mapping[str, torch.Tensor]]) -> Result | None:
    """``overfits`` not applicable where the batches supervise no token on any rank, else None."""
    if sum(gathered(sum(supervised_count(b) for b in batches))) == 0:
        return Result.not_applicable("overfits", "the overfitting batches supervise no token (every label is -100), "
                                     "so there is nothing to memorize: see batch_supervision")
    return None


def record_curve(curve: LossCurve, steps: Sequence[OptimizerStep], losses: Sequence[float], summed: bool,
                 memorized: bool) -> None:
    """The overfitting run's training loss per optimizer step into ``curve``: the sum of the step's
    micro-batches' returned losses where ``summed``, else their mean."""
    curve.train.clear()
    position = 0
    for step in steps:
        part = losses[position: position + max(1, step.micro_batches)]
        position += max(1, step.micro_batches)
        if part:
            curve.record_train(step.index, sum(part) if summed else sum(part) / len(part))
    curve.stop_reason = "memorized" if memorized else "max_steps"


def overfits(watch: MemorizationWatch, steps: Sequence[OptimizerStep], curve: LossCurve,
             peak_lrs: tuple[float, ...] | None) -> Result:
    """The judge of the overfitting run: what ``watch`` saw over the recorded ``steps`` (run at the
    peak of the schedule where ``peak_lrs``), with the loss ``curve`` :func:`record_curve` drew."""
    name = "overfits"
    budget, limit = watch.budget, watch.limit
    budget_text = (f"{limit} optimizer steps (overfit_steps={budget}, doubled: the loss fell by more than "
                   f"{1 - _STILL_LEARNING:.0%} over its second half)" if watch.extended
                   else f"{budget} optimizer steps (overfit_steps)")
    hits, rows = watch.memorized
    lrs = [s.lrs[0] for s in steps]
    metrics: dict[str, Any] = {"memorized_rows": hits, "rows": rows, "steps": steps[-1].index if steps else 0,
                               "budget": limit if watch.extended else budget, "extended": watch.extended,
                               "learning_rate": max(lrs, default=0.0), "at_peak": peak_lrs is not None}
    if curve.non_finite_step is not None:
        return non_finite_result(name, f"the training loss is not finite at optimizer step {curve.non_finite_step} "
                                       f"of the overfitting run", **metrics)
    if watch.non_finite is not None:
        return non_finite_result(name, watch.non_finite, **metrics)
    first, last = (curve.train[0][1], curve.train[-1][1]) if curve.train else (math.nan, math.nan)
    metrics.update(first_loss=first, last_loss=last)
    rate = (f"at the schedule's peak learning rate {max(lrs, default=0):.3g}, held constant" if peak_lrs is not None
            else f"with learning rates {min(lrs, default=0):.3g} to {max(lrs, default=0):.3g}")
    count = len(watch.batches)
    if watch.at is not None:
        explanation = (f"{rows} rows of {count} batches memorized (every supervised next token is the "
                       f"argmax) after {watch.at} of {budget_text} {rate}; loss {first:.3f} -> {last:.3f}")
    else:
        explanation = (f"after {budget_text} on {count} batches {rate}, {hits} of {rows} rows are "
                       f"memorized; loss {first:.3f} -> {last:.3f}. A setup that cannot overfit a handful of "
                       f"batches will not learn from many: check the loss, the labels and the learning rate, "
                       f"or raise overfit_steps")
    allowed = float(limit if watch.extended else budget)
    return Result(name=name, passed=watch.at is not None, metrics=metrics, threshold=allowed,
                  headroom=None if watch.at is None else headroom_below(float(watch.at), allowed),
                  explanation=explanation)


# At the budget, a loss below this share of the loss halfway through is still falling fast: the
# overfitting run goes on to twice the budget rather than fail a setup that is learning.
_STILL_LEARNING = 0.7


def sums_micro_batches(part: Sequence[float], reference: float | None) -> bool:
    """Whether the user's step returns each micro-batch's share of the step's loss (their sum is
    the loss) rather than each micro-batch's own loss (their mean is), from the losses it
    returned for the first step's micro-batches: the one nearer their reference loss."""
    if len(part) <= 1 or reference is None or not all(math.isfinite(v) for v in part):
        return False
    return abs(sum(part) - reference) < abs(sum(part) / len(part) - reference)
