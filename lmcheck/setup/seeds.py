"""The seeds-and-evaluation family of the setup checks: ``reproducible`` (the same seed gives the
same first losses, another seed other ones) and ``eval_deterministic`` (evaluating twice gives the
same loss: dropout off in evaluation)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lmcheck._finite import non_finite_result
from lmcheck._model import mean_loss
from lmcheck.errors import InputError
from lmcheck.results import Result
from lmcheck.setup.batches import call_rebuild, labels_form, loss_value


def reproducible(runs: list[list[float]], seed: int, how: str) -> Result:
    name = "reproducible"
    first, again, other = runs
    metrics: dict[str, Any] = {"seed": seed, "losses": first, "same_seed": again, "other_seed": other}
    for label, losses in ((f"{seed}", first), (f"{seed} again", again), (f"{seed + 1}", other)):
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None:  # NaN != NaN: the comparisons below would blame the seed
            return non_finite_result(name, f"{how} {label}: the loss is {losses[bad]} at call {bad}", **metrics)
    problems = []
    if first != again:
        i = next(i for i, (a, b) in enumerate(zip(first, again, strict=False)) if a != b) if len(first) == len(again) else 0
        problems.append(f"the same seed ({how} {seed}) gave different losses at call {i} ({first[i]:.6g} vs "
                        f"{again[i]:.6g}): something random is not seeded (data order, dropout, initialisation)")
    if first == other:
        problems.append(f"another seed ({how} {seed + 1}) gave the very same losses: the seed reaches neither the "
                        f"initialisation, the data order nor dropout (torchtune #2335)")
    passed = not problems
    return Result(name=name, passed=passed, metrics=metrics,
                  explanation=(f"{how} {seed} twice: the same first {len(first)} losses; {how} {seed + 1}: other "
                               f"ones" if passed else "; ".join(problems)))


def evaluate_twice(model: torch.nn.Module, lm_batches: Sequence[Mapping[str, torch.Tensor]],
                   evaluate: Callable[[], float] | None) -> tuple[list[float], str]:
    """Two evaluations and how they were made: the user's ``evaluate()``, else lmcheck's mean loss
    over the first two batches in eval mode."""
    if evaluate is not None:
        return [loss_value(evaluate(), "'evaluate'") for _ in range(2)], "the user's evaluate()"
    batches = [labels_form(b) for b in lm_batches[:2]]
    return [mean_loss(model, batches) for _ in range(2)], "lmcheck's evaluation in eval mode"


def eval_deterministic(losses: list[float], how: str) -> Result:
    name = "eval_deterministic"
    if not all(math.isfinite(v) for v in losses):
        return non_finite_result(name, f"{how} gave a non-finite loss: {losses}")
    passed = losses[0] == losses[1]
    return Result(name=name, passed=passed, metrics={"losses": losses},
                  explanation=(f"{how} twice gives the same loss {losses[0]:.6g}" if passed else
                               f"{how} twice gives {losses[0]:.6g} and {losses[1]:.6g}: dropout is still on in "
                               f"evaluation (model.eval() not called, or F.dropout(..., training=True) in the "
                               f"model's code)"))


def seeding(rebuild: Callable[[int], Any] | None, seed: int) -> tuple[int, str] | str:
    """(the seed, how it is applied) where the setup can be rebuilt with a seed, else why not."""
    if rebuild is None:
        return "no rebuild(seed) was given, so the setup cannot be built again with another seed"
    return seed, "rebuilt with"


def rebuilt(rebuild: Callable[[int], Any] | None, seed: int) -> Any:
    """What ``rebuild(seed)`` returns (its exceptions said as an InputError naming it)."""
    if rebuild is None:
        raise InputError("'rebuild' is needed to build the setup again with another seed")
    return call_rebuild(rebuild, seed)
