"""lmcheck: probes that check a language model and its training setup.

Every probe takes a model, a tokenizer and data, and returns a :class:`Result`::

    import lmcheck
    result = lmcheck.round_trip(lmcheck.load_tokenizer("gpt2"), ["Hello, world"])
    print(result)  # [PASS] round_trip: all 1 texts round-trip (exact text)

A result is truthy when it passed; in a test, ``assert result, result.explanation``.

``import lmcheck`` gives the probes, the setup checks' entry points, the result and error types,
:func:`adapt` and the loaders a newcomer needs. The rest lives in namespaces: the setup wing
(``lmcheck.setup``, its data-parallel probes in ``lmcheck.setup.distributed``), the guard for
the real run (``lmcheck.watch``), the recipes
(``lmcheck.recipes``), lmcheck's own training loops (``lmcheck.loops``), golden loss curves
(``lmcheck.golden``), model presets and builders (``lmcheck.models``), tolerances
(``lmcheck.comparison``), the ready batteries (``lmcheck.batteries``), and each probe family's
helpers in its module (``lmcheck.decoding``, ``lmcheck.training``, ...). Names are imported
lazily, so ``import lmcheck`` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # the probes of a tokenizer
    "round_trip": "lmcheck.tokens",
    "inspect_tokens": "lmcheck.tokens",
    # of a masked LM
    "fill_mask": "lmcheck.masked",
    "mask_fill_accuracy": "lmcheck.masked",
    "masked_loss_at_init": "lmcheck.masked",
    "bidirectionality": "lmcheck.masked",
    "encoder_padding_invariance": "lmcheck.masked",
    # of a causal LM
    "greedy_matches_generate": "lmcheck.causal",
    "kv_cache_matches_full": "lmcheck.causal",
    "causality": "lmcheck.causal",
    "padding_invariance": "lmcheck.invariance",
    "batch_invariance": "lmcheck.invariance",
    # of training: a model and a batch, or a recorded loss curve
    "loss_at_init": "lmcheck.training",
    "gradient_flow": "lmcheck.training",
    "params_update": "lmcheck.training",
    "loss_matches_reference": "lmcheck.training",
    "causal_batch": "lmcheck.training",
    "memorizes": "lmcheck.training",
    "batch_supervision": "lmcheck.supervision",
    "packing_equivalence": "lmcheck.packing",
    "loss_decreases": "lmcheck.curves",
    "overfits": "lmcheck.curves",
    "generalization_gap": "lmcheck.curves",
    "reproducible": "lmcheck.curves",
    "finite_loss": "lmcheck.curves",
    "LossCurve": "lmcheck.curves",
    # the user's own training setup (lmcheck.setup)
    "check_loop": "lmcheck.setup",
    "check_trainer": "lmcheck.setup",
    "check_lightning": "lmcheck.setup",
    "SetupReport": "lmcheck.setup",
    # the result and the errors
    "Result": "lmcheck.results",
    "LmcheckError": "lmcheck.errors",
    "InputError": "lmcheck.errors",
    "ModelError": "lmcheck.errors",
    "NonFiniteError": "lmcheck.errors",
    "NotApplicableError": "lmcheck.errors",
    "AssetError": "lmcheck.errors",
    "GoldenMissingError": "lmcheck.errors",
    # a model of any shape in, the loaders a newcomer needs, a report out
    "adapt": "lmcheck.adapters",
    "load_tokenizer": "lmcheck.tokens",
    "load_language_model": "lmcheck.models",
    "load_causal_lm": "lmcheck.models",
    "load_documents": "lmcheck.corpus",
    "chunk_documents": "lmcheck.corpus",
    "Report": "lmcheck.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name == "watch":  # the guard for the real run: a namespace that is also called, lmcheck.watch(model)
        return import_module("lmcheck.watch")
    raise AttributeError(f"module 'lmcheck' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
