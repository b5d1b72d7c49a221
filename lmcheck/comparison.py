"""How lmcheck decides that two computations agree: dtype-aware tolerances.

Two computations that should agree (a hand loop and ``generate``, a prompt alone and padded or
batched) never match bit for bit in every dtype, so lmcheck compares them within a tolerance that
depends on the dtype of the model's parameters (:data:`LOGIT_ATOL`, :data:`TIE_ATOL`, looked up
with :func:`tolerance_for`). Greedy comparisons are tie-tolerant: two sequences may part only
where the two top logits are within ``TIE_ATOL`` of each other (``lmcheck._greedy``).
"""

from __future__ import annotations

import torch

from lmcheck._model import parameter_dtype
from lmcheck._validate import check_model, describe
from lmcheck.errors import InputError

__all__ = ["LOGIT_ATOL", "TIE_ATOL", "tolerance_for"]

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


def tolerance_for(table: dict[torch.dtype, float], model: torch.nn.Module) -> float:
    """The tolerance for the model's parameter dtype (logits are compared in float32)."""
    if not isinstance(table, dict) or torch.float32 not in table:
        raise InputError(f"'table' must map torch dtypes to tolerances, float32 included, as "
                         f"LOGIT_ATOL does (got {describe(table)})")
    check_model(model)
    return table.get(parameter_dtype(model), table[torch.float32])


