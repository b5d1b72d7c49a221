"""How lmcheck decides that two computations agree: tolerances and a tie-tolerant comparison.

Two computations that should agree (a hand loop and ``generate``, a prompt alone and padded or
batched) never match bit for bit in every dtype, so lmcheck compares them within a tolerance that
depends on the dtype of the model's parameters (:data:`LOGIT_ATOL`, :data:`TIE_ATOL`, looked up
with :func:`tolerance_for`). Greedy comparisons are tie-tolerant the way the transformers test
suite is: two sequences may part only where the two top logits are within ``TIE_ATOL`` of each
other (:func:`compare_greedy_rows`). Shared by :mod:`lmcheck.causal` and :mod:`lmcheck.invariance`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "LOGIT_ATOL",
    "TIE_ATOL",
    "compare_greedy_rows",
    "count_phrase",
    "parameter_dtype",
    "tolerance_for",
]

# Largest absolute logit difference accepted between two computations that should agree (cache
# vs none, padded vs alone), by parameter dtype. Measured on a 2-core x86 CPU: SmolLM2-135M
# (logits up to 35) differs by up to 7.4e-5 in fp32 (10 prompts, 32 left pads) and 0.75 in bf16
# (bf16's step is 0.25 at 32); GPT-2 124M by 5e-6 in fp32. The bounds are about 4x and 2.7x that;
# fp16 (not measured) is bf16's bound over 8, their ratio of machine epsilons. A real bug (an
# ignored mask, a stale cache) moves logits by 1e-2 or more in fp32.
LOGIT_ATOL: dict[torch.dtype, float] = {torch.float32: 3e-4, torch.float16: 0.25, torch.bfloat16: 2.0}
# Two top logits within this are a tie: either argmax is a correct greedy choice. fp32 follows
# transformers' 1e-5; half precision scales it by the ratio of machine epsilons (x8192, x65536).
TIE_ATOL: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 0.08, torch.bfloat16: 0.65}


def parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's (first) parameters, which picks its tolerances."""
    return next(model.parameters()).dtype


def tolerance_for(table: dict[torch.dtype, float], model: torch.nn.Module) -> float:
    """The tolerance for the model's parameter dtype (logits are compared in float32)."""
    return table.get(parameter_dtype(model), table[torch.float32])


def compare_greedy_rows(tokens_a: torch.Tensor, logits_a: torch.Tensor, tokens_b: torch.Tensor,
                        logits_b: torch.Tensor, tie: float, *, sides: tuple[str, str],
                        eos_ids: Sequence[int] = (), pad: int | None = None,
                        ) -> tuple[list[dict[str, Any]], float]:
    """Per row: the first step where the tokens part, and whether A's logits call it a tie.

    ``sides`` names A and B in the records (``f"{side}_token"``). B stopped at eos (its token
    recorded as -1, its gap inf) where B is shorter, or where B's row holds one of ``eos_ids``
    at or before the parting step and only ``pad`` after it, as generate pads a stopped row.

    Returns the rows and the largest |logits_a - logits_b| over the steps both share a history.
    """
    rows, max_diff = [], 0.0
    for row in range(tokens_a.shape[0]):
        steps = min(tokens_a.shape[1], tokens_b.shape[1])
        parted = [s for s in range(steps) if tokens_a[row, s] != tokens_b[row, s]]
        last = parted[0] if parted else steps - 1  # logits after a parting have other histories
        if steps:
            diff = (logits_a[row, : last + 1] - logits_b[row, : last + 1]).abs().max()
            max_diff = max(max_diff, float(diff))
        record: dict[str, Any] = {"row": row, "verdict": "equal", "step": None}
        if parted or tokens_b.shape[1] < tokens_a.shape[1]:
            step = parted[0] if parted else steps  # generate stopped early: eos
            a = int(tokens_a[row, step])
            b = int(tokens_b[row, step]) if step < tokens_b.shape[1] else -1
            if b >= 0 and _stopped(tokens_b[row].tolist(), step, eos_ids, pad):
                b = -1
            gap = float(logits_a[row, step, a] - logits_a[row, step, b]) if b >= 0 else float("inf")
            record.update({"step": step, f"{sides[0]}_token": a, f"{sides[1]}_token": b, "gap": gap,
                           "verdict": "tie" if gap <= tie else "mismatch"})
        rows.append(record)
    return rows, max_diff


def _stopped(tokens: list[int], step: int, eos_ids: Sequence[int], pad: int | None) -> bool:
    """Whether a row holds eos at or before ``step`` and only ``pad`` after that eos."""
    first = next((s for s in range(step + 1) if tokens[s] in eos_ids), None)
    return first is not None and all(t == pad for t in tokens[first + 1:])


def count_phrase(items: Sequence[Any], noun: str) -> str:
    """``len(items)`` and ``noun``, plural unless there is one: ``"2 prompts"``, ``"1 row"``."""
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"
