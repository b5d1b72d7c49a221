"""Chapter 4 at full size: the tutorial's own configuration, on one GPU (``pytest -m gpu``).

GPT-2 124M from scratch, every 128-token chunk of the 50 training documents, Hugging Face's
Trainer, bf16 where the GPU supports it (``lmcheck.recipes.PRETRAIN_GPU``). It trains until every
training chunk is memorized (32-token prefix, 32 greedy tokens) or 100 epochs, writes the loss
curve, and checks the chapter's probes. The same function runs on the CPU with a tiny preset
(the last test), so the GPU path is not untested code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lmcheck.curves import finite_loss, generalization_gap, loss_decreases, overfits
from lmcheck.loops.pretraining import pretrain_default
from lmcheck.recipes import PRETRAIN_CPU, PRETRAIN_GPU, PretrainConfig
from lmcheck.report import plot_loss_curve, write_results_json
from lmcheck.results import Result
from lmcheck.training import memorizes


def pretrain_and_check(config: PretrainConfig, out: Path, *, max_loss: float, min_gap: float,
                       **options: Any) -> list[Result]:
    """Train with ``config``, write the curve (PNG + JSON) and results to ``out``, check the probes."""
    run = pretrain_default(config, **options)
    curve = run.curve
    plot_loss_curve(curve, out / "pretraining-loss.png")
    results = [
        loss_decreases(curve, min_relative_drop=0.5),
        overfits(curve, max_loss=max_loss),
        finite_loss(curve),
        memorizes(run.model, run.tokenizer, run.data.train, prefix_length=run.config.prefix_length,
                  continuation_length=run.config.continuation_length),
        generalization_gap(curve, min_gap=min_gap),
    ]
    write_results_json(results, out / "pretraining-results.json")
    (out / "pretraining-run.json").write_text(json.dumps(
        {k: v for k, v in curve.metadata.items() if k != "memorized_fraction"}, indent=1, default=str))
    assert curve.stop_reason == "memorized", curve.metadata.get("memorized_fraction", [])[-3:]
    for result in results:
        assert result, result.explanation
    return results


@pytest.mark.gpu
def test_the_tutorial_configuration_memorizes_on_a_gpu(tmp_path: Path) -> None:
    """GPT-2 124M memorizes all ~2,266 training chunks while validation loss stays high."""
    config = PRETRAIN_GPU.replace(bf16=torch.cuda.is_bf16_supported())
    out = Path(os.environ.get("LMCHECK_GPU_OUT", tmp_path))  # set it to keep the plot and numbers
    out.mkdir(parents=True, exist_ok=True)
    pretrain_and_check(config, out, max_loss=1.0, min_gap=3.0)


TINY = dict(preset="gpt2-tiny-cpu", context_length=32, chunks_per_document=1, n_train_chunks=4,
            n_valid_chunks=8, lr=PRETRAIN_CPU.lr, batch_size=4, max_epochs=60, eval_every=10,
            prefix_length=8, continuation_length=24, eval_batch_size=8)  # the GPU recipe, shrunk


def test_the_same_path_runs_on_a_cpu_with_a_tiny_preset(gpt2_tokenizer, tmp_path: Path) -> None:
    """The GPU test's function and backend (Trainer), shrunk: 4 chunks of 32 tokens, 8 + 24."""
    config = PRETRAIN_GPU.replace(**TINY, bf16=False, memorization_every=5)
    # memorized at about step 25 with a mean loss near 1.7: in 32-token chunks the first tokens
    # have too little context to be predictable, so the loss bound is looser than on the GPU
    pretrain_and_check(config, tmp_path, max_loss=2.0, min_gap=3.0, tokenizer=gpt2_tokenizer)
    assert (tmp_path / "pretraining-loss.png").stat().st_size > 10_000


# Without AVX-512 torch emulates bf16 matmuls on the CPU: on a 2-core AMD EPYC (AVX2) the test
# below took 180 s, against about 11 s on a 2-core AVX-512 Xeon. There it runs in the slow tier.
_BF16_EMULATED = torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2", "NO AVX")


@(pytest.mark.slow if _BF16_EMULATED else lambda test: test)
def test_under_bf16_the_lean_loop_screens_its_checks_with_the_models_own_logits(gpt2_tokenizer) -> None:
    """The GPU benchmark's path (lean loop, bf16): the model keeps its own loss, and each step's
    logits from that same call screen the memorization checks, so the full check runs only once
    every chunk was right at its last step, and it stops the run."""
    run = pretrain_default(PRETRAIN_GPU.replace(**TINY, backend="lean", bf16=True, memorization_every=1),
                           tokenizer=gpt2_tokenizer)
    metadata = run.curve.metadata
    assert metadata["loss"] == "the model's own"
    assert run.curve.stop_reason == "memorized", metadata.get("screened_fraction", [])[-3:]
    checks, screened = metadata["memorized_fraction"], metadata["screened_fraction"]
    assert 1 <= len(checks) <= 5
    assert len(checks) + len(screened) == run.curve.steps
    assert checks[-1] == [run.curve.steps, 1.0]
