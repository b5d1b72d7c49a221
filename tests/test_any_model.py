"""Any model, not only Hugging Face's: the probes on plain PyTorch LMs, as-is or adapted.

Three ways in. A Hugging Face model is called as ``transformers`` calls it. A plain module whose
``forward`` takes ids and returns logits (here :class:`RotaryLM`) is recognised without any
wrapping. Anything else (here nanoGPT's GPT, which returns only the last position's logits
unless it is given targets) is wrapped once with ``lmcheck.adapt``. Every probe then runs
unchanged; a probe that needs what the model lacks (a mask argument, a KV cache, ``generate``)
says so as "not applicable", never as a pass. Each family has broken twins, and each twin is
caught by the probe meant for it, with an explanation that says where.
"""

from __future__ import annotations

import pytest
import torch

import lmcheck
import lmcheck.adapters
import lmcheck.decoding
import lmcheck.models
import lmcheck.training
from lmcheck.errors import ModelError, NotApplicableError
from tests.plain_models import (
    NanoGPT,
    RotaryLM,
    mean_over_every_label,
    mean_over_unshifted_count,
    nanogpt_logits,
    nanogpt_loss,
    reference_loss_by_hand,
)

PROMPTS = ["Swimming at the beach is", "The capital of France is", "def fibonacci(n):"]


def adapted_nanogpt(fault: str | None = None, *, shift: int = 1) -> lmcheck.adapters.AdaptedLM:
    gpt = NanoGPT(fault=fault).eval()
    return lmcheck.adapt(gpt, logits=nanogpt_logits(gpt), loss=nanogpt_loss(gpt, shift=shift))


@pytest.fixture(scope="module")
def nanogpt() -> lmcheck.adapters.AdaptedLM:
    return adapted_nanogpt()


@pytest.fixture(scope="module")
def rotary() -> RotaryLM:
    return RotaryLM().eval()


@pytest.fixture(scope="module")
def tiny_gpt2(gpt2_tokenizer_with_pad):
    return lmcheck.models.gpt2_from_scratch(gpt2_tokenizer_with_pad, preset="gpt2-tiny-cpu").eval()


@pytest.fixture(scope="module")
def ids(gpt2_tokenizer) -> torch.Tensor:
    return torch.tensor([gpt2_tokenizer("Swimming at the beach is a great way to relax")["input_ids"]])


@pytest.fixture(scope="module")
def batch(gpt2_tokenizer) -> torch.Tensor:
    rows = [gpt2_tokenizer(text)["input_ids"][:5] for text in PROMPTS]
    return torch.tensor(rows)  # (3, 5)


# ---------------------------------------------------------------- the three ways in


def test_a_nanogpt_forward_gets_one_error_that_says_what_to_write(ids):
    """nanoGPT without targets returns (B, 1, V): lmcheck names the shape and the adapt call."""
    with pytest.raises(ModelError) as caught:
        lmcheck.decoding.greedy_decode(NanoGPT().eval(), ids, max_new_tokens=2)
    message = str(caught.value)
    assert f"(1, 1, 50257) for input ids of shape (1, {ids.shape[1]})" in message
    assert "the last position's only" in message
    assert "lmcheck.adapt(model, logits=lambda ids: model(ids, ids)[0]" not in message  # a hint, not code
    assert "logits=lambda ids: model(ids, ids)[0]" in message


def test_a_forward_that_cannot_take_ids_gets_a_model_error_not_a_traceback(ids):
    """A calling-convention mismatch is reported by lmcheck, with the user's error kept as the cause."""

    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(100, 4)

        def forward(self, tokens: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
            return self.embed(tokens + segments)

    with pytest.raises(ModelError, match=r"called model\(ids\) .* raised TypeError: .*segments.*"
                                         r"lmcheck\.adapt") as caught:
        lmcheck.causality(TwoInputs(), ids % 100)
    assert isinstance(caught.value.__cause__, TypeError)


def test_a_forward_that_returns_no_logits_is_named(ids):
    class Strings(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids: torch.Tensor) -> str:
            return "logits"

    with pytest.raises(ModelError, match="returned 'logits'"):
        lmcheck.decoding.greedy_decode(Strings(), ids, max_new_tokens=1)


def test_a_hugging_face_model_works_through_adapt_too(tiny_gpt2, ids):
    """adapt is the way in for anything: the same probes through user-written functions."""
    model = lmcheck.adapt(tiny_gpt2, logits=lambda i, m: tiny_gpt2(input_ids=i, attention_mask=m).logits,
                          loss=lambda b: tiny_gpt2(input_ids=b["input_ids"], labels=b["labels"]).loss)
    for result in (lmcheck.causality(model, ids[:, :8]), lmcheck.loss_matches_reference(model, ids),
                   lmcheck.gradient_flow(model, ids)):
        assert result, result.explanation
    direct = lmcheck.decoding.greedy_decode(tiny_gpt2, ids, max_new_tokens=4, use_cache=False)
    adapted = lmcheck.decoding.greedy_decode(model, ids, max_new_tokens=4)
    assert torch.equal(direct.sequences, adapted.sequences)
    assert not adapted.cache_used  # an adapted model re-feeds the whole sequence


# ---------------------------------------------------------------- healthy models pass


PROBES = {
    "causality": lambda m, t, ids, batch: lmcheck.causality(m, ids[:, :10]),
    "loss_at_init": lambda m, t, ids, batch: lmcheck.loss_at_init(m, batch),
    "gradient_flow": lambda m, t, ids, batch: lmcheck.gradient_flow(m, batch),
    "params_update": lambda m, t, ids, batch: lmcheck.params_update(m, batch),
    "loss_matches_reference": lambda m, t, ids, batch: lmcheck.loss_matches_reference(m, batch),
    "padding_invariance": lambda m, t, ids, batch: lmcheck.padding_invariance(m, t, PROMPTS),
    "batch_invariance": lambda m, t, ids, batch: lmcheck.batch_invariance(m, t, PROMPTS),
    "kv_cache_matches_full": lambda m, t, ids, batch: lmcheck.kv_cache_matches_full(m, ids),
    "greedy_matches_generate": lambda m, t, ids, batch: lmcheck.greedy_matches_generate(m, t, PROMPTS),
}
NOT_APPLICABLE = {  # what each family lacks, and the words of the reason
    "nanogpt": {"padding_invariance": "attention mask", "batch_invariance": "attention mask",
                "kv_cache_matches_full": "KV cache", "greedy_matches_generate": "generate()"},
    "rotary": {"loss_matches_reference": "no loss of its own", "kv_cache_matches_full": "KV cache",
               "greedy_matches_generate": "generate()"},
}


@pytest.mark.parametrize("family", sorted(NOT_APPLICABLE))
@pytest.mark.parametrize("probe", sorted(PROBES))
def test_a_healthy_plain_model_passes_every_applicable_probe(family, probe, request, gpt2_tokenizer_with_pad,
                                                             ids, batch):
    model = request.getfixturevalue(family)
    result = PROBES[probe](model, gpt2_tokenizer_with_pad, ids, batch)
    reason = NOT_APPLICABLE[family].get(probe)
    if reason is None:
        assert result.status == "pass", result.explanation
    else:
        assert result.status == "n/a", result.explanation
        assert not result.passed
        assert reason in result.skip_reason
        assert result.to_dict()["status"] == "n/a"


def test_memorization_and_decoding_run_on_a_plain_module(rotary, batch):
    """memorized_fraction (teacher-forced) and memorizes (greedy) agree on an untrained model."""
    fraction = lmcheck.training.memorized_fraction(rotary, batch, prefix_length=2, continuation_length=3)
    result = lmcheck.memorizes(rotary, None, batch, prefix_length=2, continuation_length=3)
    assert fraction == result.metrics["verbatim_rate"] == 0.0
    assert not result


def test_a_plain_module_without_a_mask_cannot_decode_a_padded_batch(nanogpt, ids):
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with pytest.raises(NotApplicableError, match="takes no attention mask"):
        lmcheck.decoding.greedy_decode(nanogpt, padded, attention_mask=mask, max_new_tokens=1)
    # an all-ones mask carries nothing to skip: it is dropped, nothing is lost
    assert lmcheck.decoding.greedy_decode(nanogpt, ids, attention_mask=torch.ones_like(ids), max_new_tokens=1)


# ---------------------------------------------------------------- broken twins are caught


@pytest.mark.parametrize("family", ["nanogpt", "rotary"])
def test_a_future_leak_fails_causality(family, ids):
    model = adapted_nanogpt("future_leak") if family == "nanogpt" else RotaryLM(fault="future_leak").eval()
    result = lmcheck.causality(model, ids[:, :10])
    assert not result
    assert result.explanation.startswith("position 0 of 10 sees the future")


@pytest.mark.parametrize("family", ["nanogpt", "rotary"])
def test_a_cut_gradient_path_fails_gradient_flow(family, batch):
    model = adapted_nanogpt("cut_gradient") if family == "nanogpt" else RotaryLM(fault="cut_gradient").eval()
    result = lmcheck.gradient_flow(model, batch)
    assert not result
    first_block = "module.transformer.h.0." if family == "nanogpt" else "blocks.0."
    assert f"{first_block}" in result.explanation
    assert "gets no gradient" in result.explanation
    # the params_update twin: the parameters behind the cut never move
    update = lmcheck.params_update(model, batch)
    assert not update
    assert first_block in update.explanation


def test_a_mask_taken_but_not_applied_fails_both_invariances(gpt2_tokenizer_with_pad):
    """A forward that accepts attention_mask and ignores it lets a prompt attend to its pads."""
    model = RotaryLM(fault="attends_to_pads").eval()
    padded = lmcheck.padding_invariance(model, gpt2_tokenizer_with_pad, PROMPTS[:1])
    assert not padded
    assert padded.explanation.startswith("prompt 0 with 8 left pads: logits differ")
    batched = lmcheck.batch_invariance(model, gpt2_tokenizer_with_pad, PROMPTS)
    assert not batched
    assert "in a left-padded batch of 3" in batched.explanation


@pytest.mark.parametrize(("shift", "cause"), [(0, "without the shift (transformers #27517)"),
                                              (2, "shifted twice")])
def test_a_wrongly_shifted_loss_fails_loss_matches_reference(shift, cause, batch):
    result = lmcheck.loss_matches_reference(adapted_nanogpt(shift=shift), batch)
    assert not result
    assert cause in result.explanation


def test_a_loss_over_the_wrong_token_count_fails_loss_matches_reference(rotary, batch):
    """Averaged over every label position, -100s included, the loss is too small (#46204)."""
    labels = batch.clone()
    labels[:, 3:] = -100  # a completion-only batch: only the first tokens are supervised
    data = {"input_ids": batch, "labels": labels}
    wrong = lmcheck.adapt(rotary, logits=lambda i: rotary(i), loss=mean_over_every_label(rotary))
    result = lmcheck.loss_matches_reference(wrong, data)
    assert not result
    assert "divided by every label position" in result.explanation
    right = lmcheck.adapt(rotary, logits=lambda i: rotary(i), loss=reference_loss_by_hand(rotary))
    assert lmcheck.loss_matches_reference(right, data)


def test_a_token_count_taken_before_the_shift_fails_loss_matches_reference(rotary, batch):
    """Counting label position 0, which the shift drops, scales every loss by (T-1)/T (#46204)."""
    wrong = lmcheck.adapt(rotary, logits=lambda i: rotary(i), loss=mean_over_unshifted_count(rotary))
    result = lmcheck.loss_matches_reference(wrong, batch)
    assert not result
    assert "divided by the supervised labels before the shift" in result.explanation
    assert result.metrics["own_loss"] == pytest.approx(result.metrics["reference_loss"] * 4 / 5, rel=1e-5)


def test_training_probes_use_the_models_own_loss(batch):
    """What the user trains with is what gradient_flow differentiates: an unshifted own loss (which
    a model can minimise by copying its input) still gives every parameter a gradient, so only
    loss_matches_reference catches it."""
    unshifted = adapted_nanogpt(shift=0)
    assert lmcheck.gradient_flow(unshifted, batch)
    assert not lmcheck.loss_matches_reference(unshifted, batch)


GLOBAL_GPT = NanoGPT(seed=1).eval()
# written at the top level, as in a script or a notebook: the lambdas reach GLOBAL_GPT as a global
GLOBAL_ADAPTED = lmcheck.adapt(GLOBAL_GPT, logits=lambda ids: GLOBAL_GPT(ids, ids)[0],
                               loss=lambda batch: GLOBAL_GPT(batch["input_ids"][:, :-1],
                                                             batch["labels"][:, 1:].contiguous())[1])


def test_params_update_steps_the_model_itself_and_puts_it_back(batch):
    """The step must move the parameters the functions actually use, then restore them all."""
    before = {n: p.detach().clone() for n, p in GLOBAL_GPT.named_parameters()}
    result = lmcheck.params_update(GLOBAL_ADAPTED, batch)
    assert result, result.explanation
    for name, parameter in GLOBAL_GPT.named_parameters():
        assert torch.equal(parameter, before[name]), name
        assert parameter.grad is None, name
