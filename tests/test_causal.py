"""Library tests of lmcheck.causal and lmcheck.decoding: negative controls (broken models each
probe must catch, with an explanation that locates the problem) and misuse (each a clear error)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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

from lmcheck.causal import (
    batch_invariance,
    causality,
    greedy_matches_generate,
    kv_cache_matches_full,
    padding_invariance,
)
from lmcheck.decoding import greedy_decode, next_token_logits
from lmcheck.errors import InputError, ModelError
from lmcheck.models import bert_from_scratch, gpt2_from_scratch
from lmcheck.tokens import load_tokenizer

SmolLM2 = tuple[PreTrainedModel, PreTrainedTokenizerBase]
PROMPT = "Swimming at the beach is"


@pytest.fixture(scope="module")
def gpt2_tokenizer_with_pad() -> PreTrainedTokenizerBase:
    """A private copy of GPT-2's tokenizer with pad = eos (the session one has no pad token)."""
    tokenizer = load_tokenizer("gpt2")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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


def test_repetition_penalty_in_generation_config_is_named(smollm2: SmolLM2) -> None:
    """repetition_penalty=1.3 in generation_config: named and neutralised, or named as the cause.

    With it in force, generate stops repeating " a great" where the hand loop repeats it.
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
    assert "row 0, step" in in_force.explanation


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
    assert "part at a tie" in result.explanation


def test_kv_cache_check_catches_a_corrupted_cache(smollm2: SmolLM2) -> None:
    """A cache whose newest key is perturbed fails from step 1, the first step that reads it."""
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with _hooked(model, post=_corrupt_cache):
        result = kv_cache_matches_full(model, ids, max_new_tokens=4)
    assert not result
    assert result.explanation.startswith("step 1 (from 0) of 4, row 0: logits with the cache")
    assert result.details[0]["max_abs_diff"] == 0.0  # step 0 is the prompt pass, no cache read


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
    torch.testing.assert_close(cached.logits, full.logits, rtol=0, atol=1e-4)
    assert cached.attention_mask.tolist() == [[1] * 12]


# --- misuse ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m, t: greedy_matches_generate(m, t, [""]), InputError, r"prompts\[0\]' must be a non-empty str"),
        (lambda m, t: greedy_matches_generate(m, t, []), InputError, r"'prompts' must be a str or a non-empty list"),
        (lambda m, t: greedy_decode(m, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3),
         InputError, r"at least one token per row \(got shape \(1, 0\)\)"),
        (lambda m, t: greedy_decode(m, [[1, 2]], max_new_tokens=0), InputError, r"'max_new_tokens' must be an int >= 1 \(got 0"),
        (lambda m, t: greedy_matches_generate(m, t, PROMPT, max_new_tokens=-1), InputError, r"'max_new_tokens' must be an int >= 1"),
        (lambda m, t: greedy_decode(m, [[1] * 250], max_new_tokens=10), InputError,
         r"250 tokens plus max_new_tokens=10 needs 260 positions, more than the model's context of 256"),
        (lambda m, t: greedy_decode(m, torch.ones(1, 3), max_new_tokens=2), InputError, r"integer tensor \(got torch.float32"),
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
