"""Chapter 1: tokenizers, what a language model actually reads.

A language model never sees text. A tokenizer cuts text into pieces from a fixed vocabulary
and gives each piece's id (``input_ids``), together with an ``attention_mask`` that marks real
tokens with 1 (padding with 0). Decoding maps ids back to text.

The two tokenizers of the tutorial differ in instructive ways. BERT's WordPiece vocabulary
(30,522 entries) lower-cases the text, splits rare words into a stem and ``##`` pieces, and
wraps every input in ``[CLS] ... [SEP]``. GPT-2's byte-level BPE (50,257 entries) keeps case,
glues the leading space to each word, adds no special tokens, and can encode any byte string,
so decoding gives the exact text back; WordPiece has an unknown token, and what becomes
``[UNK]`` is lost.

For pretraining, documents are cut into blocks of a fixed length (128 tokens here): each
document yields consecutive blocks and its last, shorter block is dropped.
"""

from __future__ import annotations

import pytest

from lmcheck import chunk_documents, inspect_tokens, round_trip
from lmcheck.recipes import DEFAULTS
from lmcheck.tutorial import expected

SENTENCE = DEFAULTS["masked_sentence"]  # "Life is like a [MASK] of chocolates."
PROMPT = DEFAULTS["causal_prompt"]  # "Swimming at the beach is"


def test_bert_encodes_the_seed_sentence(bert_tokenizer):
    """BERT's tokenizer turns the seed sentence into 11 ids, [CLS] and [SEP] included."""
    encoding = bert_tokenizer(SENTENCE)
    assert encoding["input_ids"] == list(expected.BERT_SENTENCE_IDS)
    assert encoding["attention_mask"] == [1] * 11


def test_bert_splits_chocolates_into_a_stem_and_a_piece(bert_tokenizer):
    """'chocolates' is not in the vocabulary: it becomes 'chocolate' + '##s'."""
    assert bert_tokenizer.decode([7967]) == "chocolate"
    table = inspect_tokens(bert_tokenizer, SENTENCE)
    assert [row.token for row in table][7:9] == ["chocolate", "##s"]


def test_gpt2_encodes_the_seed_prompt(gpt2_tokenizer):
    """GPT-2's tokenizer gives six ids for the prompt and a mask of ones."""
    encoding = gpt2_tokenizer(PROMPT)
    assert encoding["input_ids"] == list(expected.GPT2_PROMPT_IDS)
    assert encoding["attention_mask"] == [1] * 6


def test_gpt2_ids_decode_with_their_leading_space(gpt2_tokenizer):
    """Id 257 is ' a': the space belongs to the token, so appending ids appends words."""
    assert gpt2_tokenizer.decode([257]) == " a"
    assert gpt2_tokenizer.decode([*expected.GPT2_PROMPT_IDS, 257]) == PROMPT + " a"


@pytest.mark.parametrize(
    ("fixture", "size"), [("bert_tokenizer", 30522), ("gpt2_tokenizer", 50257)], ids=["bert", "gpt2"]
)
def test_vocabulary_sizes(request, fixture, size):
    """The vocabularies have the sizes of the published models."""
    assert len(request.getfixturevalue(fixture)) == size


def test_bert_adds_special_tokens_and_gpt2_does_not(bert_tokenizer, gpt2_tokenizer):
    """BERT marks the start and end of its input; GPT-2 adds nothing to the text."""
    bert_rows = inspect_tokens(bert_tokenizer, SENTENCE)
    assert [(row.position, row.token) for row in bert_rows if row.special] == [
        (0, "[CLS]"), (5, "[MASK]"), (10, "[SEP]")
    ]
    gpt2_rows = inspect_tokens(gpt2_tokenizer, PROMPT)
    assert not any(row.special for row in gpt2_rows)
    assert gpt2_tokenizer.pad_token is None  # GPT-2 has no pad token: padding needs one set


def test_the_token_table_reads_like_the_tutorial(gpt2_tokenizer):
    """inspect_tokens gives position, id, token, decoded piece, special flag and mask per token."""
    table = inspect_tokens(gpt2_tokenizer, PROMPT)
    assert table.input_ids == list(expected.GPT2_PROMPT_IDS)
    assert [row.piece for row in table] == ["Sw", "imming", " at", " the", " beach", " is"]
    printed = str(table).splitlines()
    assert printed[0].split() == ["pos", "id", "token", "decoded", "special", "mask"]
    assert len(printed) == 7


def test_chunking_keeps_only_full_blocks_and_reports_the_rest(gpt2_tokenizer, wiki_split):
    """The training documents become 128-token chunks; the remainders are counted as dropped."""
    chunks, stats = chunk_documents(gpt2_tokenizer, wiki_split["train"], context_length=128)
    assert {len(ids) for ids in chunks["input_ids"]} == {128}
    assert stats.chunks == len(chunks) > 1000
    assert stats.tokens_kept == 128 * stats.chunks
    assert stats.tokens_kept + stats.tokens_dropped == stats.tokens_total
    # each document loses at most one partial block
    assert 0 < stats.tokens_dropped < 128 * stats.documents
    # docs/tutorial/tokenizers.md quotes these numbers for the default split's 50 training documents
    assert stats.documents == 50
    assert (stats.chunks, stats.tokens_kept, stats.tokens_dropped) == (2_266, 290_048, 2_906)


def test_chunks_are_consecutive_slices_of_their_document(gpt2_tokenizer, wiki_split):
    """Chunk k of a document is tokens [128k, 128(k+1)) of that document's encoding."""
    chunks, _ = chunk_documents(gpt2_tokenizer, wiki_split["train"].select(range(3)), context_length=128)
    first_document = [ids for ids, doc in zip(chunks["input_ids"], chunks["document"], strict=False) if doc == 0]
    full = gpt2_tokenizer(wiki_split["train"][0]["text"])["input_ids"]
    assert first_document == [full[i: i + 128] for i in range(0, len(full) - 127, 128)]


def test_byte_level_bpe_gives_every_article_back_exactly(gpt2_tokenizer, wiki_documents):
    """GPT-2 encodes bytes, so decoding gives each of the 106 articles back character for character."""
    result = round_trip(gpt2_tokenizer, wiki_documents["text"])
    assert result, result.explanation
    assert result.metrics["texts"] == len(wiki_documents) == 106


def test_wordpiece_loses_the_characters_outside_its_vocabulary(bert_tokenizer, wiki_documents):
    """BERT's WordPiece re-encodes its own output to the same ids, but has an unknown token:
    22 pieces of 4 articles (letters such as 'Ⱥ' and 'Ȣ', a caron, a Chinese character) become
    [UNK], and the characters behind them are gone."""
    strict = round_trip(bert_tokenizer, wiki_documents["text"])
    assert not strict
    assert strict.metrics["unknown_tokens"] == 22
    assert [row["lost"] for row in strict.details] == ["Ⱥ", "ˇ", "Ȣ", "拉"]
    assert "7 pieces became [UNK], e.g. 'Ⱥ'" in strict.explanation
    assert strict.metrics["lost_to_unknown"] == list(strict.details)
    lenient = round_trip(bert_tokenizer, wiki_documents["text"], allow_unknown=True)
    assert lenient, lenient.explanation  # apart from [UNK], decode and re-encode agree everywhere
    assert lenient.metrics["lost_to_unknown"] == list(strict.details)  # allowed, and still named
