"""Session-scoped fixtures shared by the tests and the benchmarks: expensive things made once."""

from __future__ import annotations

import gc
import os

# For the processes the tests start (the torchrun ranks): idle OpenMP threads sleep instead of
# spinning, since there they share the cores. This process itself has imported torch already
# (lmcheck's pytest plugin loads before any conftest), so its threads keep libgomp's default, a
# short spin, which is the faster one on an idle machine (the measurements: docs/performance.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist each worker gets its share of the cores (and so do the processes it starts):
# workers of one thread each beat one process of many threads, and oversubscribed workers lose
# to both (the measurements: docs/performance.md).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, _CORES // _WORKERS))

from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402

from lmcheck._allocator import keep_freed_blocks  # noqa: E402
from lmcheck.recipes import DEFAULTS  # noqa: E402

if TYPE_CHECKING:  # the rest is imported where it is used: xdist's controller starts the workers
    import datasets  # without waiting for transformers and datasets, which only the workers need
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

pytest_plugins = ["pytester"]  # for the plugin's own tests

if _WORKERS > 1:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported first
keep_freed_blocks()  # the training steps reuse their freed gradients instead of faulting pages in


# Test files that share the session's trained BERT (``memorized_bert``, seconds to train).
SHARE_THE_TRAINED_BERT = frozenset({"test_02_masked_lm.py", "test_masked.py", "test_cli.py"})
# Under pytest-xdist the longest units start first and the short files come last, so that no
# worker is left running a long file alone at the end (the longest: the files that share the
# trained BERT, chapter 4's, the training probes', the torchrun launches'; pytest --durations
# gives the current order).
LONGEST_FIRST = (*sorted(SHARE_THE_TRAINED_BERT), "test_04_pretraining.py", "test_training.py",
                 "test_distributed.py", "test_03_causal_lm.py", "test_setup_checks.py", "test_suite.py",
                 "test_fuzz.py", "test_04_gpu.py", "test_golden.py", "test_01_tokenizers.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "PYTEST_XDIST_WORKER" in os.environ:  # every worker collects, and sorts, alike
        items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name)
                   if item.path.name in LONGEST_FIRST else len(LONGEST_FIRST))


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without xdist, pytest runs on
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``--dist loadfile`` (the README's test command), with the files that share the trained
    BERT sent to one worker as one unit, so that it is trained once. A file's tests stay on one
    worker in file order, so its module fixtures (chapter 4's run, the distributed launches) are
    made once; the units go out in collection order (see LONGEST_FIRST), not xdist's
    most-tests-first."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "memorized_bert" if path.rsplit("/", 1)[-1] in SHARE_THE_TRAINED_BERT else path

    return FileScheduling(config, log)


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
    from lmcheck.tokens import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture(scope="session")
def gpt2_tokenizer_with_pad() -> PreTrainedTokenizerBase:
    """A separate copy of GPT-2's tokenizer whose pad token is eos (batches need one; the
    attention mask hides the pads). No test changes it."""
    from lmcheck.tokens import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="session")
def bert_tokenizer() -> PreTrainedTokenizerBase:
    """bert-base-uncased's WordPiece tokenizer, built offline (30,522 tokens)."""
    from lmcheck.tokens import load_tokenizer

    return load_tokenizer("bert-base-uncased")


@pytest.fixture(scope="session")
def wiki_documents() -> datasets.Dataset:
    """The 106 articles of the Wikipedia sample, as plain text."""
    from lmcheck.corpus import load_documents

    return load_documents(DEFAULTS["documents"])


@pytest.fixture(scope="session")
def wiki_split(wiki_documents: datasets.Dataset) -> datasets.DatasetDict:
    """The embedded default's seeded split: 50 training and 50 validation documents."""
    from lmcheck.corpus import split_documents

    return split_documents(
        wiki_documents, n_train=DEFAULTS["n_train"], n_valid=DEFAULTS["n_valid"],
        seed=DEFAULTS["split_seed"],
    )


@pytest.fixture(scope="session")
def smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (float32, eval mode) and its tokenizer, from the offline assets.

    The first run converts the GGUF asset to safetensors in the cache (about 8 s); later runs
    load that in about a second.
    """
    from lmcheck.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def memorized_bert(bert_tokenizer: PreTrainedTokenizerBase, wiki_split: datasets.DatasetDict) -> object:
    """Chapter 2's tiny BERT, trained once per run until it has memorized 8 chunks (6-9 s)."""
    from lmcheck.loops.masked import memorize_chunks

    return memorize_chunks(bert_tokenizer, wiki_split["train"], wiki_split["validation"])
