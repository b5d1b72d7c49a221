"""Tests of lmcheck's pytest plugin, each a pytest run over a user's test file.

The runs are in-process (pytester gives each a fresh config and restores ``sys.modules``; the
plugin comes from its entry point as in any run). The first test starts a separate pytest
process, as a user would, so the installed entry point is proven once end to end.
"""

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

@pytest.mark.pretrained("lmcheck-test/not-a-cached-model")
def test_weights():
    pass

@pytest.mark.slow
@pytest.mark.gpu
def test_long_on_gpu():
    pass

def test_records(lmcheck_results):
    lmcheck_results.append(Result(name="probe", passed=True, explanation="fine"))
"""


@pytest.fixture
def user_project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_user=USER_TESTS)
    return pytester


def test_markers_are_registered_for_strict_markers(user_project):
    """In a separate process: the plugin comes from the installed entry point alone."""
    result = user_project.runpytest_subprocess("--strict-markers", "-rs")
    assert result.ret == 0
    # no GPU: only test_records runs; the gpu, slow and pretrained tests skip with their reasons
    result.assert_outcomes(passed=1 if torch.cuda.device_count() == 0 else 2,
                           skipped=5 if torch.cuda.device_count() == 0 else 4)


def test_gpu_tests_skip_with_the_reason(user_project):
    found = torch.cuda.device_count()
    result = user_project.runpytest_inprocess("-rs", "-m", "gpu")
    result.stdout.fnmatch_lines([f"*needs 99 CUDA devices, found {found}*"])
    if found == 0:
        result.stdout.fnmatch_lines(["*needs 1 CUDA device, found 0*"])


def test_slow_tests_run_only_when_asked(user_project):
    skipped = user_project.runpytest_inprocess("-rs", "-k", "long and not gpu")
    skipped.stdout.fnmatch_lines(["*slow test: run with --lmcheck-slow*"])
    ran = user_project.runpytest_inprocess("--lmcheck-slow", "-k", "long and not gpu")
    ran.assert_outcomes(passed=1)


@pytest.mark.parametrize(("expression", "outcomes"), [
    ("slow", {"passed": 1, "skipped": 1}),  # test_long runs; test_long_on_gpu skips for the GPU only
    ("gpu or slow", {"passed": 1, "skipped": 3}),
    ("not slow", {"passed": 1, "skipped": 3}),  # "slow" is in the text, yet slow is not selected
    ("gpu", {"skipped": 3}),  # selected for the GPU, not because it is slow: still skipped
])
def test_slow_follows_the_mark_expression_as_pytest_reads_it(user_project, expression, outcomes):
    if torch.cuda.device_count():
        pytest.skip("the expected outcomes assume no CUDA device")
    result = user_project.runpytest_inprocess("-rs", "-m", expression)
    result.assert_outcomes(**outcomes)


def test_pretrained_skips_with_the_repo_it_needs(user_project):
    result = user_project.runpytest_inprocess("-rs", "-k", "weights")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*lmcheck-test/not-a-cached-model weights are not in the local "
                                 "Hugging Face cache (needs config.json, model.safetensors)*"])


@pytest.mark.parametrize(("marker", "message"), [
    ("gpu(counts=2)", "the gpu marker takes one count, as gpu(2) or gpu(count=2) (got args (), keywords ['counts'])"),
    ("gpu(count=0)", "gpu(count=...) must be an int >= 1 (got 0)"),
    ("gpu('two')", "gpu(count=...) must be an int >= 1 (got 'two')"),
    ("pretrained", "the pretrained marker names the repos it needs"),
    ("pretrained('gpt2', file='x')", "the pretrained marker names the repos it needs"),
])
def test_marker_arguments_are_checked(pytester, marker, message):
    """A typo in a marker is a usage error naming the test, never a silent default."""
    pytester.makepyfile(test_typo=f"import pytest\n\n@pytest.mark.{marker}\ndef test_it():\n    pass\n")
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"test_typo.py::test_it: {message}" in result.stderr.str()


def test_results_are_written_to_json(user_project):
    target = user_project.path / "out" / "results.json"
    result = user_project.runpytest_inprocess("-k", "records", f"--lmcheck-json={target}")
    result.assert_outcomes(passed=1)
    written = json.loads(target.read_text())
    assert written == [{"name": "probe", "passed": True, "status": "pass", "metrics": {}, "threshold": None,
                        "headroom": None, "explanation": "fine", "details": [], "skip_reason": "",
                        "error": ""}]


def test_options_are_documented_in_help(user_project):
    result = user_project.runpytest_inprocess("--help")
    result.stdout.fnmatch_lines(["*language-model checks*", "*--lmcheck-slow*", "*--lmcheck-json=PATH*",
                                 "*--lmcheck-trainer=PACKAGE.MODULE:FUNCTION*"])


def test_expect_pass_makes_not_applicable_a_skip_and_a_failure_a_failure(pytester):
    """A user's own test turns each outcome into its pytest outcome; n/a never passes."""
    pytester.makepyfile(test_outcomes="""
        from lmcheck.pytest_plugin import expect_pass
        from lmcheck.results import Result

        def test_pass():
            expect_pass(Result(name="probe", passed=True, explanation="fine"))

        def test_not_applicable():
            expect_pass(Result.not_applicable("kv_cache_matches_full", "the model has no cache"))

        def test_failure():
            expect_pass(Result(name="causality", passed=False, explanation="position 3 sees the future"))
    """)
    result = pytester.runpytest_inprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1, failed=1)
    result.stdout.fnmatch_lines(["*causality: position 3 sees the future*",
                                 "*kv_cache_matches_full: not applicable: the model has no cache*"])
    result.stdout.no_fnmatch_line("*Traceback*")
