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
        # chapter 3: prompts of different lengths (a batch of them needs left padding), the first
        # being causal_prompt, and SmolLM2-135M-Instruct's greedy 20-token continuation of it
        # (checked with generate, every generation_config override neutralised)
        "causal_prompts": ("Swimming at the beach is", "The capital of France is", "def fibonacci(n):",
                           "Once upon a time, in a small village near the mountains, there lived"),
        "smollm2_continuation": " a great way to unwind and enjoy the beautiful scenery.\n\nThe beach is a great place",
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
        # chapter 2, on a CPU: a 2-layer, 128-wide BERT (real uncased vocabulary) trained with the
        # masked-LM collator on the first 8 chunks of 64 tokens until it fills 40 cloze cases
        "masked_pretrain": MappingProxyType({
            "preset": "bert-tiny-cpu", "dropout": 0.0, "chunks": 8, "context_length": 64,
            "steps": 300, "lr": 3e-3, "batch_size": 8, "cases": 40, "case_seed": 0,
            "memorized_min": 0.9, "heldout_max": 0.2,
        }),
        # chapter 4, on a CPU: a 2-layer, 128-wide GPT-2 (full 50,257 vocabulary) memorizes the
        # first chunk of each of the first 4 training documents (about 45 AdamW steps at 2e-3; at 4e-3 it had not memorized in 80)
        "pretrain": MappingProxyType({
            "preset": "gpt2-tiny-cpu", "dropout": 0.0, "chunks_per_document": 1,
            "n_train_chunks": 4, "n_valid_chunks": 16, "backend": "lean", "lr": 2e-3,
            "batch_size": 4, "max_steps": 100, "eval_every": 10, "memorization_every": 5,
            "prefix_length": 32, "continuation_length": 32, "bf16": False,
        }),
        # chapter 4 as the tutorial runs it (pytest -m gpu): GPT-2 124M, every training chunk,
        # Trainer, bf16; stops at memorization, at most 100 epochs as in the tutorial
        "pretrain_gpu": MappingProxyType({
            "preset": "gpt2", "dropout": 0.0, "chunks_per_document": None, "n_train_chunks": None,
            "n_valid_chunks": None, "backend": "trainer", "lr": 3e-4, "batch_size": 32,
            "max_epochs": 100, "eval_every": 71, "memorization_every": 71, "bf16": True,
            "eval_batch_size": 64,
        }),
    }
)
