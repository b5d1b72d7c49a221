"""Library tests of the training probes (lmcheck.curves, lmcheck.training) and loops: negative
controls and bad input.

Every probe meets a deliberately broken setup that must make it fail, with an explanation that
names the problem. Training runs here use a smaller setup than chapter 4 (32-token chunks,
8-token prefix, 24-token continuation) so that each broken run costs seconds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import datasets
import pytest
import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

import lmcheck
from lmcheck._model import mean_loss
from lmcheck.curves import (
    LossCurve,
    finite_loss,
    generalization_gap,
    loss_decreases,
    overfits,
    reproducible,
)
from lmcheck.errors import InputError, ModelError
from lmcheck.loops.pretraining import (
    PretrainRun,
    check_model_fits,
    pretrain,
    pretrain_default,
    pretraining_data,
    recipe_data,
)
from lmcheck.models import bert_from_scratch, gpt2_from_scratch
from lmcheck.recipes import MASKED_CPU, PRETRAIN_CPU, PRETRAIN_GPU, PretrainConfig
from lmcheck.training import (
    causal_batch,
    gradient_flow,
    loss_at_init,
    memorized_fraction,
    memorizes,
    params_update,
)

# 4 chunks of 32 tokens (the first of each of the first 4 training documents), memorized whole: 8 + 24,
# by the 128-wide GPT-2 at one constant rate
SMALL: dict[str, Any] = dict(
    context_length=32, n_train_chunks=4, n_valid_chunks=8, prefix_length=8, continuation_length=24,
    max_steps=40, max_epochs=None, eval_every=10, memorization_every=None, preset="gpt2-tiny-cpu",
    embedding_lr=None, betas=(0.9, 0.999), warmup=0.0, decay="constant",
)
EMBEDDINGS = ["transformer.wte.weight", "transformer.wpe.weight"]


@pytest.fixture(scope="module")
def padded_tokenizer(gpt2_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="module")
def clean(gpt2_tokenizer: PreTrainedTokenizerBase) -> PretrainRun:
    """The small setup, trained correctly: the positive control for the broken runs below."""
    return pretrain_default(tokenizer=gpt2_tokenizer, **SMALL)


@pytest.fixture
def model(gpt2_tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    return gpt2_from_scratch(gpt2_tokenizer, preset="gpt2-tiny-cpu", resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.fixture
def batch(clean: PretrainRun) -> torch.Tensor:
    return torch.tensor(clean.data.train["input_ids"])  # (4, 32)


class ShuffledLabels:
    """A broken collator: each row's labels come from another row of the batch."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.inner = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner(rows)
        batch["labels"] = batch["labels"].roll(1, dims=0)
        return batch


class LeakyMask:
    """A broken collator: a custom 4-D attention mask that lets every position see every other."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.inner = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner(rows)
        size, length = batch["input_ids"].shape
        batch["attention_mask"] = torch.ones(size, 1, length, length, dtype=torch.bool)  # (B, 1, T, T)
        return batch


def test_the_clean_small_run_passes_every_probe(clean: PretrainRun) -> None:
    """The positive control: the same budget the broken runs get is enough when nothing is broken."""
    curve = clean.curve
    for result in (loss_decreases(curve), overfits(curve, max_loss=1.0, within_steps=SMALL["max_steps"]),
                   generalization_gap(curve, min_gap=3.0), finite_loss(curve),
                   memorizes(clean.model, clean.tokenizer, clean.data.train, prefix_length=8, continuation_length=24)):
        assert result, result.explanation


# ------------------------------------------------------------------ learning rate 0


def test_learning_rate_zero_fails_loss_decreases(gpt2_tokenizer) -> None:
    """lr = 0: the loss stays where it started, so loss_decreases fails and says why."""
    run = pretrain_default(tokenizer=gpt2_tokenizer, **{**SMALL, "max_steps": 6}, lr=0.0)
    result = loss_decreases(run.curve)
    assert not result
    assert "0.0% drop" in result.explanation
    assert "learning rate" in result.explanation


def test_learning_rate_zero_fails_params_update(model, batch) -> None:
    """lr = 0: no parameter moves, and the explanation names them."""
    result = params_update(model, batch, lr=0.0)
    assert not result
    assert "28 of 28 trainable parameters did not change" in result.explanation
    assert "transformer.wte.weight" in result.explanation


# ------------------------------------------------------------------ frozen embeddings


@pytest.mark.parametrize("probe", [gradient_flow, params_update], ids=["gradient_flow", "params_update"])
def test_frozen_embeddings_fail(probe, model, batch) -> None:
    """Embeddings frozen by mistake: the probe names the frozen tensor."""
    for name in EMBEDDINGS:
        model.get_parameter(name).requires_grad_(False)
    result = probe(model, batch)
    assert not result
    assert "transformer.wte.weight is frozen" in result.explanation
    assert probe(model, batch, expect_frozen=EMBEDDINGS), "frozen on purpose, and said so"


def test_a_parameter_cut_from_the_graph_gets_no_gradient(model, batch) -> None:
    """wpe's output detached: the parameter still requires grad but receives none."""
    model.transformer.wpe.register_forward_hook(lambda module, args, output: output.detach())
    result = gradient_flow(model, batch)
    assert not result
    assert "transformer.wpe.weight gets no gradient" in result.explanation


def test_a_parameter_left_out_of_the_optimizer_does_not_change(model, batch) -> None:
    """An optimizer built without the final layer norm: params_update names it."""
    def optimizer(trial):
        left_out = trial.transformer.ln_f.weight
        return torch.optim.AdamW([p for p in trial.parameters() if p is not left_out], lr=1e-3)

    result = params_update(model, batch, optimizer=optimizer)
    assert not result
    assert "transformer.ln_f.weight" in result.explanation


# ------------------------------------------------------------------ labels shuffled against inputs


def test_shuffled_labels_are_refused_by_the_loop(gpt2_tokenizer, padded_tokenizer) -> None:
    """The loop checks its first batch: labels that are not the inputs stop it before step 1."""
    with pytest.raises(InputError, match="labels differ from input_ids"):
        pretrain_default(tokenizer=gpt2_tokenizer, **SMALL, collator=ShuffledLabels(padded_tokenizer))


@pytest.fixture(scope="module")
def shuffled(gpt2_tokenizer, padded_tokenizer) -> PretrainRun:
    """The same budget as the clean run, labels shuffled, the loop's batch check turned off."""
    return pretrain_default(tokenizer=gpt2_tokenizer, **SMALL, collator=ShuffledLabels(padded_tokenizer),
                            check_batch=False)


def test_shuffled_labels_fail_overfits(shuffled: PretrainRun) -> None:
    """Labels from another chunk cannot be fitted: the loss never nears zero in the budget."""
    result = overfits(shuffled.curve, max_loss=1.0, within_steps=SMALL["max_steps"])
    assert not result
    assert "never reached 1.0 within 40 steps" in result.explanation


def test_shuffled_labels_fail_memorizes(shuffled: PretrainRun) -> None:
    """The model did not learn the chunks' own continuations: memorizes names the first miss."""
    result = memorizes(shuffled.model, shuffled.tokenizer, shuffled.data.train, prefix_length=8,
                       continuation_length=8)
    assert not result
    assert "first differs at continuation token" in result.explanation
    assert "expected" in result.explanation


# ------------------------------------------------------------------ masked-LM collator, leaked future


def test_a_masked_lm_collator_is_caught(gpt2_tokenizer, clean: PretrainRun) -> None:
    """A masked-LM collator on a causal LM: most labels are ignored and inputs are replaced."""
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.pad_token = tokenizer.mask_token = tokenizer.eos_token  # GPT-2 has no mask token
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, seed=0)
    result = causal_batch(collator([{"input_ids": ids} for ids in clean.data.train["input_ids"]]))
    assert not result
    assert "masked-LM batch" in result.explanation
    assert "mlm=False" in result.explanation
    with pytest.raises(InputError, match="masked-LM batch"):
        pretrain_default(tokenizer=gpt2_tokenizer, **SMALL, collator=collator)


def test_an_attention_mask_that_leaks_the_future_is_caught(gpt2_tokenizer, padded_tokenizer, clean) -> None:
    """A 4-D mask that lets position t see t+1: the batch check names the leak before step 1.

    (Trained anyway on four chunks, the leak does not show in the curve within a test's budget:
    memorizing four chunks is easier than learning to copy the next token, so the check looks at
    the mask itself.)
    """
    collator = LeakyMask(padded_tokenizer)
    result = causal_batch(collator([{"input_ids": ids} for ids in clean.data.train["input_ids"]]))
    assert not result
    assert "attend to later position" in result.explanation
    with pytest.raises(InputError, match="attend to later position"):
        pretrain_default(tokenizer=gpt2_tokenizer, **SMALL, collator=collator)


# ------------------------------------------------------------------ NaN planted mid-training


@pytest.mark.parametrize("backend", ["lean", "trainer"], ids=["lean-loop", "hf-trainer"])
def test_a_nan_mid_training_stops_the_run_and_names_the_step(gpt2_tokenizer, model, backend) -> None:
    """The 4th training forward returns NaN embeddings: training stops at step 4 and says so."""
    calls = {"n": 0}

    def plant(module, args, output):
        calls["n"] += module.training
        return output * float("nan") if module.training and calls["n"] == 4 else output

    model.transformer.wte.register_forward_hook(plant)
    run = pretrain_default(tokenizer=gpt2_tokenizer, model=model, **{**SMALL, "max_steps": 8},
                           batch_size=2, backend=backend)
    assert run.curve.stop_reason == "non-finite loss"
    assert run.curve.non_finite_step == 4
    assert run.curve.steps == 4
    result = finite_loss(run.curve)
    assert not result
    assert "training loss at step 4 is nan (not finite) and training stopped there" in result.explanation
    decreases = loss_decreases(run.curve)
    assert not decreases
    assert "training loss at step 4 is nan (not finite)" in decreases.explanation


# ------------------------------------------------------------------ the other probes' controls


def test_a_badly_scaled_init_fails_loss_at_init(gpt2_tokenizer, batch) -> None:
    """Weights drawn with std 1 instead of 0.02: the first loss is far above ln(V)."""
    broken = gpt2_from_scratch(gpt2_tokenizer, preset="gpt2-tiny-cpu", initializer_range=1.0)
    result = loss_at_init(broken, batch)
    assert not result
    assert "initialisation scale" in result.explanation


def test_a_trained_model_fails_loss_at_init(clean: PretrainRun) -> None:
    """A model that already knows the chunks is not at init: loss far below ln(V)."""
    result = loss_at_init(clean.model, clean.data.train)
    assert not result
    assert "lower than chance" in result.explanation


def test_a_different_seed_fails_reproducible(clean: PretrainRun, gpt2_tokenizer) -> None:
    """Another seed initialises other weights: reproducible names step 1."""
    other = pretrain_default(tokenizer=gpt2_tokenizer, **{**SMALL, "max_steps": 2},
                             seed=7)
    result = reproducible(clean.curve, other.curve, steps=2)
    assert not result
    assert result.explanation.startswith("step 1:")


def test_validation_data_in_training_fails_generalization_gap() -> None:
    """A curve whose validation loss tracks the training loss is flagged."""
    curve = LossCurve(train=[(s, 10.0 / s) for s in range(1, 11)], valid=[(10, 1.1)])
    result = generalization_gap(curve, min_gap=1.0)
    assert not result
    assert result.headroom is not None
    assert result.headroom < 0
    assert "validation fell with training" in result.explanation
    assert "validation documents in the training data" in result.explanation


# ------------------------------------------------------------------ bad input


def test_fewer_documents_than_the_split_asks_for(gpt2_tokenizer, wiki_documents) -> None:
    with pytest.raises(InputError, match="'n_train' \\+ 'n_valid' must be at most the number of documents, 10"):
        pretraining_data(gpt2_tokenizer, wiki_documents.select(range(10)), n_train=50, n_valid=50)


def test_recipe_data_wants_a_pretraining_recipe(gpt2_tokenizer) -> None:
    with pytest.raises(InputError, match="'config' must be a PretrainConfig \\(got {'n_train_chunks': 4} that is a dict\\)"):
        recipe_data({"n_train_chunks": 4}, gpt2_tokenizer)  # type: ignore[arg-type]


def test_zero_chunks_after_chunking(gpt2_tokenizer) -> None:
    short = datasets.Dataset.from_list([{"title": str(i), "text": "A short text."} for i in range(4)])
    with pytest.raises(InputError, match="'context_length' 128 gives 0 chunks from the 2 train documents"):
        pretraining_data(gpt2_tokenizer, short, n_train=2, n_valid=2)


def test_tokenizer_and_model_vocabularies_disagree(gpt2_tokenizer, bert_tokenizer) -> None:
    bert_sized = gpt2_from_scratch(bert_tokenizer, preset="gpt2-tiny-cpu")
    with pytest.raises(ModelError, match="vocabulary of 30522 but 'tokenizer' 'gpt2' has 50257"):
        check_model_fits(bert_sized, gpt2_tokenizer, 128)
    with pytest.raises(ModelError, match="vocabulary of 30522"):
        pretrain_default(tokenizer=gpt2_tokenizer, model=bert_from_scratch(bert_tokenizer, preset="bert-tiny-cpu"), **SMALL)


def test_context_longer_than_the_model_positions(gpt2_tokenizer) -> None:
    short = gpt2_from_scratch(gpt2_tokenizer, preset=dict(n_layer=1, n_head=2, n_embd=32, n_positions=64))
    with pytest.raises(ModelError, match="'context_length' 128 is above the model's 64 positions"):
        check_model_fits(short, gpt2_tokenizer, 128)


def test_memorizes_needs_rows_long_enough(model, batch) -> None:
    with pytest.raises(InputError, match=r"'prefix_length' 32 \+ 'continuation_length' 32 must be at most the chunk length of 'chunks', 32 tokens"):
        memorizes(model, None, batch)  # 32-token rows, 32 + 32 asked


def test_expect_frozen_must_name_parameters(model, batch) -> None:
    with pytest.raises(InputError, match="'expect_frozen' must name parameters"):
        gradient_flow(model, batch, expect_frozen=["no.such.weight"])


# ------------------------------------------------------------------ memorization lengths


def test_a_prefix_and_continuation_longer_than_the_chunks_are_refused(model, batch, clean) -> None:
    """32 + 32 asked of 32-token chunks: nothing would be compared and an untrained model would
    count as memorized (the loop once stopped at step 5 with loss 10.25), so both refuse it."""
    message = (r"'prefix_length' 32 \+ 'continuation_length' 32 must be at most the chunk length"
               r"( of 'input_ids')?, 32 tokens \(got 64\)")
    with pytest.raises(InputError, match=message):
        pretrain(model, clean.tokenizer, clean.data.train, clean.data.valid, max_steps=5, max_epochs=None)
    with pytest.raises(InputError, match=message):
        memorized_fraction(model, batch)
    with pytest.raises(InputError, match=r"'prefix_length' 8 \+ 'continuation_length' 32 .* \(got 40\)"):
        memorized_fraction(model, batch, prefix_length=8, continuation_length=32)  # once a bare RuntimeError
    assert memorized_fraction(model, batch, prefix_length=8, continuation_length=24) == 0.0  # untrained


# ------------------------------------------------------------------ eval mode restored


@pytest.mark.parametrize("helper", [
    lambda model, ids: mean_loss(model, [{"input_ids": ids, "labels": ids}]),
    lambda model, ids: memorized_fraction(model, ids, prefix_length=8, continuation_length=24),
], ids=["mean_loss", "memorized_fraction"])
def test_a_failing_forward_leaves_the_model_in_training_mode(helper, model, batch) -> None:
    """The helpers switch to eval mode; an exception inside must not leave the user's model there."""
    def fail(module, args, output):
        raise RuntimeError("planted failure")

    model.transformer.wte.register_forward_hook(fail)
    model.train()
    with pytest.raises(RuntimeError, match="planted failure"):
        helper(model, batch)
    assert model.training


# ------------------------------------------------------------------ 4-D attention masks


def _causal(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()  # (T, T), True on and below the diagonal


_T = 8
_BLOCKED = torch.finfo(torch.float32).min


@pytest.mark.parametrize(("mask", "passes"), [
    (_causal(_T).long(), True),
    (torch.ones(_T, _T, dtype=torch.long), False),
    (_causal(_T), True),
    (torch.ones(_T, _T, dtype=torch.bool), False),
    (torch.zeros(_T, _T).masked_fill(~_causal(_T), _BLOCKED), True),
    (torch.zeros(_T, _T), False),
], ids=["int-causal", "int-leaking", "bool-causal", "bool-leaking", "float-additive-causal",
        "float-additive-leaking"])
def test_causal_batch_reads_each_kind_of_4d_mask(mask: torch.Tensor, passes: bool) -> None:
    """Bool and int masks: nonzero = attend; float masks are additive: 0 = attend, very negative = blocked."""
    ids = torch.arange(2 * _T).reshape(2, _T)  # (B, T)
    result = causal_batch({"input_ids": ids, "labels": ids.clone(),
                           "attention_mask": mask.expand(2, 1, _T, _T)})  # (B, 1, T, T)
    assert bool(result) is passes, result.explanation
    if not passes:
        assert "lets row 0, position 0 attend to later position 1" in result.explanation


# ------------------------------------------------------------------ misuse names the argument


@pytest.fixture(scope="module")
def misuse(gpt2_tokenizer, clean: PretrainRun) -> SimpleNamespace:
    """An untrained model and the small run's chunks: every call below must refuse before using them."""
    train = clean.data.train
    return SimpleNamespace(model=gpt2_from_scratch(gpt2_tokenizer, preset="gpt2-tiny-cpu"), tokenizer=gpt2_tokenizer,
                           train=train, valid=clean.data.valid, ids=torch.tensor(train["input_ids"]))


def _above_vocab(ids: torch.Tensor) -> torch.Tensor:
    ids = ids.clone()
    ids[1, 5] = 50257
    return ids


MISUSE: list[tuple[str, Callable[[Any], object], str]] = [
    ("pretrain-empty-train", lambda c: pretrain(c.model, c.tokenizer, c.train.select([]), c.valid),
     r"'train' must be a non-empty datasets.Dataset of chunks .*\(got "),
    ("pretrain-empty-valid", lambda c: pretrain(c.model, c.tokenizer, c.train, c.valid.select([])),
     r"'valid' must be a non-empty datasets.Dataset of chunks .*\(got "),
    ("pretrain-eval-every-0", lambda c: pretrain(c.model, c.tokenizer, c.train, c.valid, eval_every=0),
     r"'eval_every' must be an int >= 1 \(got 0 that is an int\)"),
    ("pretrain-batch-size-0", lambda c: pretrain(c.model, c.tokenizer, c.train, c.valid, batch_size=0),
     r"'batch_size' must be an int >= 1 \(got 0 that is an int\)"),
    ("memorizes-batch-size-0", lambda c: memorizes(c.model, None, c.ids, prefix_length=8, continuation_length=8,
                                                   batch_size=0),
     r"'batch_size' must be an int >= 1 \(got 0"),
    ("memorizes-min-verbatim-rate-2", lambda c: memorizes(c.model, None, c.ids, prefix_length=8,
                                                          continuation_length=8, min_verbatim_rate=2.0),
     r"'min_verbatim_rate' must be a number from 0 to 1 \(got 2.0 that is a float\)"),
    ("loss-at-init-batch-size-0", lambda c: loss_at_init(c.model, c.ids, batch_size=0),
     r"'batch_size' must be an int >= 1 \(got 0"),
    ("loss-at-init-id-above-vocab", lambda c: loss_at_init(c.model, _above_vocab(c.ids)),
     r"'input_ids' must hold token ids from 0 to 50256, the model's vocabulary of 50,257 \(got id 50257 at row 1, position \d+\)"),
    ("params-update-list", lambda c: params_update(c.model, [[1, 2, 3]]),
     r"'batch' must be a \(B, T\) tensor of token ids or a mapping .* \(got \[\[1, 2, 3\]\] that is a list\)"),
    ("gradient-flow-str", lambda c: gradient_flow(c.model, "some text"),
     r"'batch' must be a \(B, T\) tensor .* \(got 'some text' that is a str\)"),
    ("causal-batch-tensor", lambda c: causal_batch(c.ids),
     r"'batch' must be a mapping of tensors with 'input_ids' and 'labels'.* \(got a torch.int64 tensor of shape \(\d+, \d+\) on cpu\)"),
    ("loss-decreases-window-0", lambda c: loss_decreases(LossCurve(), window=0),
     r"'window' must be an int >= 1 \(got 0"),
    ("generalization-gap-window-0", lambda c: generalization_gap(LossCurve(), window=0),
     r"'window' must be an int >= 1 \(got 0"),
    ("loss-decreases-list", lambda c: loss_decreases([10.0, 5.0]),
     r"'curve' must be a LossCurve .*\(got \[10.0, 5.0\] that is a list\)"),
    ("overfits-dict", lambda c: overfits({"train": []}), r"'curve' must be a LossCurve .*that is a dict\)"),
    ("generalization-gap-none", lambda c: generalization_gap(None), r"'curve' must be a LossCurve .*that is a NoneType\)"),
    ("finite-loss-list", lambda c: finite_loss([1.0]), r"'curve' must be a LossCurve .*that is a list\)"),
    ("reproducible-second-list", lambda c: reproducible(LossCurve(), [1.0]),
     r"'second' must be a LossCurve .*that is a list\)"),
    ("reproducible-steps-0", lambda c: reproducible(LossCurve(), LossCurve(), steps=0),
     r"'steps' must be an int >= 1 \(got 0"),
]


@pytest.mark.parametrize(("call", "message"), [case[1:] for case in MISUSE], ids=[case[0] for case in MISUSE])
def test_misuse_names_the_argument_expected_and_got(misuse, call, message) -> None:
    """Each misuse raises InputError naming the argument, what was expected and what came."""
    with pytest.raises(InputError, match=message):
        call(misuse)


# ------------------------------------------------------------------ recipes are checked first


@pytest.mark.parametrize(("overrides", "message"), [
    ({"lrr": 1e-3}, r"'lrr' is not a setting of PretrainConfig; the settings are context_length, "),
    ({"lr": "fast"}, r"'lr' must be a finite number >= 0 \(got 'fast' that is a str\)"),
    ({"max_steps": 3}, r"exactly one of 'max_steps' and 'max_epochs' must be set"),
    ({"betas": (0.9, 1.5)}, r"'betas' must be a finite number from 0 to 0.9999 \(got 1.5"),
    ({"decay": "cosine"}, r"'decay' must be one of 'constant', 'linear' \(got 'cosine'"),
    ({"eval_every": "weekly"}, r"'eval_every' must be an int >= 1 \(got 'weekly'"),
    ({"backend": "jax"}, r"'backend' must be one of 'lean', 'trainer' \(got 'jax'"),
])
def test_a_bad_setting_fails_before_any_work(overrides, message, monkeypatch) -> None:
    """A misspelt or mistyped setting names itself before the documents are read or a model built."""
    def no_work(*args, **kwargs):
        raise AssertionError("the documents were read before the settings were checked")

    monkeypatch.setattr("lmcheck.loops.pretraining.pretraining_data", no_work)
    with pytest.raises(InputError, match=message):
        pretrain_default(**overrides)


def test_presets_are_complete_instances() -> None:
    """The GPU preset inherits nothing from the CPU one: every field is its own, and it names
    'once per epoch' instead of a hidden ceil(2266 / 32)."""
    gpu = PRETRAIN_GPU
    assert (gpu.preset, gpu.backend, gpu.max_steps, gpu.max_epochs) == ("gpt2", "trainer", None, 100)
    assert gpu.every(gpu.eval_every, 2266) == 71 == gpu.every(gpu.memorization_every, 2266)
    assert PRETRAIN_CPU.steps_for(49) == 20 * 13  # 20 epochs of 13 batches of at most 4
    with pytest.raises(TypeError, match="missing"):
        PretrainConfig(lr=1e-3)  # a recipe is complete or it is not a recipe
    assert MASKED_CPU.replace(steps=10).steps == 10
    with pytest.raises(InputError, match="'stepz' is not a setting of MaskedRunConfig"):
        MASKED_CPU.replace(stepz=10)
    for config in (MASKED_CPU, PRETRAIN_CPU):  # both recipes check their optimizer's settings alike
        with pytest.raises(InputError, match="'betas' must be a pair"):
            config.replace(betas=0.9)
        with pytest.raises(InputError, match="'betas'"):
            config.replace(betas=(0.9, 1.5))
        with pytest.raises(InputError, match="'embedding_lr'"):
            config.replace(embedding_lr=-1.0)


# ---------------------------------------------------------------- what a batch supervises


@pytest.fixture(scope="module")
def tokenizer_with_own_pad(gpt2_tokenizer):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def _examples(tokenizer) -> list[dict[str, list[int]]]:
    """Documents of different lengths, each ending with eos, as a pretraining dataset holds them."""
    texts = ["The capital of France is Paris.", "Swimming at the beach is a great way to relax in summer.",
             "Hello."]
    return [{"input_ids": tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]} for t in texts]


def test_a_healthy_collator_supervises_every_real_token(tokenizer_with_own_pad):
    collate = DataCollatorForLanguageModeling(tokenizer_with_own_pad, mlm=False)
    result = lmcheck.batch_supervision(collate(_examples(tokenizer_with_own_pad)), tokenizer_with_own_pad)
    assert result, result.explanation
    assert result.metrics["supervised_fraction"] == 1.0


def test_padding_with_eos_hides_the_real_eos(gpt2_tokenizer_with_pad):
    """transformers #23530: pad = eos, so the collator labels every eos -100, the real ones too."""
    collate = DataCollatorForLanguageModeling(gpt2_tokenizer_with_pad, mlm=False)
    result = lmcheck.batch_supervision(collate(_examples(gpt2_tokenizer_with_pad)), gpt2_tokenizer_with_pad)
    assert not result
    assert "3 real end-of-sequence token(s) are not supervised (first: row 0, position 7)" in result.explanation


def test_a_row_with_nothing_supervised_is_named(tokenizer_with_own_pad):
    """trl #598: a completion-only collator that never finds its template labels a row all -100."""
    batch = DataCollatorForLanguageModeling(tokenizer_with_own_pad, mlm=False)(_examples(tokenizer_with_own_pad))
    batch["labels"][2] = -100
    result = lmcheck.batch_supervision(batch, tokenizer_with_own_pad)
    assert not result
    assert "1 of 3 rows supervise no token (first: row 2)" in result.explanation


def test_supervised_pads_a_doubled_bos_and_aliased_labels_are_named(tokenizer_with_own_pad):
    tokenizer = tokenizer_with_own_pad
    ids = torch.tensor([[tokenizer.bos_token_id, tokenizer.bos_token_id, 464, 3139],
                        [tokenizer.pad_token_id, 464, 3139, 318]])
    mask = (ids != tokenizer.pad_token_id).long()
    result = lmcheck.batch_supervision({"input_ids": ids, "labels": ids, "attention_mask": mask}, tokenizer)
    assert not result
    assert "labels share memory with input_ids" in result.explanation
    assert "1 pad position(s) are supervised (first: row 1, position 0)" in result.explanation
    assert "1 row(s) start with two BOS tokens (first: row 0)" in result.explanation
