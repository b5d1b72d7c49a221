"""Library tests of lmcheck.tokens and lmcheck.corpus: bad input, edge cases, negative controls."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import pytest

from lmcheck import (
    InputError,
    chunk_documents,
    inspect_tokens,
    load_documents,
    load_tokenizer,
    round_trip,
)
from lmcheck.corpus import split_documents, wiki_to_text


@pytest.mark.parametrize(("text", "match"), [("", "must be a non-empty str"), (None, "must be a str"), (42, "must be a str")],
                         ids=["empty", "none", "int"])
def test_inspect_tokens_rejects_bad_text(gpt2_tokenizer, text, match):
    with pytest.raises(InputError, match=rf"'text' {match}"):
        inspect_tokens(gpt2_tokenizer, text)


def test_round_trip_fails_on_a_lossy_tokenizer(gpt2_tokenizer):
    """Negative control: a tokenizer that drops a character cannot pass the exact round trip."""

    class Lossy:
        backend_tokenizer = gpt2_tokenizer.backend_tokenizer

        def encode(self, text, **options):
            return gpt2_tokenizer.encode(text.replace("é", "e"), **options)

        def decode(self, ids):
            return gpt2_tokenizer.decode(ids)

    result = round_trip(Lossy(), ["fine", "café au lait"])
    assert not result
    assert "1 of 2 texts" in result.explanation
    assert "text 1" in result.explanation


def test_round_trip_rejects_an_empty_collection(gpt2_tokenizer):
    with pytest.raises(InputError, match="'texts'"):
        round_trip(gpt2_tokenizer, [])


@pytest.mark.parametrize("length", [0, -5, 1.5, "128"], ids=["zero", "negative", "float", "str"])
def test_chunk_documents_rejects_bad_context_length(gpt2_tokenizer, length):
    with pytest.raises(InputError, match="'context_length' must be an int >= 1"):
        chunk_documents(gpt2_tokenizer, ["some text"], length)


def test_a_short_document_gives_no_chunk_and_is_counted(gpt2_tokenizer):
    """A document shorter than the context is dropped whole, not an error."""
    chunks, stats = chunk_documents(gpt2_tokenizer, ["too short", " word" * 300], context_length=128)
    assert stats.documents == 2
    assert stats.documents_without_chunks == 1
    assert stats.chunks == len(chunks) == 2  # 300 tokens: two full blocks, 44 dropped
    assert stats.tokens_dropped == 2 + 44
    assert set(chunks["document"]) == {1}


def test_all_documents_too_short_gives_zero_chunks(gpt2_tokenizer):
    chunks, stats = chunk_documents(gpt2_tokenizer, ["a", "b c"], context_length=128)
    assert len(chunks) == 0
    assert stats.chunks == 0
    assert stats.documents_without_chunks == 2


def test_split_is_seeded_and_disjoint(wiki_documents):
    first = split_documents(wiki_documents, n_train=50, n_valid=50, seed=0)
    again = split_documents(wiki_documents, n_train=50, n_valid=50, seed=0)
    other = split_documents(wiki_documents, n_train=50, n_valid=50, seed=1)
    assert first["train"]["title"] == again["train"]["title"]
    assert first["train"]["title"] != other["train"]["title"]
    assert not set(first["train"]["title"]) & set(first["validation"]["title"])


def test_split_larger_than_the_documents_is_refused(wiki_documents):
    with pytest.raises(InputError, match=r"'n_train' \+ 'n_valid' must be at most .* 106 \(got 100 \+ 50 = 150\)"):
        split_documents(wiki_documents, n_train=100, n_valid=50)


def test_wiki_sample_is_clean_plain_text(wiki_documents):
    """Real articles only, with no templates, references, tables, files or categories left."""
    assert len(wiki_documents) == 106
    assert wiki_documents.column_names == ["title", "text"]
    titles = set(wiki_documents["title"])
    assert {"Anarchism", "Autism", "Albert Einstein"} <= titles
    text = "\n".join(wiki_documents["text"])
    for markup in ("{{", "}}", "<ref", "{|", "[[", "]]", "[[File:", "Category:", "thumb|"):
        assert markup not in text, markup


def test_wiki_markup_is_stripped():
    wikitext = (
        "'''Bold''' text{{cite web|url=x}} with a [[Link|label]].<ref>source</ref>\n"
        "[[File:X.png|thumb|caption]]\n{| class=wikitable\n| cell\n|}\n[[Category:Things]]"
    )
    assert wiki_to_text(wikitext) == "Bold text with a label."


def test_local_documents_load_from_jsonl_and_txt(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]))
    loaded = load_documents(path)
    assert loaded["text"] == ["one", "two"]
    assert loaded.column_names == ["title", "text"]
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("alpha")
    assert load_documents(tmp_path / "folder")["text"] == ["alpha"]


@pytest.mark.parametrize("source", ["no-such-source", 3], ids=["unknown", "int"])
def test_unknown_source_lists_the_known_ones(source):
    with pytest.raises(InputError, match="'source' must be one of wiki-sample, wikipedia"):
        load_documents(source)


def test_jsonl_without_text_column_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"body": "x"}))
    with pytest.raises(InputError, match="'text' column"):
        load_documents(path)


def test_chunk_documents_names_a_non_string_document(gpt2_tokenizer):
    with pytest.raises(InputError, match=r"'documents\[1\]' must be a str"):
        chunk_documents(gpt2_tokenizer, ["ok", None])
    with pytest.raises(InputError, match="'documents' must have a 'text' column"):
        chunk_documents(gpt2_tokenizer, datasets.Dataset.from_dict({"body": ["x"]}))


def test_an_unknown_tokenizer_name_is_a_clear_error_offline():
    """In Hugging Face offline mode a name that is not cached fails at once, naming it."""
    code = ("from lmcheck import load_tokenizer\n"
            "try:\n    load_tokenizer('no-such-org/no-such-tokenizer')\n"
            "except ValueError as error:\n    print(type(error).__name__, error)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.startswith("InputError tokenizer 'no-such-org/no-such-tokenizer' is neither")
    assert "offline tokenizers are bert-base-uncased, gpt2" in out


def test_a_local_tokenizer_folder_loads_through_auto_tokenizer(gpt2_tokenizer, tmp_path):
    gpt2_tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert len(loaded) == 50257
    assert loaded("Swimming at the beach is")["input_ids"] == [10462, 27428, 379, 262, 10481, 318]


def test_text_lost_to_the_unknown_token_fails_the_round_trip(bert_tokenizer, gpt2_tokenizer):
    """Negative control: '[UNK]' decodes and re-encodes to itself, yet the llama is gone."""
    text = "The llama 🦙 grazes."
    result = round_trip(bert_tokenizer, text)
    assert not result
    assert "1 pieces became [UNK], e.g. '🦙'" in result.explanation
    assert round_trip(bert_tokenizer, text, allow_unknown=True).metrics["unknown_tokens"] == 1
    assert round_trip(gpt2_tokenizer, text)  # bytes: nothing is unknown
