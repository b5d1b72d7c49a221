"""Tests of lmcheck's pytest plugin, run in a separate pytest process as a user would."""

from __future__ import annotations

import json

import pytest
import torch

USER_TESTS = """
import pytest
from lmcheck import Result

@pytest.mark.gpu
def test_on_one_gpu():
    pass

@pytest.mark.gpu(count=99)
def test_on_many_gpus():
    pass

@pytest.mark.slow
def test_long():
    pass

@pytest.mark.pretrained
def test_weights():
    pass

def test_records(lmcheck_results):
    lmcheck_results.append(Result(name="probe", passed=True, explanation="fine"))
"""


@pytest.fixture
def user_project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_user=USER_TESTS)
    return pytester


def test_markers_are_registered_for_strict_markers(user_project):
    result = user_project.runpytest_subprocess("--strict-markers", "-rs")
    assert result.ret == 0
    result.assert_outcomes(passed=2 if torch.cuda.device_count() == 0 else 3,
                           skipped=3 if torch.cuda.device_count() == 0 else 2)


def test_gpu_tests_skip_with_the_reason(user_project):
    found = torch.cuda.device_count()
    result = user_project.runpytest_subprocess("-rs", "-m", "gpu")
    result.stdout.fnmatch_lines([f"*needs 99 CUDA devices, found {found}*"])
    if found == 0:
        result.stdout.fnmatch_lines(["*needs 1 CUDA device, found 0*"])


def test_slow_tests_run_only_when_asked(user_project):
    skipped = user_project.runpytest_subprocess("-rs", "-k", "long")
    skipped.stdout.fnmatch_lines(["*slow test: run with --lmcheck-slow*"])
    ran = user_project.runpytest_subprocess("--lmcheck-slow", "-k", "long")
    ran.assert_outcomes(passed=1)


def test_results_are_written_to_json(user_project):
    target = user_project.path / "out" / "results.json"
    result = user_project.runpytest_subprocess("-k", "records", f"--lmcheck-json={target}")
    result.assert_outcomes(passed=1)
    written = json.loads(target.read_text())
    assert written == [{"name": "probe", "passed": True, "metrics": {}, "threshold": None,
                        "headroom": None, "explanation": "fine", "details": []}]


def test_options_are_documented_in_help(user_project):
    result = user_project.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*language-model checks*", "*--lmcheck-slow*", "*--lmcheck-json=PATH*"])
