"""Chapter 3: a causal language model, one token at a time.

A causal LM reads a prompt and gives, at every position, logits over the whole vocabulary for
the token that comes next: a tensor of shape [batch, positions, vocabulary]. Greedy decoding
takes the logits at the last position (-1), appends their argmax to ``input_ids``, extends the
``attention_mask`` by one, and runs again. The real model here is SmolLM2-135M-Instruct, a
Llama-architecture model that comes offline as a GGUF file and is converted once to safetensors.

Four things must agree with that hand-written loop, and each is a probe: ``generate`` with
greedy settings (once the model's generation_config can no longer inject sampling, penalties or
an eos stop), the loop with and without a KV cache, the prompt with and without left padding or
other prompts in its batch, and a model whose positions cannot see the future (changing later
tokens must not change earlier logits, and their gradient must be zero).

The same probes pass on GPT-2's architecture built from its configuration with random weights,
and, where the pretrained gpt2 weights are in the local Hugging Face cache, the tutorial's own
GPT-2 numbers are checked.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase

from lmcheck.batteries import CAUSAL_CHECKS, GREEDY_STEPS
from lmcheck.causal import causality, greedy_matches_generate, kv_cache_matches_full
from lmcheck.comparison import LOGIT_ATOL
from lmcheck.decoding import greedy_decode, next_token_logits
from lmcheck.errors import InputError
from lmcheck.invariance import batch_invariance, padding_invariance
from lmcheck.models import gpt2_from_scratch, load_causal_lm
from lmcheck.recipes import DEFAULTS
from lmcheck.tokens import load_tokenizer
from lmcheck.tutorial import expected

PROMPT = DEFAULTS["causal_prompt"]  # "Swimming at the beach is"
# several prompts of different lengths, so that batches need left padding
PROMPTS: tuple[str, ...] = DEFAULTS["causal_prompts"]
# SmolLM2-135M-Instruct's greedy continuation, 20 tokens (checked with generate)
SMOLLM2_CONTINUATION = expected.SMOLLM2_CONTINUATION

SmolLM2 = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def test_prompt_becomes_six_token_ids(smollm2: SmolLM2) -> None:
    """The tokenizer turns the prompt into six ids, without a start token."""
    _, tokenizer = smollm2
    inputs = tokenizer(PROMPT, return_tensors="pt")
    assert inputs.input_ids.tolist() == [[14395, 23659, 418, 260, 10724, 314]]
    assert inputs.attention_mask.tolist() == [[1] * 6]


def test_model_gives_logits_at_every_position(smollm2: SmolLM2) -> None:
    """The model returns logits of shape [1, T, V]: one distribution per position."""
    model, tokenizer = smollm2
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert tuple(logits.shape) == (1, 6, 49152)
    torch.testing.assert_close(next_token_logits(model, inputs), logits[:, -1, :], rtol=0, atol=0)


def test_argmax_at_the_last_position_is_the_next_token(smollm2: SmolLM2) -> None:
    """The argmax of the logits at position -1 is " a" (id 253), with probability about 0.27."""
    model, tokenizer = smollm2
    logits = next_token_logits(model, tokenizer(PROMPT, return_tensors="pt"))  # (1, V)
    token = int(logits.argmax(dim=-1))
    assert (token, tokenizer.decode([token])) == (253, " a")
    assert logits.softmax(dim=-1)[0, token].item() == pytest.approx(0.267, abs=0.005)


def test_appending_the_token_and_extending_the_mask_gives_the_next_step(smollm2: SmolLM2) -> None:
    """Appending " a" to input_ids and a 1 to the mask, the next argmax is " great"."""
    model, tokenizer = smollm2
    inputs = tokenizer(PROMPT, return_tensors="pt")
    input_ids, attention_mask = inputs.input_ids, inputs.attention_mask
    for _ in range(2):
        logits = next_token_logits(model, {"input_ids": input_ids, "attention_mask": attention_mask})
        next_token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        input_ids = torch.cat([input_ids, next_token], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
    assert tokenizer.decode(input_ids[0]) == PROMPT + " a great"
    assert attention_mask.tolist() == [[1] * 8]


def test_the_loop_continues_the_sentence(smollm2: SmolLM2) -> None:
    """Twenty steps of the loop decode to the model's known greedy continuation."""
    model, tokenizer = smollm2
    out = greedy_decode(model, tokenizer(PROMPT, return_tensors="pt").input_ids, max_new_tokens=20)
    assert tokenizer.decode(out.new_tokens[0]) == SMOLLM2_CONTINUATION
    assert tuple(out.logits.shape) == (1, 20, 49152)


def test_hand_loop_equals_generate(smollm2: SmolLM2) -> None:
    """The loop equals generate for 20 tokens on four prompts in one left-padded batch.

    SmolLM2's generation_config would stop at eos (id 2); the probe turns that off and says so.
    """
    model, tokenizer = smollm2
    result = greedy_matches_generate(model, tokenizer, list(PROMPTS), max_new_tokens=20)
    assert result, result.explanation
    assert result.metrics["generation_config_overrides"] == ["eos_token_id=2"]
    assert result.threshold == 1e-5  # fp32 tie tolerance
    # the two paths' logits differ by far less than the closest decision's top-2 margin.
    # Measured (SmolLM2, fp32, 2 CPU cores, torch 2.13): max_logit_diff 0.0 on one AVX-512
    # machine and 2.9e-5 (deterministic, 4 of 4 runs) on another, headroom 0.9988. generate and the
    # hand loop are two computations, so the bound is the fp32 logit tolerance that every
    # two-path comparison uses (LOGIT_ATOL, 3e-4), not the tie tolerance (1e-5), which bounds a
    # top-2 gap; the headroom bound says the logits moved by under a quarter of the closest gap
    assert result.metrics["max_logit_diff"] <= LOGIT_ATOL[torch.float32]
    assert result.headroom is not None
    assert result.headroom > 0.5


def test_cache_equals_full_recomputation(smollm2: SmolLM2) -> None:
    """With the KV cache, each step's logits are within 3e-4 of recomputing the whole sequence."""
    model, tokenizer = smollm2
    ids = tokenizer(PROMPTS[3], return_tensors="pt").input_ids
    result = kv_cache_matches_full(model, ids, max_new_tokens=8)
    assert result, result.explanation
    assert result.threshold == 3e-4


def test_left_padding_changes_nothing(smollm2: SmolLM2) -> None:
    """Eight masked pads in front of a prompt change its logits by less than 3e-4."""
    model, tokenizer = smollm2
    result = padding_invariance(model, tokenizer, list(PROMPTS[:3]), pad_tokens=8)
    assert result, result.explanation


def test_batching_changes_nothing(smollm2: SmolLM2) -> None:
    """Each prompt in a left-padded batch of four gives the logits and tokens it gives alone."""
    model, tokenizer = smollm2
    result = batch_invariance(model, tokenizer, list(PROMPTS))
    assert result, result.explanation


def test_no_position_sees_the_future(smollm2: SmolLM2) -> None:
    """Later tokens change no earlier logits, and their gradient at earlier outputs is zero."""
    model, tokenizer = smollm2
    result = causality(model, tokenizer(PROMPT, return_tensors="pt").input_ids)
    assert result, result.explanation
    assert result.metrics["max_future_gradient_ratio"] == 0.0


# --- GPT-2's architecture, random weights, the real vocabulary ---------------------------------

@pytest.fixture(scope="module")
def gpt2_random() -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """GPT-2 124M from its configuration (seeded random weights) and its own tokenizer copy,
    whose pad token is eos (set here, once: no test changes a module-scoped object)."""
    tokenizer = load_tokenizer("gpt2")  # a copy: the session tokenizer keeps no pad token
    model = gpt2_from_scratch(tokenizer, preset="gpt2").eval()
    tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def test_gpt2_structure(gpt2_random: tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]) -> None:
    """The printed model shows wte 50257 x 768, wpe 1024 x 768, and lm_head 768 -> 50257 without bias."""
    text = str(gpt2_random[0])
    for line in expected.GPT2_STRUCTURE:
        assert line in text


def test_gpt2_needs_a_pad_token_to_pad(
    gpt2_random: tuple[GPT2LMHeadModel, PreTrainedTokenizerBase],
) -> None:
    """GPT-2's tokenizer has no pad token; padding asks for one, and eos serves (masked out).

    A fresh tokenizer: this test once set the pad token on the module's shared copy, so the
    probes below passed only when it ran first."""
    model, _ = gpt2_random
    tokenizer = load_tokenizer("gpt2")
    with pytest.raises(InputError, match=r"tokenizer.pad_token = tokenizer.eos_token"):
        batch_invariance(model, tokenizer, list(PROMPTS))
    tokenizer.pad_token = tokenizer.eos_token
    assert batch_invariance(model, tokenizer, list(PROMPTS[:2]), max_new_tokens=1)


@pytest.mark.parametrize("check", list(CAUSAL_CHECKS))
def test_gpt2_random_weights_pass_the_same_probes(
    gpt2_random: tuple[GPT2LMHeadModel, PreTrainedTokenizerBase], check,
) -> None:
    """The probes hold for GPT-2's architecture too: they test the code, not the training.
    The battery is the ready suite's, with its arguments, as chapter 3 of the tutorial runs it."""
    model, tokenizer = gpt2_random
    result = CAUSAL_CHECKS[check](model, tokenizer, PROMPTS, GREEDY_STEPS)
    assert result, result.explanation


@pytest.mark.pretrained("gpt2", files=("config.json", "model.safetensors", "tokenizer.json"))
def test_pretrained_gpt2_continues_the_tutorial_sentence() -> None:
    """Pretrained GPT-2: next token 257 (" a"), then " great", then generate finishes the sentence."""
    model, _ = load_causal_lm("gpt2", local_files_only=True)
    tokenizer = load_tokenizer("gpt2")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert int(next_token_logits(model, {"input_ids": ids}).argmax()) == 257
    two = greedy_decode(model, ids, max_new_tokens=2)
    assert tokenizer.decode(two.sequences[0]) == "Swimming at the beach is a great"
    # gpt2's own settings ask for sampling: greedy must be said explicitly
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                         do_sample=False, num_beams=1, pad_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(out[0]) == PROMPT + expected.PRETRAINED_GPT2_CONTINUATION
