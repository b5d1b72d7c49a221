"""Session-scoped fixtures shared by the tests and the benchmarks: expensive things made once."""

from __future__ import annotations

import datasets
import pytest
from transformers import PreTrainedTokenizerBase

from lmcheck.corpus import load_documents, split_documents
from lmcheck.defaults import DEFAULTS
from lmcheck.tokens import load_tokenizer

pytest_plugins = ["pytester"]  # for the plugin's own tests


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """GPT-2's byte-level BPE tokenizer, built offline (50,257 tokens, no pad token)."""
    return load_tokenizer("gpt2")


@pytest.fixture(scope="session")
def bert_tokenizer() -> PreTrainedTokenizerBase:
    """bert-base-uncased's WordPiece tokenizer, built offline (30,522 tokens)."""
    return load_tokenizer("bert-base-uncased")


@pytest.fixture(scope="session")
def wiki_documents() -> datasets.Dataset:
    """The 106 articles of the Wikipedia sample, as plain text."""
    return load_documents(DEFAULTS["documents"])


@pytest.fixture(scope="session")
def wiki_split(wiki_documents: datasets.Dataset) -> datasets.DatasetDict:
    """The embedded default's seeded split: 50 training and 50 validation documents."""
    return split_documents(
        wiki_documents, n_train=DEFAULTS["n_train"], n_valid=DEFAULTS["n_valid"],
        seed=DEFAULTS["split_seed"],
    )