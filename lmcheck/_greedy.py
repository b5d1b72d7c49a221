"""The tie-tolerant comparison of two greedy runs, shared by the causal and invariance probes.

Two sequences may part only where the two top logits are within a tie tolerance of each other,
the way the transformers test suite compares greedy outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


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
