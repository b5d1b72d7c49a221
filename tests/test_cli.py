"""Tests of the ``lmcheck`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmcheck.cli import main
from lmcheck.setup import SETUP_CHECKS


def test_tutorial_chapter_one_prints_tokens_and_a_summary(tmp_path, capsys):
    assert main(["tutorial", "--chapter", "1", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Chapter 1: tokenizers" in out
    assert "10462" in out
    assert "'chocolate'" in out
    assert "chunks of 128 tokens" in out
    assert "checks passed" in out
    results = json.loads((tmp_path / "tutorial-results.json").read_text())
    assert results
    assert all(r["passed"] for r in results)


@pytest.fixture
def trained_once(monkeypatch, memorized_bert, bert_tokenizer, wiki_split):
    """Chapter 2 trains the same tiny BERT as the session's ``memorized_bert`` (same tokenizer,
    documents and recipe, all checked here): the chapter gets that run instead of a second one."""
    from lmcheck.loops.masked import MASKED_CPU

    def the_session_run(tokenizer, train_documents, heldout_documents, config=MASKED_CPU, **overrides):
        assert tokenizer.get_vocab() == bert_tokenizer.get_vocab()
        assert train_documents["text"] == wiki_split["train"]["text"]
        assert heldout_documents["text"] == wiki_split["validation"]["text"]
        assert (config, overrides) == (MASKED_CPU, {})
        return memorized_bert
    monkeypatch.setattr("lmcheck.tutorial.ch2_masked.memorize_chunks", the_session_run)


def _passes_every_check(number, tmp_path, capsys):
    """The main job's chapter ``number`` (quick mode): every check the chapter prints passes."""
    assert main(["tutorial", "--chapter", str(number), "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "tutorial-results.json").read_text())
    assert len(results) >= 5
    assert [r["name"] for r in results if not r["passed"]] == []
    assert f"Chapter {number}:" in capsys.readouterr().out


def test_tutorial_chapter_two_passes_its_checks(trained_once, tmp_path, capsys):
    _passes_every_check(2, tmp_path, capsys)


@pytest.mark.parametrize("number", [3, 4], ids=["causal", "pretraining"])
def test_every_later_tutorial_chapter_passes_its_checks(number, tmp_path, capsys):
    _passes_every_check(number, tmp_path, capsys)


def test_unknown_chapter_is_a_clear_error(tmp_path, capsys):
    assert main(["tutorial", "--chapter", "9", "--out", str(tmp_path)]) == 2
    assert "'--chapter' must be one of" in capsys.readouterr().err


# ---------------------------------------------------------------- lmcheck train-check


@pytest.fixture
def setup_factories(monkeypatch):
    """``tests/setup_factories.py`` importable as ``setup_factories``, as a user's module would be."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_train_check_passes_a_healthy_trainer_and_writes_json_and_markdown(setup_factories, tmp_path, capsys):
    target = tmp_path / "report" / "setup.json"
    markdown = tmp_path / "report" / "setup.md"
    assert main(["train-check", "setup_factories:trainer", "--overfit-steps", "100",
                 "--json", str(target), "--markdown", str(markdown)]) == 0
    out = capsys.readouterr().out
    # its rows are padded, not packed, it has no adapter, and it is neither a preference nor an RL
    # trainer: four n/a
    assert f"{len(SETUP_CHECKS) - 4} of {len(SETUP_CHECKS)} checks passed, 4 not applicable" in out
    assert out.count(" PASS ") == len(SETUP_CHECKS) - 4  # one table row per check
    assert "kind: transformers Trainer" in out
    written = json.loads(target.read_text())
    assert written["passed"] is True
    assert [r["name"] for r in written["results"]] == list(SETUP_CHECKS)
    assert written["curve"]["train"]
    assert "training-setup report: PASS" in markdown.read_text()
    assert markdown.with_name("setup-loss-curve.png").stat().st_size > 0
    assert "![loss curve](setup-loss-curve.png)" in markdown.read_text()


def test_train_check_fails_a_loop_that_steps_its_scheduler_per_micro_batch(setup_factories, capsys):
    assert main(["train-check", "setup_factories:scheduler_per_micro_batch", "--overfit-steps", "100"]) == 1
    out = " ".join(capsys.readouterr().out.split())  # as one line: the console wraps long ones
    assert "FAIL lr_schedule: at optimizer step" in out
    assert "the scheduler is stepped on every micro-batch" in out
    # the loop has no checkpoint functions: resume is not applicable; nor is packing_equivalence
    assert f"{len(SETUP_CHECKS) - 6} of {len(SETUP_CHECKS)} checks passed, 5 not applicable" in out


@pytest.mark.parametrize(("spec", "message"), [
    ("train.py", "the training setup must be named as package.module:function"),
    ("no_such_module:make", "training setup 'no_such_module:make': importing 'no_such_module' failed"),
    ("setup_factories:nothing", "setup_factories has no function 'nothing'"),
    ("setup_factories:broken", "training setup 'setup_factories:broken' raised RuntimeError: no training data"),
    ("setup_factories:not_a_setup", "must return a transformers.Trainer, (model, train_step, batches) or a "
                                    "mapping of check_loop's arguments (got 'trainer.pt'"),
])
def test_train_check_names_a_setup_it_cannot_load_in_one_line(spec, message, setup_factories, capsys):
    assert main(["train-check", spec]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("lmcheck: error: ")
    assert captured.out == ""
