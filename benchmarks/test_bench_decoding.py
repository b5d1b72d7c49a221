"""Benchmarks of chapter 3's greedy loop: the hand loop with the KV cache against ``generate``, and
the cache against full recomputation.

The tutorial's loop (:func:`lmcheck.decoding.greedy_decode`) and ``model.generate(do_sample=False)``
decode the same prompt for the same number of tokens in the same process, on SmolLM2-135M (the
real model of chapter 3) and on a small GPT-2 configuration; each is timed as the best of a few
rounds after a warm-up. The hand loop must reach 0.9x ``generate``'s tokens/s: it is the
reference the probes compare ``generate`` with, and a slow reference makes every probe slow.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

from lmcheck.decoding import greedy_decode
from lmcheck.models import gpt2_from_scratch

NEW_TOKENS = 32
ROUNDS = 3
PROMPT = "The history of the city begins in the Roman era, when a small settlement grew on the river"


def best_seconds(run: Callable[[], object], rounds: int = ROUNDS) -> float:
    """The fastest of ``rounds`` runs after one warm-up run."""
    run()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def decoding_speeds(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """Tokens/s of the hand loop with and without the cache, and of ``generate``."""
    mask = torch.ones_like(ids)
    config = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                  pad_token_id=0, eos_token_id=None, use_cache=True)
    with torch.inference_mode():
        hand = best_seconds(lambda: greedy_decode(model, ids, max_new_tokens=NEW_TOKENS))
        full = best_seconds(lambda: greedy_decode(model, ids, max_new_tokens=NEW_TOKENS, use_cache=False), 1)
        generate = best_seconds(lambda: model.generate(ids, attention_mask=mask, **config))
        same = torch.equal(greedy_decode(model, ids, max_new_tokens=NEW_TOKENS).sequences,
                           model.generate(ids, attention_mask=mask, **config))
    return {"hand_tokens_per_s": NEW_TOKENS / hand, "generate_tokens_per_s": NEW_TOKENS / generate,
            "no_cache_tokens_per_s": NEW_TOKENS / full, "hand_over_generate": generate / hand,
            "cache_speedup": full / hand, "same_tokens": same}


@pytest.mark.parametrize("which", ["smollm2", "gpt2-small-config"])
def test_hand_greedy_loop_vs_generate(benchmark, which, request, gpt2_tokenizer):
    if which == "smollm2":
        model, tokenizer = request.getfixturevalue("smollm2")
    else:
        tokenizer = gpt2_tokenizer
        model = gpt2_from_scratch(tokenizer, preset=dict(n_layer=4, n_head=4, n_embd=256, n_positions=256)).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    speeds = benchmark.pedantic(decoding_speeds, args=(model, ids), rounds=1, iterations=1)
    benchmark.extra_info.update(speeds, model=which, prompt_tokens=ids.shape[1], new_tokens=NEW_TOKENS,
                                threads=torch.get_num_threads())
    assert speeds["same_tokens"]
    assert speeds["hand_over_generate"] >= 0.9, speeds
