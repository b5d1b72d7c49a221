"""Session-scoped fixtures shared by the tests and the benchmarks: expensive things made once."""

from __future__ import annotations

import gc
import os

# Before torch is imported: idle OpenMP threads sleep instead of spinning. On a small shared
# machine (2 cores, pytest-xdist or other jobs beside the tests) spinning threads halve the speed.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datasets  # noqa: E402
import pytest  # noqa: E402
from transformers import PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402

from lmcheck.corpus import load_documents, split_documents  # noqa: E402
from lmcheck.defaults import DEFAULTS  # noqa: E402
from lmcheck.models import load_smollm2  # noqa: E402
from lmcheck.tokens import load_tokenizer  # noqa: E402

pytest_plugins = ["pytester"]  # for the plugin's own tests


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move everything made so far (modules, collected tests, torch and transformers) out of the
    garbage collector's sight. Every ``Trainer.train()`` runs a full ``gc.collect()`` (accelerate's
    ``free_memory``); over this heap each took about 0.16 s, some 15 s per 90 Trainer runs. Objects
    made later are still collected as usual."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """GPT-2's byte-level BPE tokenizer, built offline (50,257 tokens, no pad token)."""
    return load_tokenizer("gpt2")


@pytest.fixture(scope="session")
def gpt2_tokenizer_with_pad() -> PreTrainedTokenizerBase:
    """A separate copy of GPT-2's tokenizer whose pad token is eos (batches need one; the
    attention mask hides the pads). No test changes it."""
    tokenizer = load_tokenizer("gpt2")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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


@pytest.fixture(scope="session")
def smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (float32, eval mode) and its tokenizer, from the offline assets.

    The first run converts the GGUF asset to safetensors in the cache (about 30 s); later runs
    load that in about a second.
    """
    return load_smollm2()


@pytest.fixture(scope="session")
def memorized_bert(bert_tokenizer: PreTrainedTokenizerBase, wiki_split: datasets.DatasetDict) -> object:
    """Chapter 2's tiny BERT, trained once per run until it has memorized 8 chunks (~20 s)."""
    from lmcheck.loops.masked import memorize_chunks

    return memorize_chunks(bert_tokenizer, wiki_split["train"], wiki_split["validation"])
