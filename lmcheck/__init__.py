"""lmcheck: probes that check a language model and its training setup.

Every probe takes a model, a tokenizer and data, and returns a :class:`Result`::

    import lmcheck
    result = lmcheck.round_trip(lmcheck.load_tokenizer("gpt2"), ["Hello, world"])
    print(result)  # [PASS] round_trip: all 1 texts round-trip (exact text)

A result is truthy when it passed; in a test, ``assert result, result.explanation``.

Names are imported lazily, so ``import lmcheck`` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it; modules add their names here
_EXPORTS: dict[str, str] = {
    "AssetError": "lmcheck.errors",
    "ChunkStats": "lmcheck.corpus",
    "ClozeCase": "lmcheck.cloze",
    "DEFAULTS": "lmcheck.defaults",
    "GoldenMissingError": "lmcheck.errors",
    "GreedyOutput": "lmcheck.decoding",
    "InputError": "lmcheck.errors",
    "LmcheckError": "lmcheck.errors",
    "LossCurve": "lmcheck.curves",
    "MaskPrediction": "lmcheck.masked",
    "MemorizationRun": "lmcheck.masked_training",
    "ModelError": "lmcheck.errors",
    "PretrainRun": "lmcheck.trainer",
    "Result": "lmcheck.results",
    "TokenTable": "lmcheck.tokens",
    "batch_invariance": "lmcheck.invariance",
    "bert_from_scratch": "lmcheck.models",
    "causal_batch": "lmcheck.training",
    "causal_lm_collator": "lmcheck.trainer",
    "causality": "lmcheck.causal",
    "chunk_documents": "lmcheck.corpus",
    "cloze_cases": "lmcheck.cloze",
    "device_key": "lmcheck.golden",
    "fill_mask": "lmcheck.masked",
    "finite_loss": "lmcheck.curves",
    "generalization_gap": "lmcheck.curves",
    "gpt2_from_scratch": "lmcheck.models",
    "gradient_flow": "lmcheck.training",
    "greedy_decode": "lmcheck.decoding",
    "greedy_matches_generate": "lmcheck.causal",
    "inspect_tokens": "lmcheck.tokens",
    "kv_cache_matches_full": "lmcheck.causal",
    "load_causal_lm": "lmcheck.models",
    "load_documents": "lmcheck.corpus",
    "load_smollm2": "lmcheck.models",
    "load_tokenizer": "lmcheck.tokens",
    "loss_at_init": "lmcheck.training",
    "loss_decreases": "lmcheck.curves",
    "mask_fill_accuracy": "lmcheck.masked",
    "masked_loss_at_init": "lmcheck.masked",
    "matches_golden": "lmcheck.golden",
    "memorize_chunks": "lmcheck.masked_training",
    "memorizes": "lmcheck.training",
    "next_token_logits": "lmcheck.decoding",
    "overfits": "lmcheck.curves",
    "padding_invariance": "lmcheck.invariance",
    "params_update": "lmcheck.training",
    "plot_loss_curve": "lmcheck.report",
    "pretrain": "lmcheck.trainer",
    "pretrain_default": "lmcheck.trainer",
    "pretraining_data": "lmcheck.trainer",
    "record_golden": "lmcheck.golden",
    "reproducible": "lmcheck.curves",
    "round_trip": "lmcheck.tokens",
    "split_documents": "lmcheck.corpus",
    "train_masked_lm": "lmcheck.masked_training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmcheck' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
