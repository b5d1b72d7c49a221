"""Tests of the ready-made checks for users' own models: ``lmcheck.suite`` and ``lmcheck check``."""

from __future__ import annotations

import json

import pytest

from lmcheck.cli import main
from lmcheck.models import gpt2_from_scratch
from lmcheck.suite import CAUSAL_CHECKS


@pytest.fixture(scope="module")
def user_model_folder(tmp_path_factory, gpt2_tokenizer):
    """A user's own causal LM on disk: a tiny GPT-2 with random weights, saved as safetensors."""
    folder = tmp_path_factory.mktemp("my-model")
    gpt2_from_scratch(gpt2_tokenizer, preset="gpt2-tiny-cpu").save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


def test_check_command_runs_every_check_on_a_users_model(user_model_folder, tmp_path, capsys):
    target = tmp_path / "results.json"
    assert main(["check", str(user_model_folder), "--prompt", "Hello there", "--prompt",
                 "The capital of France is", "--json", str(target)]) == 0
    results = json.loads(target.read_text())
    assert [r["name"] for r in results] == list(CAUSAL_CHECKS)
    assert all(r["passed"] for r in results)
    assert f"{len(CAUSAL_CHECKS)} of {len(CAUSAL_CHECKS)} checks passed" in capsys.readouterr().out


def test_check_command_names_a_missing_model(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_the_pytest_suite_runs_against_a_users_model(pytester, user_model_folder):
    result = pytester.runpytest_subprocess("--pyargs", "lmcheck.suite", "-p", "no:cacheprovider",
                                           f"--lmcheck-model={user_model_folder}")
    result.assert_outcomes(passed=len(CAUSAL_CHECKS))


def test_the_pytest_suite_skips_without_a_model(pytester):
    result = pytester.runpytest_subprocess("--pyargs", "lmcheck.suite", "-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=len(CAUSAL_CHECKS))
    result.stdout.fnmatch_lines(["*no model given: pass --lmcheck-model NAME_OR_PATH*"])
