"""Before the first update, an RL step's importance ratio is 1: ``lmcheck.rl``.

A tiny random Llama samples four completions at temperature 0.7. A training side that divides
its logits by the sampling temperature passes; one that takes its log-probs at temperature 1,
or over the full distribution while the sampler truncates it to the top-p nucleus, fails with
the cause named. A random Llama's next-token distribution is nearly flat over its 300 tokens,
so a nucleus of 0.9 leaves out a tenth of the mass at every step. TRL's ``GRPOTrainer`` passes
as it is built, and fails where its sampler and its log-probs part.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import stacks
import torch

from lmcheck.errors import InputError
from lmcheck.rl import importance_ratio, trainer_importance_ratio

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tok():
    return stacks.chat_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return stacks.llama(tok)


@pytest.fixture(scope="module")
def prompts(tok):
    batch = tok(stacks.sentences(4), padding=True, padding_side="left", return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]  # (4, T) each, left-padded


def logprobs_at(model: torch.nn.Module, temperature: float, *, nan_at: tuple[int, int] | None = None) -> Any:
    """A training side: one forward over the sequences, the logits divided by ``temperature``,
    the log-prob of each completion token (``nan_at``: a NaN put at that row and position)."""
    def logprobs(sequences: torch.Tensor, attention_mask: torch.Tensor, completion_length: int) -> torch.Tensor:
        logits = model(input_ids=sequences, attention_mask=attention_mask).logits  # (B, T + C, V)
        logits = logits[:, -completion_length - 1 : -1].float()  # (B, C, V) the positions predicting the completion
        chosen = torch.log_softmax(logits / temperature, -1).gather(-1, sequences[:, -completion_length:, None])
        chosen = chosen.squeeze(-1)  # (B, C)
        if nan_at is not None:
            chosen[nan_at] = math.nan
        return chosen
    return logprobs


def test_tempered_logprobs_pass(model, prompts):
    """Log-probs of the logits divided by the sampling temperature give a ratio of 1 at every
    token; the probe is seeded, and puts back the model's mode and torch's random state."""
    ids, mask = prompts
    state = torch.get_rng_state()
    result = importance_ratio(model, ids, logprobs_at(model, TEMPERATURE), attention_mask=mask,
                              temperature=TEMPERATURE)
    assert result, result.explanation
    assert result.metrics["tokens"] > 0
    assert result.metrics["max_abs_log_ratio"] <= 1e-3
    assert result.metrics["mean_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert model.training, "the model's training mode is put back"
    assert torch.equal(torch.get_rng_state(), state), "torch's random state is put back"
    again = importance_ratio(model, ids, logprobs_at(model, TEMPERATURE), attention_mask=mask,
                             temperature=TEMPERATURE)
    assert again.metrics == result.metrics, "the same seed samples the same completions"


def test_logprobs_at_temperature_one_fail(model, prompts):
    """Sampling at 0.7 and taking the log-probs at temperature 1 (trl #4159) fails, naming both
    temperatures and where the worst token is."""
    ids, mask = prompts
    result = importance_ratio(model, ids, logprobs_at(model, 1.0), attention_mask=mask, temperature=TEMPERATURE)
    assert not result
    assert result.metrics["max_abs_log_ratio"] > 1e-3
    assert "the model's at temperature 1.0, the sampler's at 0.7" in result.explanation
    assert "trl #4159" in result.explanation
    assert f"row {result.metrics['worst_row']}, completion position {result.metrics['worst_position']}" \
        in result.explanation


@pytest.mark.parametrize(("setting", "named"), [({"top_p": 0.9}, "top-p=0.9 nucleus"),
                                                ({"top_k": 20}, "top-k=20 most likely tokens")],
                         ids=["top-p", "top-k"])
def test_full_distribution_under_truncated_sampling_fails(model, prompts, setting, named):
    """A sampler that truncates the distribution, with log-probs of the whole tempered one,
    fails: every ratio is the kept mass, below 1 (trl #6789)."""
    ids, mask = prompts
    result = importance_ratio(model, ids, logprobs_at(model, TEMPERATURE), attention_mask=mask,
                              temperature=TEMPERATURE, **setting)
    assert not result
    assert result.metrics["max_ratio"] < 1 - 1e-3, "the truncation leaves mass out at every token"
    assert named in result.explanation
    assert "trl #6789" in result.explanation


def test_nan_logprobs_fail_saying_where(model, prompts):
    """A NaN among the training side's log-probs fails the check (NaN > tol is False, so a
    comparison alone would pass it), naming its row and completion position."""
    ids, mask = prompts
    result = importance_ratio(model, ids, logprobs_at(model, TEMPERATURE, nan_at=(1, 2)), attention_mask=mask,
                              temperature=TEMPERATURE)
    assert not result
    assert result.status == "fail"
    assert result.metrics["non_finite"] is True
    assert "nan at row 1, completion position 2" in result.explanation


@pytest.mark.parametrize(("arguments", "named"), [
    ({"temperature": 0}, "'temperature'"),
    ({"top_p": 0.0}, "'top_p'"),
    ({"top_k": -1}, "'top_k'"),
    ({"tol": math.nan}, "'tol'"),
    ({"prompt_ids": "the cat sat"}, "'prompt_ids'"),
    ({"logprobs": "not a function"}, "'logprobs'"),
], ids=["temperature-0", "top-p-0", "top-k-negative", "tol-nan", "prompt-ids-str", "logprobs-str"])
def test_bad_input_raises_naming_the_argument(model, prompts, arguments, named):
    """Misuse raises InputError whose message names the argument."""
    ids, mask = prompts
    call: dict[str, Any] = {"prompt_ids": ids, "logprobs": logprobs_at(model, 1.0), "attention_mask": mask}
    call.update(arguments)
    with pytest.raises(InputError, match=named):
        importance_ratio(model, call.pop("prompt_ids"), call.pop("logprobs"), **call)


def test_logprobs_of_the_wrong_shape_raise(model, prompts):
    """A training side that returns the full (B, C, V) log-probs, not the chosen tokens',
    raises InputError saying the shape it must return."""
    ids, mask = prompts

    def every_token(sequences: torch.Tensor, attention_mask: torch.Tensor, completion_length: int) -> torch.Tensor:
        return torch.log_softmax(model(input_ids=sequences).logits[:, -completion_length:], -1)

    with pytest.raises(InputError, match=r"'logprobs' must return a \(4, \d+\) float tensor"):
        importance_ratio(model, ids, every_token, attention_mask=mask, max_new_tokens=8)


# ---------------------------------------------------------------- TRL's GRPOTrainer


def reward_length(completions: list[Any], **_: Any) -> list[float]:
    return [float(len(c)) for c in completions]


def grpo(tmp_path: Any, *, model: torch.nn.Module | None = None, **options: Any) -> Any:
    """A tiny GRPOTrainer on eight plain-text prompts, sampling at temperature 0.7, in fp32
    (GRPOConfig's default bf16 would put the update under bf16 autocast)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tok = stacks.chat_tokenizer()
    settings: dict[str, Any] = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, temperature=TEMPERATURE, max_steps=2, bf16=False, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0)
    settings.update(options)
    data = datasets.Dataset.from_list([{"prompt": text} for text in stacks.sentences(8)])
    return trl.GRPOTrainer(model=model if model is not None else stacks.llama(tok), reward_funcs=reward_length,
                           args=trl.GRPOConfig(**settings), train_dataset=data, processing_class=tok)


def test_grpo_trainer_passes(tmp_path):
    """GRPOTrainer's log-probs (the logits divided by its temperature in its fused LM head) equal
    its sampler's at temperature 0.7, and the check puts the model's mode back."""
    trainer = grpo(tmp_path)
    trainer.model.eval()
    result = trainer_importance_ratio(trainer)
    assert result, result.explanation
    assert result.metrics["tokens"] > 0
    assert result.threshold == 1e-3, "an fp32 update is held to the fp32 bound"
    assert not trainer.model.training


def test_grpo_update_at_temperature_one_fails(tmp_path):
    """The update's log-probs at temperature 1 under a sampler at 0.7 (trl #4159, trl PR #3029)
    fails naming both temperatures. Built at temperature 1 with the sampler's generation_config
    then set to 0.7: setting ``trainer.temperature`` after construction changes nothing in trl
    1.16, whose fused LM head keeps the temperature it was built with."""
    trainer = grpo(tmp_path, temperature=1.0)
    trainer.generation_config.temperature = TEMPERATURE
    result = trainer_importance_ratio(trainer)
    assert not result
    assert "the model's at temperature 1.0, the sampler's at 0.7" in result.explanation
    assert "trl #4159" in result.explanation


def test_grpo_top_p_fails(tmp_path):
    """GRPOConfig(top_p=0.9) fails naming top-p: TRL's own behaviour, its sampler draws from the
    nucleus while its log-probs are the full tempered distribution's (trl #6789)."""
    result = trainer_importance_ratio(grpo(tmp_path, top_p=0.9))
    assert not result
    assert result.metrics["max_ratio"] < 1 - 1e-3
    assert "top-p=0.9 nucleus" in result.explanation
    assert "trl #6789" in result.explanation


def test_grpo_at_its_default_bf16_passes_healthy_and_fails_top_p(tmp_path):
    """Under GRPOConfig's default bf16 the update runs under autocast, and its log-probs round
    token by token within the bf16 bound; a top-p of 0.9 hides in that bound token by token
    but moves every token the same way, so it still fails."""
    healthy = trainer_importance_ratio(grpo(tmp_path, bf16=True))
    assert healthy, healthy.explanation
    assert healthy.threshold == 0.5
    biased = trainer_importance_ratio(grpo(tmp_path, bf16=True, top_p=0.9))
    assert not biased
    assert "is within the 0.5 of half precision" in biased.explanation
    assert "trl #6789" in biased.explanation


def test_grpo_min_p_of_the_model_fails(tmp_path, tok):
    """A min-p in the model's own generation config reaches GRPO's sampler (TRL leaves min_p
    None in its GenerationConfig, and transformers fills it from the model's), while TRL's
    log-probs ignore it: the check fails naming min-p."""
    model = stacks.llama(tok)
    model.generation_config.min_p = 0.5
    result = trainer_importance_ratio(grpo(tmp_path, model=model))
    assert not result
    assert "min-p=0.5" in result.explanation
    assert "trl #6789" in result.explanation


def test_grpo_with_vllm_is_not_applicable(tmp_path):
    """A trainer that samples with vLLM is not checked with transformers' generate: n/a, saying so."""
    trainer = grpo(tmp_path)
    trainer.use_vllm = True
    result = trainer_importance_ratio(trainer)
    assert result.status == "n/a"
    assert "vLLM" in result.skip_reason


def test_not_a_grpo_trainer_is_not_applicable():
    """Something that is not a GRPO-style trainer is n/a, naming what it lacks."""
    pytest.importorskip("trl")
    result = trainer_importance_ratio(object())
    assert result.status == "n/a"
    assert "_get_per_token_logps_and_entropies" in result.skip_reason


# ---------------------------------------------------------------- through check_trainer


def test_check_trainer_on_grpo_judges_the_ratio_and_says_why_the_rest_do_not_apply(tmp_path):
    """An RL trainer is a first-class setup: check_trainer judges its importance ratio and
    marks every other row n/a with the reason; a healthy GRPO run passes."""
    from lmcheck.setup import SETUP_CHECKS, check_trainer

    report = check_trainer(grpo(tmp_path))
    assert [r.name for r in report] == list(SETUP_CHECKS)
    assert report["importance_ratio"].status == "pass", report["importance_ratio"].explanation
    others = {r.status for r in report if r.name != "importance_ratio"}
    assert others == {"n/a"}
    assert "its completions are sampled inside its step" in report["gradient_flow"].explanation
    assert report.passed
    assert report.setup["kind"] == "TRL GRPOTrainer"


def test_check_trainer_on_grpo_at_the_wrong_temperature_fails(tmp_path):
    from lmcheck.setup import check_trainer

    trainer = grpo(tmp_path, temperature=1.0)
    trainer.generation_config.temperature = TEMPERATURE
    report = check_trainer(trainer)
    assert not report.passed
    assert report.failures()[0].name == "importance_ratio"
    assert "trl #4159" in report.failures()[0].explanation
