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

# public name -> module that defines it: every name in a public module's __all__, and no other
# (assets has its own surface: lmcheck.assets and the `lmcheck assets` command)
_EXPORTS: dict[str, str] = {
    "DISTRIBUTED_CHECKS": "lmcheck.setup_checks",
    "same_init": "lmcheck.distributed",
    "rank_randomness": "lmcheck.distributed",
    "grads_synchronized": "lmcheck.distributed",
    "ddp_matches_single": "lmcheck.distributed",
    "data_sharding": "lmcheck.distributed",
    "adapt": "lmcheck.adapters",
    "AdaptedLM": "lmcheck.adapters",
    "AssetError": "lmcheck.errors",
    "batch_invariance": "lmcheck.invariance",
    "batch_supervision": "lmcheck.supervision",
    "end_of_turn_ids": "lmcheck.supervision",
    "bert_config": "lmcheck.models",
    "bidirectionality": "lmcheck.masked",
    "bert_from_scratch": "lmcheck.models",
    "BERT_PRESETS": "lmcheck.models",
    "causal_batch": "lmcheck.training",
    "causal_lm_collator": "lmcheck.loops.pretraining",
    "causality": "lmcheck.causal",
    "check_lightning": "lmcheck.lightning_setup",
    "check_loop": "lmcheck.setup_checks",
    "check_memorization_lengths": "lmcheck.training",
    "check_model_fits": "lmcheck.loops.pretraining",
    "check_trainer": "lmcheck.setup_checks",
    "chunk_documents": "lmcheck.corpus",
    "Chunks": "lmcheck.corpus",
    "ChunkStats": "lmcheck.corpus",
    "cloze_cases": "lmcheck.cloze",
    "ClozeCase": "lmcheck.cloze",
    "DEFAULT_GOLDEN": "lmcheck.golden",
    "default_recipe_curve": "lmcheck.loops.pretraining",
    "DEFAULT_RTOL": "lmcheck.golden",
    "DEFAULTS": "lmcheck.defaults",
    "device_key": "lmcheck.golden",
    "encoder_padding_invariance": "lmcheck.masked",
    "fill_mask": "lmcheck.masked",
    "finite_loss": "lmcheck.curves",
    "generalization_gap": "lmcheck.curves",
    "GOLDEN_STEPS": "lmcheck.golden",
    "GoldenMissingError": "lmcheck.errors",
    "gpt2_config": "lmcheck.models",
    "gpt2_from_scratch": "lmcheck.models",
    "GPT2_PRESETS": "lmcheck.models",
    "gradient_flow": "lmcheck.training",
    "greedy_decode": "lmcheck.decoding",
    "greedy_matches_generate": "lmcheck.causal",
    "GreedyOutput": "lmcheck.decoding",
    "headroom_above": "lmcheck.results",
    "headroom_below": "lmcheck.results",
    "InputError": "lmcheck.errors",
    "inspect_tokens": "lmcheck.tokens",
    "kv_cache_matches_full": "lmcheck.causal",
    "LmcheckError": "lmcheck.errors",
    "load_causal_lm": "lmcheck.models",
    "load_language_model": "lmcheck.models",
    "load_documents": "lmcheck.corpus",
    "load_smollm2": "lmcheck.models",
    "load_tokenizer": "lmcheck.tokens",
    "LOGIT_ATOL": "lmcheck.comparison",
    "loss_at_init": "lmcheck.training",
    "loss_decreases": "lmcheck.curves",
    "loss_matches_reference": "lmcheck.training",
    "LossCurve": "lmcheck.curves",
    "LossCurveCallback": "lmcheck.loops.pretraining",
    "mask_fill_accuracy": "lmcheck.masked",
    "MASKED_CPU": "lmcheck.defaults",
    "masked_loss_at_init": "lmcheck.masked",
    "MaskedRunConfig": "lmcheck.defaults",
    "MaskPrediction": "lmcheck.masked",
    "matches_golden": "lmcheck.golden",
    "MEMORIZATION_RUN": "lmcheck.loops.masked",
    "MemorizationRun": "lmcheck.loops.masked",
    "memorize_chunks": "lmcheck.loops.masked",
    "memorized_fraction": "lmcheck.training",
    "verbatim_rows": "lmcheck.training",
    "memorizes": "lmcheck.training",
    "ModelError": "lmcheck.errors",
    "next_token_logits": "lmcheck.decoding",
    "NonFiniteError": "lmcheck.errors",
    "NotApplicableError": "lmcheck.errors",
    "overfits": "lmcheck.curves",
    "padding_invariance": "lmcheck.invariance",
    "params_update": "lmcheck.training",
    "parse_wiki_dump": "lmcheck.corpus",
    "plot_loss_curve": "lmcheck.report",
    "pretrain": "lmcheck.loops.pretraining",
    "PRETRAIN_CPU": "lmcheck.defaults",
    "PRETRAIN_CPU_QUICK": "lmcheck.defaults",
    "pretrain_default": "lmcheck.loops.pretraining",
    "PRETRAIN_GPU": "lmcheck.defaults",
    "PretrainConfig": "lmcheck.defaults",
    "pretraining_data": "lmcheck.loops.pretraining",
    "PretrainingData": "lmcheck.loops.pretraining",
    "PretrainRun": "lmcheck.loops.pretraining",
    "recipe_data": "lmcheck.loops.pretraining",
    "record_golden": "lmcheck.golden",
    "Report": "lmcheck.report",
    "reproducible": "lmcheck.curves",
    "Result": "lmcheck.results",
    "round_trip": "lmcheck.tokens",
    "SETUP_CHECKS": "lmcheck.setup_checks",
    "SetupReport": "lmcheck.setup_checks",
    "smollm2_folder": "lmcheck.models",
    "split_documents": "lmcheck.corpus",
    "StopAtMemorization": "lmcheck.loops.pretraining",
    "TIE_ATOL": "lmcheck.comparison",
    "TokenRow": "lmcheck.tokens",
    "TokenTable": "lmcheck.tokens",
    "tolerance_for": "lmcheck.comparison",
    "train_masked_lm": "lmcheck.loops.masked",
    "write_results_json": "lmcheck.report",
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
