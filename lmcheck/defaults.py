"""The embedded default: the one place that names the data, split, tokenizer and presets that
``lmcheck tutorial``, the test suite and the benchmarks all use, so that they never drift apart.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

__all__ = ["DEFAULTS"]

DEFAULTS: MappingProxyType[str, Any] = MappingProxyType(
    {
        # chapter 1: the tutorial's two seed sentences
        "masked_sentence": "Life is like a [MASK] of chocolates.",
        "causal_prompt": "Swimming at the beach is",
        # data: the Wikipedia sample from the offline assets, split as the tutorial does
        "documents": "wiki-sample",
        "n_train": 50,
        "n_valid": 50,
        "split_seed": 0,
        "context_length": 128,
        # tokenizers built offline from the assets
        "causal_tokenizer": "gpt2",
        "masked_tokenizer": "bert-base-uncased",
        # seeds for model initialisation and training order
        "seed": 42,
    }
)
