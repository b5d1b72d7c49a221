"""A causal LM from a third-party library: lmcheck's probes on ``x-transformers``.

``x-transformers`` (lucidrains) builds a transformer from parts: ``TransformerWrapper`` (token
and position embeddings, the output layer) around ``Decoder`` (causal attention layers) or
``Encoder`` (bidirectional ones). Its ``forward(x, ..., mask=None)`` takes a ``(B, T)`` tensor of
token ids and returns the ``(B, T, V)`` logits, so lmcheck recognises it as a plain PyTorch LM,
without any wrapping. Its mask keyword is ``mask=`` (a bool tensor, True for a token), not
``attention_mask=``, so lmcheck cannot know it takes one: the probes that need padding report
themselves not applicable until the model is wrapped once with :func:`lmcheck.adapt`.

What this file shows:

- as-is, the healthy decoder passes every applicable probe, and the rest say "n/a" and why;
- adapted with its mask, it takes padded batches; whether it then gives each prompt the same
  logits padded or batched as alone depends on how it numbers positions, and the invariance
  probes tell the two apart (learned absolute positions that count the pads fail; positions
  counted from the mask, or rotary positions, pass);
- the same library's ``Encoder``, a transformer without a causal mask, fails ``causality`` with
  an explanation that names the position that sees the future.

The models are tiny (GPT-2's 50,257-token vocabulary, width 64, 2 layers, 64 positions) and
untrained, so the whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import pytest
import torch

import lmcheck
import lmcheck.adapters
import lmcheck.decoding

x_transformers = pytest.importorskip("x_transformers")

PROMPTS = ["Swimming at the beach is", "The capital of France is", "def fibonacci(n):"]


def tiny(vocab: int, *, layers: type = x_transformers.Decoder, **options) -> torch.nn.Module:
    """A seeded, untrained ``TransformerWrapper`` in eval mode; ``options`` go to the layers
    (``rotary_pos_emb=True`` for rotary positions). With the default options the wrapper adds
    learned absolute position embeddings, as GPT-2 does."""
    torch.manual_seed(0)
    model = x_transformers.TransformerWrapper(
        num_tokens=vocab, max_seq_len=64,
        attn_layers=layers(dim=64, depth=2, heads=2, **options))
    return model.eval()


def with_mask(model: torch.nn.Module, *, positions_from_mask: bool = False) -> lmcheck.adapters.AdaptedLM:
    """``model`` wrapped so that lmcheck can hand it an attention mask.

    lmcheck's mask is a ``(B, T)`` LongTensor of 1 for tokens and 0 for pads (None when there
    are no pads); x-transformers takes a bool ``mask=``. With ``positions_from_mask`` the
    absolute positions are counted over the real tokens only (``pos=``: a left pad takes no
    position), as lmcheck does with a Hugging Face model's ``position_ids``.
    """

    def logits(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return model(ids)
        kwargs = {"mask": mask.bool()}
        if positions_from_mask:
            kwargs["pos"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return model(ids, **kwargs)

    return lmcheck.adapt(model, logits=logits)


@pytest.fixture(scope="module")
def decoder(gpt2_tokenizer) -> torch.nn.Module:
    """x-transformers' default causal LM: a ``Decoder`` with learned absolute positions."""
    return tiny(len(gpt2_tokenizer))


@pytest.fixture(scope="module")
def rotary_decoder(gpt2_tokenizer) -> torch.nn.Module:
    """The same decoder with rotary position embeddings instead of absolute ones."""
    return tiny(len(gpt2_tokenizer), rotary_pos_emb=True)


@pytest.fixture(scope="module")
def ids(gpt2_tokenizer) -> torch.Tensor:
    """One row of 10 token ids: enough positions for ``causality``."""
    row = gpt2_tokenizer("Swimming at the beach is a great way to relax")["input_ids"][:10]
    return torch.tensor([row])


@pytest.fixture(scope="module")
def batch(gpt2_tokenizer) -> torch.Tensor:
    """A (3, 5) batch of ids for the training probes."""
    return torch.tensor([gpt2_tokenizer(text)["input_ids"][:5] for text in PROMPTS])


# ---------------------------------------------------------------- recognised as-is


APPLICABLE = {
    "causality": lambda model, ids, batch: lmcheck.causality(model, ids),
    "loss_at_init": lambda model, ids, batch: lmcheck.loss_at_init(model, batch),
    "gradient_flow": lambda model, ids, batch: lmcheck.gradient_flow(model, batch),
    "params_update": lambda model, ids, batch: lmcheck.params_update(model, batch),
}


@pytest.mark.parametrize("family", ["decoder", "rotary_decoder"])
@pytest.mark.parametrize("probe", sorted(APPLICABLE))
def test_the_decoder_as_is_passes_every_applicable_probe(family, probe, request, ids, batch):
    """No ``adapt``: ``model(ids)`` returns (B, T, V) logits, which is all these probes need.

    ``causality``: later tokens move no earlier logit and get no gradient from it.
    ``loss_at_init``: an untrained model's loss is within 0.5 of ln(50,257), about 10.8.
    ``gradient_flow`` and ``params_update``: every parameter (token and position embeddings,
    attention, feed-forward, norms, output layer) gets a gradient and moves in one AdamW step;
    the loss is lmcheck's reference loss (shifted cross-entropy over the logits), since the
    wrapper computes none of its own.
    """
    model = request.getfixturevalue(family)
    result = APPLICABLE[probe](model, ids, batch)
    assert result.status == "pass", result.explanation


NOT_APPLICABLE = {  # probe -> (words of the reason it gives, how to run it)
    "kv_cache_matches_full": (
        "KV cache", lambda model, tok, ids: lmcheck.kv_cache_matches_full(model, ids)),
    "greedy_matches_generate": (
        "generate()", lambda model, tok, ids: lmcheck.greedy_matches_generate(model, tok, PROMPTS)),
    "padding_invariance": (
        "attention_mask", lambda model, tok, ids: lmcheck.padding_invariance(model, tok, PROMPTS)),
    "batch_invariance": (
        "attention_mask", lambda model, tok, ids: lmcheck.batch_invariance(model, tok, PROMPTS)),
    "loss_matches_reference": (
        "no loss of its own", lambda model, tok, ids: lmcheck.loss_matches_reference(model, ids)),
}


@pytest.mark.parametrize("probe", sorted(NOT_APPLICABLE))
def test_the_decoder_as_is_says_what_it_lacks(probe, decoder, gpt2_tokenizer_with_pad, ids):
    """A probe that needs what the model lacks reports "n/a" with the reason, never a pass.

    lmcheck drives a KV cache and compares with ``generate()`` only through Hugging Face's
    interface; the padding probes need a mask keyword lmcheck can recognise (x-transformers
    calls it ``mask``); ``loss_matches_reference`` needs a loss of the model's own.
    """
    reason, run = NOT_APPLICABLE[probe]
    result = run(decoder, gpt2_tokenizer_with_pad, ids)
    assert result.status == "n/a", result.explanation
    assert not result.passed
    assert reason in result.skip_reason


def test_greedy_decode_runs_on_the_decoder_as_is(decoder, ids):
    """``greedy_decode`` returns data, not a verdict: the prompt and the new tokens, with the
    logits of each step. Without a KV cache, every step feeds the whole sequence again."""
    out = lmcheck.decoding.greedy_decode(decoder, ids, max_new_tokens=4)
    assert out.sequences.shape == (1, ids.shape[1] + 4)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    assert out.logits.shape == (1, 4, 50257)
    assert not out.cache_used


# ---------------------------------------------------------------- adapted with its mask


def test_absolute_positions_that_count_the_pads_fail_both_invariances(decoder,
                                                                      gpt2_tokenizer_with_pad):
    """Adapted with only its mask, the default decoder sees the pads masked out, yet a prompt
    behind 8 left pads is not the prompt alone: the learned absolute positions are counted from
    the first column, so the padded prompt's first token gets position 8 instead of 0, and every
    logit moves. This is a real difference in what the model computes (a batch of prompts of
    different lengths gets other answers than each prompt alone), and both probes catch it,
    with differences far above the float32 tolerance of 3e-4 (not noise).
    """
    model = with_mask(decoder)
    padded = lmcheck.padding_invariance(model, gpt2_tokenizer_with_pad, PROMPTS)
    assert padded.status == "fail"
    assert padded.explanation.startswith("prompt 0 with 8 left pads: logits differ")
    assert padded.metrics["max_logit_diff"] > 0.1
    batched = lmcheck.batch_invariance(model, gpt2_tokenizer_with_pad, PROMPTS)
    assert batched.status == "fail"
    assert "in a left-padded batch of 3" in batched.explanation


def test_absolute_positions_counted_from_the_mask_pass_both_invariances(decoder,
                                                                        gpt2_tokenizer_with_pad):
    """The same weights, with positions counted over the real tokens (``pos=``): the failure
    above was the positions, not the mask. Now a padded or batched prompt gives the logits and
    greedy tokens of the prompt alone, within the float32 tolerance."""
    model = with_mask(decoder, positions_from_mask=True)
    for result in (lmcheck.padding_invariance(model, gpt2_tokenizer_with_pad, PROMPTS),
                   lmcheck.batch_invariance(model, gpt2_tokenizer_with_pad, PROMPTS)):
        assert result.status == "pass", result.explanation


def test_rotary_positions_with_a_mask_pass_both_invariances(rotary_decoder,
                                                            gpt2_tokenizer_with_pad):
    """Rotary attention depends only on the distance between two positions, so shifting all of
    a prompt's positions by the number of pads changes nothing: the mask alone is enough."""
    model = with_mask(rotary_decoder)
    for result in (lmcheck.padding_invariance(model, gpt2_tokenizer_with_pad, PROMPTS),
                   lmcheck.batch_invariance(model, gpt2_tokenizer_with_pad, PROMPTS)):
        assert result.status == "pass", result.explanation


def test_the_adapted_decoder_still_passes_the_model_probes(rotary_decoder, ids, batch):
    """Wrapping changes how lmcheck calls the model, not what it checks: causality still holds,
    and ``params_update`` steps a deep copy whose logits function calls the copied module."""
    model = with_mask(rotary_decoder)
    for result in (lmcheck.causality(model, ids), lmcheck.params_update(model, batch)):
        assert result.status == "pass", result.explanation


# ---------------------------------------------------------------- a broken twin


def test_the_same_library_without_a_causal_mask_fails_causality(gpt2_tokenizer, ids):
    """x-transformers' ``Encoder`` is the same stack with bidirectional attention. Used as a
    causal LM it sees the future: changing the tokens after position 0 changes position 0's
    logits, and the explanation names that position and the later input it depends on most."""
    encoder = tiny(len(gpt2_tokenizer), layers=x_transformers.Encoder)
    result = lmcheck.causality(encoder, ids)
    assert result.status == "fail"
    assert result.explanation.startswith("position 0 of 10 sees the future")
    assert "input embedding at position" in result.explanation
    assert result.metrics["first_leaking_position"] == 0
