"""Library tests of lmcheck.causal, lmcheck.invariance and lmcheck.decoding: negative controls
(broken models each probe must catch, with an explanation that locates the problem) and misuse
(each a clear error)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import (
    AttentionInterface,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lmcheck._validate import encode_batch
from lmcheck.causal import causality, greedy_matches_generate, kv_cache_matches_full
from lmcheck.decoding import greedy_decode, next_token_logits
from lmcheck.errors import InputError, ModelError
from lmcheck.invariance import batch_invariance, padding_invariance
from lmcheck.models import bert_from_scratch, gpt2_from_scratch

SmolLM2 = tuple[PreTrainedModel, PreTrainedTokenizerBase]
PROMPT = "Swimming at the beach is"


@pytest.fixture(scope="module")
def tiny_gpt2(gpt2_tokenizer_with_pad: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    """A 2-layer, 128-wide GPT-2 with the full vocabulary and seeded random weights."""
    return gpt2_from_scratch(gpt2_tokenizer_with_pad, preset="gpt2-tiny-cpu").eval()


# --- broken models -----------------------------------------------------------------------------

def _bidirectional_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA attention that drops the causal mask: every position attends to every other."""
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=False, **kwargs)


AttentionInterface.register("lmcheck_bidirectional", _bidirectional_attention)


@contextmanager
def _hooked(model: torch.nn.Module, *, pre: Any = None, post: Any = None) -> Iterator[None]:
    """Break a (shared) model for the length of a block, and mend it afterwards."""
    handles = []
    if pre is not None:
        handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
    if post is not None:
        handles.append(model.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _ignore_attention_mask(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
    """A forward pre-hook: the model never sees the attention mask, so pads are attended to."""
    return args, {**kwargs, "attention_mask": None}


def _corrupt_cache(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
    """A forward hook: the newest key of layer 0 in the returned KV cache is off by 0.05."""
    name = "cache" if "cache" in output else "past_key_values"  # transformers >= 5.24 says cache
    cache = output.get(name)
    if cache is not None:
        cache.layers[0].keys[..., -1, :] += 0.05
    return output


class _NoCache(torch.nn.Module):
    """Wraps a causal LM and returns its logits alone: no KV cache under either name."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=self.inner(**kwargs).logits)


def _tie_top2_on_prompt_pass(module: torch.nn.Module, args: Any, kwargs: dict[str, Any],
                             output: Any) -> Any:
    """A forward hook: on the prompt pass (more than one new token) the two top logits at -1 tie exactly."""
    if kwargs["input_ids"].shape[1] > 1:
        last = output.logits[:, -1]  # (B, V)
        top = last.topk(2, dim=-1).indices  # (B, 2)
        last.scatter_(1, top[:, 1:], last.gather(1, top[:, :1]))
    return output


def _flip_top2_when_padded(amount: float) -> Any:
    """A forward hook: where the mask holds pads, the top logit at -1 drops and the second rises by ``amount``."""
    def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        if (kwargs["attention_mask"] == 0).any():
            last = output.logits[:, -1]  # (B, V)
            top = last.topk(2, dim=-1).indices  # (B, 2)
            last.scatter_add_(1, top, torch.tensor([[-amount, amount]]).expand_as(top).to(last))
        return output
    return hook


def _future_leak(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """A forward hook on the embedding dropout: each position gains 1e-5 x the sum of later ones."""
    later = output.flip(1).cumsum(1).flip(1) - output  # (B, T, D)
    return output + 1e-5 * later


@contextmanager
def _generation_settings(model: PreTrainedModel, **settings: Any) -> Iterator[None]:
    """Temporarily put settings into the model's generation_config, as a Hub checkpoint may."""
    saved = model.generation_config
    model.generation_config = saved.__class__.from_dict({**saved.to_dict(), **settings})
    try:
        yield
    finally:
        model.generation_config = saved


# --- negative controls -------------------------------------------------------------------------

def test_causality_catches_attention_that_sees_the_future(
    tiny_gpt2: GPT2LMHeadModel, gpt2_tokenizer_with_pad: PreTrainedTokenizerBase,
) -> None:
    """A GPT-2 whose attention ignores the causal mask fails at position 0, naming a later input."""
    ids = gpt2_tokenizer_with_pad(PROMPT, return_tensors="pt").input_ids
    assert causality(tiny_gpt2, ids), "the intact model must pass first"
    tiny_gpt2.set_attn_implementation("lmcheck_bidirectional")
    try:
        result = causality(tiny_gpt2, ids)
    finally:
        tiny_gpt2.set_attn_implementation("sdpa")
    assert not result
    assert result.metrics["first_leaking_position"] == 0
    assert "position 0 of 6 sees the future" in result.explanation
    assert result.metrics["max_future_gradient_ratio"] > 1e-3
    assert causality(tiny_gpt2, ids), "the model is intact again"


def test_causality_headroom_counts_a_leak_seen_only_by_the_gradient(
    tiny_gpt2: GPT2LMHeadModel, gpt2_tokenizer_with_pad: PreTrainedTokenizerBase,
) -> None:
    """A leak of 1e-5 x the later embeddings moves logits less than atol, but not the gradient.

    Regression: the headroom followed the logit criterion alone, so this failure had a positive one.
    """
    ids = gpt2_tokenizer_with_pad(PROMPT, return_tensors="pt").input_ids
    handle = tiny_gpt2.transformer.drop.register_forward_hook(_future_leak)
    try:
        result = causality(tiny_gpt2, ids)
    finally:
        handle.remove()
    assert not result
    assert result.metrics["max_logit_change"] < result.threshold
    assert result.metrics["max_future_gradient_ratio"] > result.metrics["grad_tol"] == 1e-6
    assert result.headroom is not None
    assert result.headroom < 0
    assert "position 0 of 6 sees the future" in result.explanation


def test_repetition_penalty_in_generation_config_is_named(smollm2: SmolLM2) -> None:
    """repetition_penalty=1.3 in generation_config: named and neutralised, or named as the cause.

    With it in force, generate parts from the hand loop at step 8: the penalty pushes down " the",
    already in the prompt, and generate chooses " some". The eos stop is also in force, so the
    test checks that the explanation names a different token, not an early stop.
    """
    model, tokenizer = smollm2
    with _generation_settings(model, repetition_penalty=1.3):
        neutralised = greedy_matches_generate(model, tokenizer, PROMPT, max_new_tokens=20)
        in_force = greedy_matches_generate(model, tokenizer, PROMPT, max_new_tokens=20,
                                           neutralize=False)
    assert neutralised, neutralised.explanation
    assert "repetition_penalty=1.3" in neutralised.explanation
    assert "neutralised" in neutralised.explanation
    assert not in_force
    assert "repetition_penalty=1.3" in in_force.explanation
    assert "row 0, step 8 (from 0) of 20: generate chose 634 (' some'), the hand loop 260 (' the')" \
        in in_force.explanation


def test_sampling_in_generation_config_is_named(
    tiny_gpt2: GPT2LMHeadModel, gpt2_tokenizer_with_pad: PreTrainedTokenizerBase,
) -> None:
    """do_sample=True in generation_config: no false alarm once neutralised, a named failure if not."""
    prompts = [PROMPT, "The capital of France is"]
    with _generation_settings(tiny_gpt2, do_sample=True):
        neutralised = greedy_matches_generate(tiny_gpt2, gpt2_tokenizer_with_pad, prompts,
                                              max_new_tokens=8)
        torch.manual_seed(0)
        in_force = greedy_matches_generate(tiny_gpt2, gpt2_tokenizer_with_pad, prompts,
                                           max_new_tokens=8, neutralize=False)
    assert neutralised, neutralised.explanation
    assert "do_sample=True" in neutralised.metrics["generation_config_overrides"]
    assert not in_force
    assert "do_sample=True" in in_force.explanation
    assert "generate chose" in in_force.explanation


def test_an_eos_stop_is_named(
    tiny_gpt2: GPT2LMHeadModel, gpt2_tokenizer_with_pad: PreTrainedTokenizerBase,
) -> None:
    """An eos id that the loop produces at step 2 stops generate there, unless neutralised."""
    ids = gpt2_tokenizer_with_pad(PROMPT, return_tensors="pt").input_ids
    eos = int(greedy_decode(tiny_gpt2, ids, max_new_tokens=3).new_tokens[0, 2])
    with _generation_settings(tiny_gpt2, eos_token_id=eos):
        neutralised = greedy_matches_generate(tiny_gpt2, gpt2_tokenizer_with_pad, PROMPT,
                                              max_new_tokens=6)
        in_force = greedy_matches_generate(tiny_gpt2, gpt2_tokenizer_with_pad, PROMPT,
                                           max_new_tokens=6, neutralize=False)
    assert neutralised, neutralised.explanation
    assert not in_force
    assert "generate stopped (eos)" in in_force.explanation
    assert f"eos_token_id={eos}" in in_force.explanation


def test_a_parting_at_a_tie_passes_and_is_reported(
    tiny_gpt2: GPT2LMHeadModel, gpt2_tokenizer_with_pad: PreTrainedTokenizerBase,
) -> None:
    """With a tie tolerance wider than any gap, the same parting counts as a tie, and says so."""
    with _generation_settings(tiny_gpt2, do_sample=True):
        torch.manual_seed(0)
        result = greedy_matches_generate(tiny_gpt2, gpt2_tokenizer_with_pad, PROMPT,
                                         max_new_tokens=8, neutralize=False, tie_atol=1e6)
    assert result, result.explanation
    assert result.metrics["ties"] == 1
    assert "1 row part at a tie; the first: row 0, step" in result.explanation
    assert "generate" in result.explanation.split("the first:")[1]
    assert result.headroom is not None
    assert 0 <= result.headroom <= 1


def test_an_exact_tie_that_did_not_part_leaves_headroom_in_range(
    tiny_gpt2: GPT2LMHeadModel, gpt2_tokenizer_with_pad: PreTrainedTokenizerBase,
) -> None:
    """A top-2 gap of exactly 0 (both paths pick the same token) gives a headroom in [0, 1], not None.

    Regression: the headroom was max_diff over the closest gap, None at a gap of 0 and
    negative where the closest gap was below the logit noise.
    """
    with _hooked(tiny_gpt2, post=_tie_top2_on_prompt_pass):
        result = greedy_matches_generate(tiny_gpt2, gpt2_tokenizer_with_pad,
                                         [PROMPT, "The capital of France is"], max_new_tokens=4)
    assert result, result.explanation
    assert result.metrics["closest_top2_gap"] == 0.0
    assert result.metrics["closest_decisive_top2_gap"] > result.threshold
    assert result.headroom is not None
    assert 0 <= result.headroom <= 1


def test_an_eos_stop_inside_a_batch_is_named(
    tiny_gpt2: GPT2LMHeadModel, gpt2_tokenizer_with_pad: PreTrainedTokenizerBase,
) -> None:
    """Row 0 meets eos at step 0 while row 1 goes on: generate pads row 0, and that reads as a stop."""
    prompts = ["Hi", "Once upon a time, in a small village"]
    ids, mask = encode_batch(gpt2_tokenizer_with_pad, prompts)
    tokens = greedy_decode(tiny_gpt2, ids, max_new_tokens=4, attention_mask=mask).new_tokens
    eos = int(tokens[0, 0])
    assert eos not in tokens[1].tolist()
    assert eos != gpt2_tokenizer_with_pad.pad_token_id
    with _generation_settings(tiny_gpt2, eos_token_id=eos):
        result = greedy_matches_generate(tiny_gpt2, gpt2_tokenizer_with_pad, prompts,
                                         max_new_tokens=4, neutralize=False)
    assert not result
    assert result.explanation.startswith("row 0, step 1 (from 0) of 4: generate stopped (eos)")
    assert result.details[0]["generate_token"] == -1
    assert result.details[1]["verdict"] == "equal"


def test_kv_cache_check_is_not_applicable_without_a_cache(
    tiny_gpt2: GPT2LMHeadModel, gpt2_tokenizer_with_pad: PreTrainedTokenizerBase,
) -> None:
    """A plain module has no cache lmcheck can drive: the check says so, neither pass nor fail."""
    ids = gpt2_tokenizer_with_pad(PROMPT, return_tensors="pt").input_ids
    assert kv_cache_matches_full(tiny_gpt2, ids, max_new_tokens=3), "the intact model must pass first"
    wrapped = _NoCache(tiny_gpt2)  # a plain module: lmcheck drives no cache through it
    assert not greedy_decode(wrapped, ids, max_new_tokens=3).cache_used
    result = kv_cache_matches_full(wrapped, ids, max_new_tokens=3)
    assert not result
    assert result.status == "n/a"
    assert "the _NoCache has none" in result.skip_reason


def test_kv_cache_check_catches_a_corrupted_cache(smollm2: SmolLM2) -> None:
    """A cache whose newest key is perturbed fails from step 1, the first step that reads it."""
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with _hooked(model, post=_corrupt_cache):
        result = kv_cache_matches_full(model, ids, max_new_tokens=4)
    assert not result
    assert result.explanation.startswith("step 1 (from 0) of 4, row 0: logits with the cache")
    # step 0 is the prompt pass and reads no cache: the two sides agree but for rounding (the
    # cached side computes the last position's logits alone, as generate does)
    assert result.details[0]["max_abs_diff"] < 1e-4


def test_padding_check_catches_an_ignored_mask(smollm2: SmolLM2) -> None:
    """A model that never sees the attention mask attends to the pads, and fails."""
    model, tokenizer = smollm2
    with _hooked(model, pre=_ignore_attention_mask):
        result = padding_invariance(model, tokenizer, PROMPT, pad_tokens=8, max_new_tokens=2)
    assert not result
    assert "prompt 0 with 8 left pads: logits differ" in result.explanation
    assert result.metrics["max_logit_diff"] > 1e-2


def test_batch_check_catches_an_ignored_mask(
    tiny_gpt2: GPT2LMHeadModel, gpt2_tokenizer_with_pad: PreTrainedTokenizerBase,
) -> None:
    """In a batch, the shorter prompt's row sees its pads when the mask is ignored."""
    prompts = ["Hi", "Once upon a time, in a small village"]
    with _hooked(tiny_gpt2, pre=_ignore_attention_mask):
        result = batch_invariance(tiny_gpt2, gpt2_tokenizer_with_pad, prompts, max_new_tokens=2)
    assert not result
    assert result.explanation.startswith("prompt 0 in a left-padded batch of 2")
    assert result.metrics["max_logit_diff"] > 1e-2  # measured 0.83


def test_padding_check_counts_a_flip_within_the_allowed_noise_as_a_tie(
    tiny_gpt2: GPT2LMHeadModel, gpt2_tokenizer_with_pad: PreTrainedTokenizerBase,
) -> None:
    """Padding moves two near-tied logits by 0.6 x their gap, within atol = the gap: a tie, a pass.

    Regression: the tie tolerance was 1e-5 whatever atol allowed, so such a flip failed with a
    positive headroom. Past atol it fails, and the headroom is negative.
    """
    ids = gpt2_tokenizer_with_pad(PROMPT, return_tensors="pt").input_ids
    top2 = greedy_decode(tiny_gpt2, ids, max_new_tokens=1).logits[0, 0].topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap > 1e-4
    with _hooked(tiny_gpt2, post=_flip_top2_when_padded(0.6 * gap)):
        within = padding_invariance(tiny_gpt2, gpt2_tokenizer_with_pad, PROMPT, max_new_tokens=1,
                                    atol=gap)
        beyond = padding_invariance(tiny_gpt2, gpt2_tokenizer_with_pad, PROMPT, max_new_tokens=1,
                                    atol=0.5 * gap)
    assert within, within.explanation
    assert within.details[0]["verdict"] == "tie"
    assert within.details[0]["alone_token"] != within.details[0]["padded_token"]
    assert within.metrics["tie_atol"] == pytest.approx(2 * gap)
    assert within.headroom is not None
    assert 0 < within.headroom < 1
    assert not beyond
    assert "above the tolerance" in beyond.explanation
    assert beyond.headroom is not None
    assert beyond.headroom < 0


# --- the loop itself ---------------------------------------------------------------------------

def test_greedy_decode_with_and_without_cache_agree(
    tiny_gpt2: GPT2LMHeadModel, gpt2_tokenizer_with_pad: PreTrainedTokenizerBase,
) -> None:
    """The loop appends the same tokens with and without the cache, and keeps the model's mode."""
    ids = gpt2_tokenizer_with_pad(PROMPT, return_tensors="pt").input_ids
    tiny_gpt2.train()
    try:
        cached = greedy_decode(tiny_gpt2, ids, max_new_tokens=6)
        assert tiny_gpt2.training, "the probe restores training mode"
    finally:
        tiny_gpt2.eval()
    full = greedy_decode(tiny_gpt2, ids[0].tolist(), max_new_tokens=6, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences)
    # measured 6.0e-7 (tiny fp32 GPT-2, CPU); transformers' GPT-2 cache test allows atol 1e-3
    torch.testing.assert_close(cached.logits, full.logits, rtol=0, atol=1e-4)
    assert cached.attention_mask.tolist() == [[1] * 12]


# --- misuse ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m, t: greedy_matches_generate(m, t, [""]), InputError, r"prompts\[0\]' must be a non-empty str"),
        (lambda m, t: greedy_matches_generate(m, t, []), InputError, r"'prompts' must be a str or a non-empty list"),
        (lambda m, t: greedy_decode(m, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3),
         InputError, r"at least 1 token per row \(got shape \(1, 0\)\)"),
        (lambda m, t: greedy_decode(m, [[1, 2]], max_new_tokens=0), InputError, r"'max_new_tokens' must be an int >= 1 \(got 0"),
        (lambda m, t: greedy_matches_generate(m, t, PROMPT, max_new_tokens=-1), InputError, r"'max_new_tokens' must be an int >= 1"),
        (lambda m, t: greedy_decode(m, [[1] * 250], max_new_tokens=10), InputError,
         r"250 tokens plus max_new_tokens=10 needs 260 positions, more than the model's context of 256"),
        (lambda m, t: greedy_decode(m, torch.ones(1, 3), max_new_tokens=2), InputError, r"integer tensor of token ids \(got torch.float32"),
        (lambda m, t: causality(m, [[5]]), InputError, r"at least 2 tokens"),
        (lambda m, t: padding_invariance(m, t, PROMPT, pad_tokens=0), InputError, r"'pad_tokens' must be an int >= 1"),
        (lambda m, t: batch_invariance(m, t, [PROMPT]), InputError, r"at least 2 prompts"),
        (lambda m, t: next_token_logits(m, [1, 2]), InputError, r"'inputs' must be a mapping"),
        (lambda m, t: greedy_decode("gpt2", [[1]], max_new_tokens=1), ModelError, r"torch.nn.Module"),
    ],
    ids=["empty-prompt", "no-prompts", "empty-ids", "zero-new-tokens", "negative-new-tokens",
         "longer-than-context", "float-ids", "one-token-causality", "zero-pads", "one-prompt-batch",
         "inputs-not-mapping", "model-not-module"],
)
def test_misuse_is_a_clear_error(
    tiny_gpt2: GPT2LMHeadModel, gpt2_tokenizer_with_pad: PreTrainedTokenizerBase,
    call: Any, error: type[Exception], message: str,
) -> None:
    """Each misuse raises the lmcheck error whose message names the argument and what came."""
    with pytest.raises(error, match=message):
        call(tiny_gpt2, gpt2_tokenizer_with_pad)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, t: padding_invariance(m, t, PROMPT),
        lambda m, t: batch_invariance(m, t, [PROMPT, "Hi"]),
        lambda m, t: greedy_matches_generate(m, t, [PROMPT, "Hi"], max_new_tokens=2),
    ],
    ids=["padding_invariance", "batch_invariance", "greedy_matches_generate"],
)
def test_padding_without_a_pad_token_says_how_to_set_one(
    tiny_gpt2: GPT2LMHeadModel, gpt2_tokenizer: PreTrainedTokenizerBase, call: Any,
) -> None:
    """GPT-2's own tokenizer has no pad token: the error says so, and how to set one."""
    assert gpt2_tokenizer.pad_token is None
    with pytest.raises(InputError, match=r"has no pad token.*tokenizer.pad_token = tokenizer.eos_token"):
        call(tiny_gpt2, gpt2_tokenizer)


def test_prompts_of_equal_length_need_no_pad_token(
    tiny_gpt2: GPT2LMHeadModel, gpt2_tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Where nothing needs padding, a tokenizer without a pad token is fine."""
    result = greedy_matches_generate(tiny_gpt2, gpt2_tokenizer, [PROMPT], max_new_tokens=3)
    assert result, result.explanation


def test_a_masked_lm_is_refused(bert_tokenizer: PreTrainedTokenizerBase) -> None:
    """A masked LM cannot decode left to right: ModelError names the class."""
    bert = bert_from_scratch(bert_tokenizer, preset="bert-tiny-cpu")
    ids = bert_tokenizer("Life is like a box of chocolates.", return_tensors="pt").input_ids
    with pytest.raises(ModelError, match=r"got a BertForMaskedLM, whose can_generate\(\) is False"):
        greedy_decode(bert, ids, max_new_tokens=2)
    with pytest.raises(ModelError, match=r"masked LM"):
        causality(bert, ids)
