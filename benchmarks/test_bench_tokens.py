"""Benchmarks of chapter 1: how fast documents become chunks.

``chunk_documents`` is measured against the reference it wraps, one batched tokenizer call with
the same truncation settings, in the same process: the ratio is lmcheck's overhead (keeping full
blocks, counting what was dropped, building the dataset).
"""

from __future__ import annotations

import time

from lmcheck import chunk_documents
from lmcheck.recipes import DEFAULTS


def test_chunk_documents_throughput(benchmark, gpt2_tokenizer, wiki_split):
    texts = list(wiki_split["train"]["text"])
    length = DEFAULTS["context_length"]

    def reference():
        return gpt2_tokenizer(texts, truncation=True, max_length=length,
                              return_overflowing_tokens=True, return_length=True)

    start = time.perf_counter()
    for _ in range(3):
        reference()
    reference_seconds = (time.perf_counter() - start) / 3

    chunks, stats = benchmark(chunk_documents, gpt2_tokenizer, texts, length)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        tokens=stats.tokens_total,
        tokens_per_second=stats.tokens_total / mean,
        reference_tokens_per_second=stats.tokens_total / reference_seconds,
        overhead_ratio=mean / reference_seconds,
    )
    assert stats.chunks == len(chunks) > 0
