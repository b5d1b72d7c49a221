"""Library tests of lmcheck.masked and lmcheck.loops.masked: any masked LM, bad input, and
the negative controls."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaTokenizer,
)

from lmcheck.cloze import ClozeCase, cloze_cases
from lmcheck.errors import InputError, ModelError
from lmcheck.loops.masked import MEMORIZATION_RUN, train_masked_lm
from lmcheck.masked import fill_mask, mask_fill_accuracy, masked_loss_at_init
from lmcheck.models import bert_from_scratch
from lmcheck.recipes import DEFAULTS
from lmcheck.tokens import tokenizer_folder

SENTENCE = DEFAULTS["masked_sentence"]
RUN = MEMORIZATION_RUN
# "case 3 '...the [MASK] of...': expected 'river', predicted 'the' (rank 17, p=0.002)"
NAMED_CASE = re.compile(r"case \d+ ['\"].*\[MASK\].*['\"]: expected '\w+', predicted '.+' \(rank \d+, p=")


@pytest.fixture(scope="module")
def tiny_bert(bert_tokenizer) -> BertForMaskedLM:
    """An untrained 2-layer BERT with the uncased vocabulary (fast to build and run)."""
    return bert_from_scratch(bert_tokenizer, preset="bert-tiny-cpu", seed=0).eval()


@pytest.fixture(scope="module")
def memorized_cases(memorized_bert, bert_tokenizer) -> tuple[ClozeCase, ...]:
    """Chapter 2's cloze cases on the memorized training chunks."""
    return cloze_cases(bert_tokenizer, memorized_bert.train_texts, n=RUN.cases,
                       seed=RUN.case_seed, context="text")


# --- fill_mask ---------------------------------------------------------------------------

def test_fill_mask_handles_several_masks_and_a_batch(tiny_bert, bert_tokenizer):
    """Each mask of each text gets its own row; a padded batch equals the texts one by one."""
    texts = ["the [MASK] sat on the [MASK] .", SENTENCE]
    batch = fill_mask(tiny_bert, bert_tokenizer, texts, top_k=3)
    assert [(p.text_index, p.position) for p in batch] == [(0, 2), (0, 6), (1, 5)]
    alone = [p for text in texts for p in fill_mask(tiny_bert, bert_tokenizer, text, top_k=3)]
    for together, single in zip(batch, alone, strict=True):
        assert together.ids == single.ids
        # rtol 1e-4: the fp32 rtol of transformers' batching tests; measured relative 2.7e-7
        # (absolute 2.2e-11). atol=0: its 1e-6 would be over 1% of these probabilities (~8e-5)
        torch.testing.assert_close(torch.tensor(together.probabilities),
                                   torch.tensor(single.probabilities), rtol=1e-4, atol=0.0)


def test_fill_mask_takes_the_mask_token_from_the_tokenizer():
    """A RoBERTa-style model and tokenizer: '<mask>' is found, '[MASK]' is refused."""
    tokenizer = RobertaTokenizer.from_pretrained(str(tokenizer_folder("gpt2")))
    # RoBERTa numbers positions from its pad id + 1 (1 in roberta-base); this tokenizer, GPT-2's
    # vocabulary plus RoBERTa's specials, puts pad last, so the model keeps 1 (no padding here).
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=40,
                           pad_token_id=1)
    torch.manual_seed(0)
    model = RobertaForMaskedLM(config).eval()
    text = "Life is like a <mask> of chocolates."
    (prediction,) = fill_mask(model, tokenizer, text, top_k=2)
    assert prediction.position == tokenizer(text)["input_ids"].index(tokenizer.mask_token_id)
    with pytest.raises(InputError, match=re.escape("mask token '<mask>'")):
        fill_mask(model, tokenizer, SENTENCE)


# --- bad input -----------------------------------------------------------------------------

def test_text_without_the_mask_token_names_it(tiny_bert, bert_tokenizer):
    """A text with no [MASK] is an InputError that says which token was expected."""
    with pytest.raises(InputError, match=re.escape("'text_or_texts[1]' must contain the tokenizer's mask token '[MASK]'")):
        fill_mask(tiny_bert, bert_tokenizer, [SENTENCE, "no mask here"])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_layer=1, n_head=2, n_embd=32)),
         "got GPT2LMHeadModel, a causal LM"),
        (lambda: BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                      intermediate_size=64)),
         "got BertModel, a model without a masked-LM head"),
        (lambda: BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                            intermediate_size=64, is_decoder=True)),
         "config.is_decoder=True"),
        (lambda: BertForMaskedLM(BertConfig(vocab_size=1000, num_hidden_layers=1, hidden_size=32,
                                            num_attention_heads=2, intermediate_size=64)),
         "'tokenizer' has 30,522 tokens but the model's input embeddings hold 1,000"),
    ],
    ids=["causal-lm", "no-mlm-head", "decoder-attention", "vocabulary-too-large"],
)
def test_a_model_that_cannot_fill_masks_is_refused(bert_tokenizer, build, message):
    """Causal LMs, models without an MLM head and too-small embedding tables raise ModelError."""
    with pytest.raises(ModelError, match=re.escape(message)):
        fill_mask(build(), bert_tokenizer, SENTENCE)


@pytest.mark.parametrize("top_k", [0, -1, 30523, True, 2.0], ids=["zero", "negative", "above-vocab", "bool", "float"])
def test_top_k_out_of_range_is_refused(tiny_bert, bert_tokenizer, top_k):
    """top_k must be an int from 1 to the vocabulary size."""
    with pytest.raises(InputError, match=re.escape("'top_k' must be an int from 1 to the vocabulary size, 30522")):
        fill_mask(tiny_bert, bert_tokenizer, SENTENCE, top_k=top_k)
    with pytest.raises(InputError, match="'top_k'"):
        mask_fill_accuracy(tiny_bert, bert_tokenizer, [ClozeCase(SENTENCE, ("box",))], top_k=top_k)


@pytest.mark.parametrize(
    ("cases", "message"),
    [
        ([], "'cases' must be a non-empty list"),
        ([ClozeCase(SENTENCE, ("chocolates",))], "answer 'chocolates' must be one token"),
        ([ClozeCase("a [MASK] and a [MASK] .", ("box",))], "'cases[0]' must hold exactly one mask token"),
        ([ClozeCase("no mask at all", ("box",))], "'cases[0]' must contain the tokenizer's mask token '[MASK]'"),
        (["just a string"], "'cases[0]' must be a ClozeCase"),
    ],
    ids=["empty", "answer-of-two-tokens", "two-masks", "no-mask", "not-a-case"],
)
def test_bad_cases_are_refused(tiny_bert, bert_tokenizer, cases, message):
    """Cases that cannot be scored raise InputError naming the case."""
    with pytest.raises(InputError, match=re.escape(message)):
        mask_fill_accuracy(tiny_bert, bert_tokenizer, cases)


# --- cloze_cases ---------------------------------------------------------------------------

def test_cloze_cases_mask_whole_content_words(bert_tokenizer, wiki_split):
    """Each case is a real sentence with one single-token content word masked; seeded."""
    documents = wiki_split["validation"]
    cases = cloze_cases(bert_tokenizer, documents, n=30, seed=1)
    assert cases == cloze_cases(bert_tokenizer, documents, n=30, seed=1)
    assert cases != cloze_cases(bert_tokenizer, documents, n=30, seed=2)
    text = " ".join(documents["text"]).lower()
    for case in cases:
        assert case.text.count("[MASK]") == 1
        (answer,) = case.answers
        assert answer.isalpha()
        assert len(answer) >= 3
        assert answer not in {"the", "and", "which", "with", "from"}
        assert len(bert_tokenizer.encode(answer, add_special_tokens=False)) == 1
        assert case.text.lower().replace("[mask]", answer) in text  # a real sentence


def test_cloze_cases_never_mask_a_word_piece(bert_tokenizer):
    """'chocolates' is chocolate + ##s: it is never masked; 'life' and 'like'... only content words."""
    cases = cloze_cases(bert_tokenizer, [SENTENCE * 3], n=1, seed=0, min_words=3)
    assert cases[0].answers == ("life",)  # like, a, of: stop words; chocolates: two pieces
    with pytest.raises(InputError, match="give only 1 cloze cases, fewer than n=2"):
        cloze_cases(bert_tokenizer, [SENTENCE], n=2, min_words=3)


# --- mask_fill_accuracy: negative controls ---------------------------------------------------

def test_memorized_model_fills_its_training_chunks(memorized_bert, bert_tokenizer, memorized_cases):
    """The positive case the controls are measured against: >= 0.9 on memorized chunks."""
    result = mask_fill_accuracy(memorized_bert.model, bert_tokenizer, memorized_cases)
    assert result, result.explanation
    assert {"text", "expected", "prediction", "rank", "probability"} <= set(result.details[0])


def test_reinitialized_mlm_head_fails_naming_the_case(memorized_bert, bert_tokenizer, memorized_cases):
    """The trained encoder with a fresh MLM head (a checkpoint loaded without cls.*) fails."""
    model = copy.deepcopy(memorized_bert.model)
    torch.manual_seed(1)
    head = model.cls.predictions
    torch.nn.init.normal_(head.transform.dense.weight, std=model.config.initializer_range)
    torch.nn.init.zeros_(head.transform.dense.bias)
    head.transform.LayerNorm.reset_parameters()
    torch.nn.init.zeros_(head.bias)
    result = mask_fill_accuracy(model, bert_tokenizer, memorized_cases)
    assert not result.passed
    assert result.metrics["accuracy"] < 0.5
    assert "is below 0.9; failing: case " in result.explanation
    assert NAMED_CASE.search(result.explanation), result.explanation


def test_labels_that_do_not_match_the_inputs_fail(memorized_bert, bert_tokenizer, memorized_cases):
    """Trained with labels shifted by one position (a causal-LM shift), the model fails."""
    collator = DataCollatorForLanguageModeling(bert_tokenizer, mlm=True, mlm_probability=0.15, seed=0)

    def shifted(rows):
        batch = collator(rows)
        batch["labels"] = batch["labels"].roll(1, dims=1)  # position t scored on token t-1
        return batch

    model = bert_from_scratch(bert_tokenizer, preset=RUN.preset, seed=DEFAULTS["seed"],
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    train_masked_lm(model, bert_tokenizer, memorized_bert.train_texts, steps=RUN.steps,
                    lr=RUN.lr, batch_size=RUN.batch_size, collator=shifted)
    result = mask_fill_accuracy(model, bert_tokenizer, memorized_cases)
    assert not result.passed
    assert result.metrics["accuracy"] < 0.5
    assert NAMED_CASE.search(result.explanation), result.explanation


def test_held_out_control_fails_when_the_model_knows_the_text(memorized_bert, bert_tokenizer, memorized_cases):
    """expect='at_most' fails on memorized text and names the cases it filled."""
    result = mask_fill_accuracy(memorized_bert.model, bert_tokenizer, memorized_cases,
                                threshold=0.2, expect="at_most")
    assert not result.passed
    assert "exceeds 0.2; unexpectedly filled: case 0 " in result.explanation


@pytest.mark.parametrize(
    "probe",
    [lambda m, t: fill_mask(m, t, SENTENCE),
     lambda m, t: mask_fill_accuracy(m, t, [ClozeCase(SENTENCE, ("box",))]),
     lambda m, t: masked_loss_at_init(m, t, [SENTENCE])],
    ids=["fill_mask", "mask_fill_accuracy", "masked_loss_at_init"],
)
def test_a_failing_forward_leaves_the_model_in_training_mode(bert_tokenizer, probe):
    """The probes switch to eval mode; an exception inside must not leave the user's model there."""
    model = bert_from_scratch(bert_tokenizer, preset="bert-tiny-cpu", seed=0).train()

    def fail(module, args, output):
        raise RuntimeError("planted failure")

    model.get_input_embeddings().register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="planted failure"):
        probe(model, bert_tokenizer)
    assert model.training


def test_threshold_out_of_range_is_refused(tiny_bert, bert_tokenizer):
    """The accuracy bound is a share: a number from 0 to 1."""
    with pytest.raises(InputError, match=re.escape("'threshold' must be a number from 0 to 1 (got 1.5 that is a float)")):
        mask_fill_accuracy(tiny_bert, bert_tokenizer, [ClozeCase(SENTENCE, ("box",))], threshold=1.5)


# --- masked_loss_at_init -----------------------------------------------------------------------

def test_loss_at_init_fails_for_an_overconfident_head(bert_tokenizer, memorized_bert):
    """A large random output bias makes the untrained loss far exceed ln(V): it fails, saying so."""
    model = bert_from_scratch(bert_tokenizer, preset="bert-tiny-cpu", seed=0)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.cls.predictions.bias, std=5.0)
    result = masked_loss_at_init(model, bert_tokenizer, memorized_bert.train_texts)
    assert not result.passed
    assert "above: the initial predictions are too confident" in result.explanation


def test_loss_at_init_fails_for_a_trained_model(bert_tokenizer, memorized_bert):
    """A model that already knows the text is far below ln(V): not an untrained model."""
    result = masked_loss_at_init(memorized_bert.model, bert_tokenizer, memorized_bert.train_texts)
    assert not result.passed
    assert "below: an untrained model should not do better than a uniform guess" in result.explanation
