"""Chapter 2: a masked language model fills in the blank.

BERT reads a whole sentence at once, in both directions, and is trained to restore the tokens
hidden behind a ``[MASK]``. The tutorial asks it to fill "Life is like a [MASK] of chocolates.":
the tokenizer gives 11 ids with the mask (id 103) at index 5; the model turns each id into a
768-wide embedding (a table of 30,522 x 768), runs the encoder, and its masked-LM head maps every
position back to 30,522 scores, the logits, of shape [1, 11, 30522]. The scores at index 5, after a
softmax, are a probability for every word of the vocabulary; the top 5 of pretrained
bert-base-uncased are "box bag bowl jar cup".

No pretrained BERT with its MLM head can be had offline, so the walk-through runs on a BERT-base
configuration with random weights: the shapes, the index, the softmax and top-k are the same, only
the words are noise. To see mask filling work, a tiny BERT (2 layers, 128 wide, the real 30,522
uncased vocabulary, so that its predictions are real words) is trained from scratch with the
masked-LM objective, ``DataCollatorForLanguageModeling(mlm=True, mlm_probability=0.15)``, on 8
chunks of 64 tokens of the Wikipedia sample until it has memorized them. Cloze cases drawn from
those chunks (one content word masked each) are then filled almost perfectly, while the same test
on held-out chunks stays near zero: the overfit signature that chapter 4 shows for GPT-2.
Before training, its loss is close to ln(30,522) = 10.33: an untrained model is a uniform guess.

Where bert-base-uncased's weights are in the local Hugging Face cache, the last test checks the
tutorial's own numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertForMaskedLM

from lmcheck.cloze import cloze_cases
from lmcheck.loops.masked import MEMORIZATION_RUN
from lmcheck.masked import fill_mask, mask_fill_accuracy, masked_loss_at_init
from lmcheck.models import bert_from_scratch
from lmcheck.pytest_plugin import cached_repo
from lmcheck.recipes import DEFAULTS
from lmcheck.tutorial import expected

SENTENCE = DEFAULTS["masked_sentence"]  # "Life is like a [MASK] of chocolates."
RUN = MEMORIZATION_RUN


@pytest.fixture(scope="module")
def bert_base(bert_tokenizer) -> BertForMaskedLM:
    """BERT-base (110M parameters) with random weights: built once, in eval mode."""
    return bert_from_scratch(bert_tokenizer, preset="bert-base", seed=DEFAULTS["seed"]).eval()


@pytest.fixture(scope="module")
def seed_logits(bert_base, bert_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed sentence's input_ids (1, 11) and the model's logits for it (1, 11, V)."""
    inputs = bert_tokenizer(SENTENCE, return_tensors="pt")
    with torch.inference_mode():
        logits = bert_base(**inputs).logits
    return inputs["input_ids"], logits


def test_the_mask_is_one_token_of_the_input(bert_tokenizer):
    """The tokenizer writes [MASK] as id 103, at index 5 of the 11 ids."""
    ids = bert_tokenizer(SENTENCE)["input_ids"]
    assert ids == list(expected.BERT_SENTENCE_IDS)
    assert ids.index(103) == expected.BERT_MASK_INDEX
    assert bert_tokenizer.mask_token == "[MASK]"
    assert bert_tokenizer.mask_token_id == 103


def test_structure_shows_embeddings_encoder_and_mlm_head(bert_base):
    """Printed, the model shows a 30522 x 768 embedding table, 12 layers and the MLM head."""
    printed = str(bert_base)
    for line in expected.BERT_BASE_STRUCTURE:
        assert line in printed


def test_logits_have_one_score_per_position_and_word(seed_logits):
    """The logits have shape [1, 11, 30522]: batch, positions, vocabulary."""
    _, logits = seed_logits
    assert list(logits.shape) == [1, 11, 30522]


def test_the_masked_index_is_5(seed_logits, bert_tokenizer):
    """Looking for id 103 in input_ids finds index 5."""
    ids, _ = seed_logits
    assert torch.where(ids == bert_tokenizer.mask_token_id)[1].tolist() == [5]


def test_logits_at_the_mask_cover_the_vocabulary(seed_logits):
    """At the masked index there is one score per vocabulary entry: shape [30522]."""
    _, logits = seed_logits
    assert list(logits[0, 5].shape) == [30522]


def test_softmax_turns_scores_into_probabilities(seed_logits):
    """After a softmax the 30,522 scores are probabilities that sum to 1."""
    _, logits = seed_logits
    probs = logits[0, 5].softmax(-1)
    assert bool((probs >= 0).all())
    # measured 1.8e-7: fp32 rounding of a sum over 30,522 terms
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0), rtol=0, atol=1e-5)


def test_top_k_gives_5_ids_that_decode(seed_logits, bert_base, bert_tokenizer):
    """topk(5) gives 5 ids that decode to words; fill_mask returns the same ids and scores."""
    _, logits = seed_logits
    top = logits[0, 5].softmax(-1).topk(5)
    words = [bert_tokenizer.decode([i]).strip() for i in top.indices.tolist()]
    assert len(words) == 5
    assert all(words)
    (prediction,) = fill_mask(bert_base, bert_tokenizer, SENTENCE, top_k=5)
    assert prediction.position == 5
    assert list(prediction.ids) == top.indices.tolist()
    assert list(prediction.tokens) == words
    # measured 0.0 (the same forward and softmax); 1e-6 is under 1% of these probabilities (~3e-4)
    torch.testing.assert_close(torch.tensor(prediction.probabilities), top.values, rtol=0, atol=1e-6)


def test_untrained_loss_is_ln_vocabulary(bert_tokenizer, memorized_bert):
    """Before training, the tiny BERT's masked-LM loss is within 10% of ln(30522) = 10.33."""
    fresh = bert_from_scratch(bert_tokenizer, preset=RUN.preset, seed=DEFAULTS["seed"])
    result = masked_loss_at_init(fresh, bert_tokenizer, memorized_bert.train_texts, tolerance=0.1)
    assert result, result.explanation
    assert result.metrics["ln_vocab"] == pytest.approx(math.log(30522))


def test_training_loss_falls(memorized_bert):
    """Training drives the loss from about 10.3 to well under 1 (mean of the last 20 steps)."""
    losses = memorized_bert.losses
    assert len(losses) == RUN.steps
    assert losses[0] > 9.0
    assert sum(losses[-20:]) / 20 < 1.0


def test_memorized_chunks_are_filled(memorized_bert, bert_tokenizer):
    """Masking one word of a training chunk, the model restores it: top-1 accuracy >= 0.9."""
    cases = cloze_cases(bert_tokenizer, memorized_bert.train_texts, n=RUN.cases,
                        seed=RUN.case_seed, context="text")
    result = mask_fill_accuracy(memorized_bert.model, bert_tokenizer, cases,
                                threshold=RUN.memorized_min)
    assert result, result.explanation


def test_held_out_chunks_are_not(memorized_bert, bert_tokenizer):
    """The same test on chunks it never saw stays at or below 0.2: it memorized, not learned."""
    cases = cloze_cases(bert_tokenizer, memorized_bert.heldout_texts, n=RUN.cases,
                        seed=RUN.case_seed, context="text")
    result = mask_fill_accuracy(memorized_bert.model, bert_tokenizer, cases,
                                threshold=RUN.heldout_max, expect="at_most")
    assert result, result.explanation


BERT_REPOS = ("bert-base-uncased", "google-bert/bert-base-uncased")


@pytest.mark.pretrained(*BERT_REPOS)
def test_pretrained_bert_fills_the_tutorial_sentence(bert_tokenizer):
    """Pretrained bert-base-uncased: box bag bowl jar cup, with the tutorial's probabilities."""
    repo = cached_repo(BERT_REPOS)
    model = BertForMaskedLM.from_pretrained(repo, local_files_only=True, use_safetensors=True)
    (prediction,) = fill_mask(model, bert_tokenizer, SENTENCE, top_k=5)
    assert prediction.tokens == expected.PRETRAINED_BERT_TOP5
    # the tutorial prints these to 4 decimals
    torch.testing.assert_close(torch.tensor(prediction.probabilities),
                               torch.tensor(expected.PRETRAINED_BERT_TOP5_PROBABILITIES), rtol=0, atol=1e-3)
