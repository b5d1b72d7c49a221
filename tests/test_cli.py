"""Tests of the ``lmcheck`` command."""

from __future__ import annotations

import json

import pytest

from lmcheck.cli import main


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


@pytest.mark.parametrize("number", [2, 3, 4], ids=["masked", "causal", "pretraining"])
def test_every_tutorial_chapter_passes_its_checks(number, tmp_path, capsys):
    """The main job, chapter by chapter (quick mode): every check the chapter prints passes."""
    assert main(["tutorial", "--chapter", str(number), "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "tutorial-results.json").read_text())
    assert len(results) >= 5
    assert [r["name"] for r in results if not r["passed"]] == []
    assert f"Chapter {number}:" in capsys.readouterr().out


def test_unknown_chapter_is_a_clear_error(tmp_path, capsys):
    assert main(["tutorial", "--chapter", "9", "--out", str(tmp_path)]) == 2
    assert "'--chapter' must be one of" in capsys.readouterr().err
