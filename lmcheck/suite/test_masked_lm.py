"""The masked-LM checks, run against the model named by ``--lmcheck-model``.

    pytest --pyargs lmcheck.suite --lmcheck-model ./my-bert [--lmcheck-cloze-threshold 0.5]
"""

from __future__ import annotations

import pytest

from lmcheck.batteries import MASKED_CHECKS, model_family, run_check
from lmcheck.pytest_plugin import expect_pass


@pytest.mark.parametrize("check", list(MASKED_CHECKS), ids=list(MASKED_CHECKS))
def test_masked_lm(check, lmcheck_model, lmcheck_cloze_threshold, lmcheck_results):
    """The masked LM fills a mask, reads both sides, ignores pads, and has a sane loss at init
    (or, given a threshold, the cloze accuracy of a trained model)."""
    model, tokenizer = lmcheck_model
    if model_family(model) != "masked":
        pytest.skip("a causal LM: the causal battery runs instead")
    result = run_check(check, MASKED_CHECKS[check], model, tokenizer, lmcheck_cloze_threshold)
    lmcheck_results.append(result)
    expect_pass(result)
