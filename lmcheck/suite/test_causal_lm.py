"""The causal-LM checks, run against the model named by ``--lmcheck-model``.

    pytest --pyargs lmcheck.suite --lmcheck-model ./my-model [--lmcheck-prompt "..."]
"""

from __future__ import annotations

import pytest

from lmcheck.suite import CAUSAL_CHECKS, GREEDY_STEPS


@pytest.mark.parametrize("check", list(CAUSAL_CHECKS), ids=list(CAUSAL_CHECKS))
def test_causal_lm(check, lmcheck_causal_lm, lmcheck_prompts, lmcheck_results):
    """The model passes the check; on failure the explanation locates the problem."""
    model, tokenizer = lmcheck_causal_lm
    result = CAUSAL_CHECKS[check](model, tokenizer, lmcheck_prompts, GREEDY_STEPS)
    lmcheck_results.append(result)
    assert result, result.explanation
