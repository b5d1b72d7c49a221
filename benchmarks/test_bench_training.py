"""Benchmarks of chapter 4: training throughput and time to memorization.

The lean loop and Hugging Face's Trainer train the same tiny model on the same chunks in the same
process; the ratio of their tokens/s is the Trainer's overhead. Time-to-memorization runs the
embedded default (``lmcheck.defaults.PRETRAIN_CPU``) to its stop. MFU compares 6·N flops per token with a
large matmul measured on this device (not a datasheet peak). Every clock is read after
``torch.cuda.synchronize()`` where there is a GPU (the loops do this around each step).
"""

from __future__ import annotations

import time

import pytest
import torch

from lmcheck.defaults import DEFAULTS, PRETRAIN_CPU
from lmcheck.loops.pretraining import PretrainRun, pretrain, pretrain_default, pretraining_data
from lmcheck.models import gpt2_from_scratch, parameter_count

STEPS = 12


def measured_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """fp32 matmul flops/s on this device, the best of ``repeats``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


@pytest.fixture(scope="module")
def data(gpt2_tokenizer):
    settings = PRETRAIN_CPU
    return pretraining_data(gpt2_tokenizer, context_length=DEFAULTS["context_length"],
                            chunks_per_document=settings.chunks_per_document,
                            n_train_chunks=settings.n_train_chunks, n_valid_chunks=2)


def _tokens_per_second(backend: str, tokenizer, data) -> tuple[float, int]:
    """End-to-end tokens/s of one ``pretrain`` call: set-up, data loading, logging, all of it."""
    settings = PRETRAIN_CPU
    model = gpt2_from_scratch(tokenizer, preset=settings.preset, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    curve = pretrain(model, tokenizer, data.train, data.valid, settings, backend=backend,
                     max_steps=STEPS, eval_every=STEPS, memorization_every=None)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = curve.steps * settings.batch_size * DEFAULTS["context_length"]
    return tokens / seconds, parameter_count(model)


def test_lean_loop_vs_trainer_tokens_per_second(benchmark, gpt2_tokenizer, data):
    trainer_speed, _ = _tokens_per_second("trainer", gpt2_tokenizer, data)
    lean_speed, parameters = benchmark.pedantic(
        _tokens_per_second, args=("lean", gpt2_tokenizer, data), rounds=1, iterations=1)
    peak = measured_peak_flops()
    benchmark.extra_info.update(
        lean_tokens_per_s=lean_speed, trainer_tokens_per_s=trainer_speed,
        trainer_over_lean=trainer_speed / lean_speed, parameters=parameters,
        mfu_lean=6 * parameters * lean_speed / peak, measured_peak_flops=peak,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    )
    assert lean_speed > 0
    assert trainer_speed > 0


def test_time_to_memorization_of_the_cpu_default(benchmark, gpt2_tokenizer):
    run: PretrainRun = benchmark.pedantic(
        pretrain_default, kwargs={"tokenizer": gpt2_tokenizer}, rounds=1, iterations=1)
    curve = run.curve
    benchmark.extra_info.update(
        steps=curve.steps, stop_reason=curve.stop_reason, train_s=curve.metadata["train_s"],
        wall_s=curve.metadata["wall_s"], tokens_per_s=curve.metadata["tokens_per_s"],
        final_train_loss=curve.train[-1][1], final_valid_loss=curve.valid[-1][1],
    )
    assert curve.stop_reason == "memorized"
