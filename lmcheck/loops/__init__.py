"""lmcheck's own training loops: causal-LM pretraining (``lmcheck.loops.pretraining``, through
Hugging Face's Trainer or a lean loop) and masked-LM training (``lmcheck.loops.masked``).

The loops sit above the probes: they may import probes (to check a first batch, to stop at
memorization), and no probe imports them. Both AdamW loops take their optimizer step and their
seeded data order from ``lmcheck.loops._step``.
"""
