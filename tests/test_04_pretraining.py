"""Chapter 4: pretraining GPT-2 from scratch, and convincing yourself the loop works.

The tutorial trains a randomly initialised GPT-2 on 50 Wikipedia articles cut into 128-token
chunks, watches the training loss fall while the validation loss stays high (its Figure 1), and
checks memorization: given the start of a training article, greedy generation continues it
verbatim. The point is a practice: before paying for a full run, overfit a tiny subset and check
that the loss starts where it should, falls, reaches zero, and that every parameter learns.

On a CPU the embedded default (``lmcheck.recipes.PRETRAIN_CPU``) does this with a 2-layer, 160-wide GPT-2
that keeps GPT-2's full 50,257-token vocabulary, trained by a lean AdamW loop on the first chunk
of each of the 50 training documents (49 chunks: one document is shorter than a chunk, from the
openings of "Android (robot)", "Alaska", "Anthropology" and "Achilles" on). It stops as soon as
all 49 chunks are memorized (32-token prefix, 32 greedy tokens): at step 254 of at most 260 (20
epochs) on a 2-core AVX-512 CPU.

The tests about the trained run hold at two sizes of it: the first 4 chunks
(``PRETRAIN_CPU_QUICK``, memorized at step 17 of 20, about 8 s on one thread) in the default
suite, and all 49 (75-80 s on one thread, 40 s on two) under ``pytest -m slow``, which CI runs
after the default suite. ``pytest -m gpu`` runs the tutorial's own configuration
(tests/test_04_gpu.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from lmcheck.curves import (
    finite_loss,
    generalization_gap,
    loss_decreases,
    overfits,
    reproducible,
)
from lmcheck.loops.pretraining import (
    PretrainingData,
    PretrainRun,
    causal_lm_collator,
    pretrain,
    pretrain_default,
    recipe_data,
)
from lmcheck.models import gpt2_from_scratch
from lmcheck.recipes import DEFAULTS, PRETRAIN_CPU, PRETRAIN_CPU_QUICK
from lmcheck.report import plot_loss_curve
from lmcheck.training import (
    causal_batch,
    gradient_flow,
    loss_at_init,
    memorizes,
    params_update,
    verbatim_rows,
)

SETTINGS = PRETRAIN_CPU


@pytest.fixture(scope="module", params=[pytest.param(PRETRAIN_CPU_QUICK, id="4-chunks"),
                                        pytest.param(PRETRAIN_CPU, id="49-chunks", marks=pytest.mark.slow)])
def run(request: pytest.FixtureRequest, gpt2_tokenizer: PreTrainedTokenizerBase) -> PretrainRun:
    """The embedded default, trained once per size: its first 4 chunks, and (slow) all 49."""
    return pretrain_default(request.param, tokenizer=gpt2_tokenizer)


@pytest.fixture(scope="module")
def data(gpt2_tokenizer: PreTrainedTokenizerBase) -> PretrainingData:
    """The embedded default's 49 training chunks and its validation chunks, untrained on."""
    return recipe_data(SETTINGS, gpt2_tokenizer)


@pytest.fixture
def fresh_model(gpt2_tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """The same architecture and seed as the run, untrained."""
    return gpt2_from_scratch(gpt2_tokenizer, preset=SETTINGS.preset, seed=DEFAULTS["seed"],
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def test_the_model_is_built_from_the_tokenizer(fresh_model: torch.nn.Module, gpt2_tokenizer) -> None:
    """GPT-2's configuration takes its vocabulary and special ids from the tokenizer; pad = eos."""
    config = fresh_model.config
    assert config.vocab_size == len(gpt2_tokenizer) == 50257
    assert config.n_positions >= DEFAULTS["context_length"]
    assert config.eos_token_id == config.pad_token_id == gpt2_tokenizer.eos_token_id == 50256


def test_the_training_subset_is_the_opening_of_every_article(data: PretrainingData, gpt2_tokenizer) -> None:
    """The first chunk of each training document long enough to have one: 49 chunks of 128 tokens."""
    train = data.train
    assert len(train) == 49 == data.train_stats.documents - 1
    assert {len(ids) for ids in train["input_ids"]} == {128}
    assert len(set(train["document"])) == 49
    assert train["document"][:4] == [0, 1, 2, 3]
    opening = gpt2_tokenizer.decode(train[0]["input_ids"])
    assert data.split["train"][0]["text"].startswith(opening[:100])
    assert len(data.valid) == SETTINGS.n_valid_chunks


def test_the_quick_run_is_the_first_four_of_those_chunks(data: PretrainingData, gpt2_tokenizer) -> None:
    """``PRETRAIN_CPU_QUICK`` changes only how many chunks: the same recipe on the first 4."""
    quick = recipe_data(PRETRAIN_CPU_QUICK, gpt2_tokenizer)
    assert quick.train["input_ids"] == data.train["input_ids"][:4]
    assert PRETRAIN_CPU_QUICK == SETTINGS.replace(n_train_chunks=4, n_valid_chunks=4)


def test_loss_at_init_is_ln_vocab(fresh_model, data: PretrainingData) -> None:
    """Untrained, the model spreads its bets evenly: loss ≈ ln(50,257) = 10.825 nats."""
    result = loss_at_init(fresh_model, data.train, tolerance=0.5)
    assert result, result.explanation
    assert abs(result.metrics["ln_vocab"] - math.log(50257)) < 1e-9


def test_gradients_reach_every_parameter(fresh_model, data: PretrainingData) -> None:
    """One backward pass gives each of the 28 parameter tensors a finite, non-zero gradient."""
    result = gradient_flow(fresh_model, torch.tensor(data.train["input_ids"][:4]))
    assert result, result.explanation
    assert "all 28 trainable parameters" in result.explanation


def test_one_optimizer_step_changes_every_parameter(fresh_model, data: PretrainingData) -> None:
    """After one AdamW step every trainable tensor differs from its initial value."""
    result = params_update(fresh_model, torch.tensor(data.train["input_ids"][:4]), lr=SETTINGS.lr)
    assert result, result.explanation


def test_the_batches_are_causal_lm_batches(data: PretrainingData, gpt2_tokenizer) -> None:
    """pretrain's collator (mlm=False) gives labels equal to the inputs; the model shifts them itself."""
    batch = causal_lm_collator(gpt2_tokenizer)([{"input_ids": ids} for ids in data.train["input_ids"][:4]])
    assert torch.equal(batch["labels"], batch["input_ids"])  # (4, 128): equal chunks, no padding
    result = causal_batch(batch)
    assert result, result.explanation


def test_the_training_loss_falls(run: PretrainRun) -> None:
    """The training loss starts at ln V and drops by more than half, to below 0.2."""
    result = loss_decreases(run.curve, min_relative_drop=0.5)
    assert result, result.explanation
    # measured on 2 CPU cores, 49 chunks: 10.19 (mean of steps 1-3) to 0.028 (steps 252-254);
    # 4 chunks (one batch, seen at every step): 10.85 at step 1, 0.037 at step 17
    assert abs(run.curve.train[0][1] - math.log(50257)) < 0.5
    assert result.metrics["last"] < 0.2
    assert finite_loss(run.curve)


def test_the_model_overfits_its_chunks(run: PretrainRun) -> None:
    """Within the step budget the training loss reaches 1 nat or less."""
    result = overfits(run.curve, max_loss=1.0, within_steps=run.config.steps_for(len(run.data.train)))
    assert result, result.explanation


def test_every_training_chunk_is_memorized(run: PretrainRun) -> None:
    """Given its first 32 tokens, each training chunk continues verbatim for 32 greedy tokens."""
    assert run.curve.stop_reason == "memorized", run.curve.metadata.get("screened_fraction", [])[-3:]
    assert run.curve.steps <= run.config.steps_for(len(run.data.train))  # 20 epochs: 260 steps for 49 chunks
    result = memorizes(run.model, run.tokenizer, run.data.train, prefix_length=32, continuation_length=32)
    assert result, result.explanation
    assert result.metrics["verbatim_rate"] == 1.0
    assert result.metrics["token_match_rate"] == 1.0


def test_the_teacher_forced_check_agrees_with_greedy_decoding(run: PretrainRun, fresh_model) -> None:
    """The loop stops on one teacher-forced forward pass (the argmax at every continuation position
    is the true token); greedy decoding, the final confirmation, gives the same verdict per chunk,
    trained and untrained."""
    ids = torch.tensor(run.data.train["input_ids"])
    for model, expected in ((run.model, True), (fresh_model, False)):
        forced = verbatim_rows(model, ids, prefix_length=32, continuation_length=32)
        greedy = memorizes(model, run.tokenizer, ids, prefix_length=32, continuation_length=32)
        assert forced.tolist() == [row["verbatim"] for row in greedy.details] == [expected] * len(ids)


def test_the_training_steps_screen_the_memorization_checks(run: PretrainRun) -> None:
    """Each training step's own argmax (dropout off) says which of its chunks it predicted verbatim;
    the full check runs only once every chunk was right at its last step, so it ran a handful of
    times in the whole run (once, measured) and stopped the loop at its first 100%."""
    screened = run.curve.metadata["screened_fraction"]
    checks = run.curve.metadata["memorized_fraction"]
    assert run.curve.metadata["loss"] == "fused linear cross-entropy"
    assert 1 <= len(checks) <= 5
    assert len(screened) + len(checks) == run.curve.steps
    assert checks[-1] == [run.curve.steps, 1.0]
    assert all(fraction < 1.0 for _, fraction in screened)


def test_the_start_of_a_training_article_continues_verbatim(run: PretrainRun) -> None:
    """The tutorial's form: "An android is a robot or" continues " synthetic organism designed ..."."""
    article = run.data.split["train"][0]["text"]
    result = memorizes(run.model, run.tokenizer, [article], prefix_length=6, continuation_length=12,
                       name="continues_training_article")
    assert result, result.explanation
    completion = result.details[0]
    assert completion["prompt"] == "An android is a robot or"
    assert article.startswith(completion["prompt"] + completion["got"])


def test_validation_loss_stays_high(run: PretrainRun) -> None:
    """Memorizing its chunks teaches nothing that transfers: the validation loss ends above ln V."""
    result = generalization_gap(run.curve, min_gap=3.0)
    assert result, result.explanation
    assert result.metrics["valid_loss"] > 8.0


def test_the_loss_curve_is_plotted(run: PretrainRun, tmp_path) -> None:
    """The tutorial's Figure 1: a PNG of both curves, and the same points as JSON beside it."""
    png = plot_loss_curve(run.curve, tmp_path / "pretraining-loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(png.with_suffix(".json").read_text())
    assert saved["train"] == [[s, v] for s, v in run.curve.train]
    assert saved["stop_reason"] == "memorized"


def test_the_trainer_and_the_lean_loop_record_the_same_losses(data: PretrainingData, gpt2_tokenizer) -> None:
    """Hugging Face's Trainer (the model's own loss) and the lean loop (the fused loss), same model,
    data, seed, optimizer and schedule: same first 3 losses."""
    curves = []
    for backend in ("trainer", "lean"):
        model = gpt2_from_scratch(gpt2_tokenizer, preset=SETTINGS.preset, seed=DEFAULTS["seed"],
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        curves.append(pretrain(model, gpt2_tokenizer, data.train.select(range(4)), data.valid.select(range(2)), backend=backend, batch_size=4,
                               max_steps=3, max_epochs=None, eval_every=3, memorization_every=None))
    # each step sees the same 4 chunks, in an order that differs between the two: sums agree to
    # rounding. Measured: largest difference below 1e-5 (fp32, 2 CPU cores); 1e-4 leaves room
    result = reproducible(curves[0], curves[1], steps=3, atol=1e-4)
    assert result, result.explanation
    assert [s for s, _ in curves[0].valid] == [s for s, _ in curves[1].valid] == [3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="bit-identical losses are a CPU property: "
                    "CUDA's embedding backward is not deterministic")
def test_training_is_reproducible(run: PretrainRun, gpt2_tokenizer) -> None:
    """The same seed gives bit-identical first losses on a CPU (atol 0)."""
    rerun = pretrain_default(run.config, tokenizer=gpt2_tokenizer, first_steps=3, memorization_every=None,
                             n_valid_chunks=1)
    result = reproducible(run.curve, rerun.curve, steps=3, atol=0.0)
    assert result, result.explanation
