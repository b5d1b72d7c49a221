"""lmcheck's own training loops: causal-LM pretraining (``lmcheck.loops.pretraining``, through
Hugging Face's Trainer or a lean loop) and masked-LM training (``lmcheck.loops.masked``).

The loops sit above the probes: they may import probes (to check a first batch, to stop at
memorization), and no probe imports them. Both AdamW loops take their optimizer step and their
seeded data order from ``lmcheck.loops._step``.
"""

from lmcheck.loops.masked import MEMORIZATION_RUN, MemorizationRun, memorize_chunks, train_masked_lm
from lmcheck.loops.pretraining import (
    LossCurveCallback,
    PretrainingData,
    PretrainRun,
    StopAtMemorization,
    causal_lm_collator,
    check_model_fits,
    default_recipe_curve,
    pretrain,
    pretrain_default,
    pretraining_data,
    recipe_data,
)

__all__ = ["MEMORIZATION_RUN", "LossCurveCallback", "MemorizationRun", "PretrainRun", "PretrainingData",
           "StopAtMemorization", "causal_lm_collator", "check_model_fits", "default_recipe_curve",
           "memorize_chunks", "pretrain", "pretrain_default", "pretraining_data", "recipe_data",
           "train_masked_lm"]
