"""The causal-LM checks, run against the model named by ``--lmcheck-model``.

    pytest --pyargs lmcheck.suite --lmcheck-model ./my-model [--lmcheck-prompt "..."]
    pytest --pyargs lmcheck.suite --lmcheck-model my_project.lm:build [--lmcheck-tokenizer gpt2]
"""

from __future__ import annotations

import pytest

from lmcheck.batteries import CAUSAL_CHECKS, GREEDY_STEPS, model_family, run_check
from lmcheck.pytest_plugin import expect_pass


@pytest.mark.parametrize("check", list(CAUSAL_CHECKS), ids=list(CAUSAL_CHECKS))
def test_causal_lm(check, lmcheck_model, lmcheck_prompts, lmcheck_results):
    """The model passes the check; on failure the explanation locates the problem; a check the
    model cannot take (no attention mask, no KV cache, no generate) is skipped with the reason; one that raises is an error with the exception and where it came from."""
    model, tokenizer = lmcheck_model
    if model_family(model) != "causal":
        pytest.skip("a masked LM: the masked battery runs instead")
    result = run_check(check, CAUSAL_CHECKS[check], model, tokenizer, lmcheck_prompts, GREEDY_STEPS)
    lmcheck_results.append(result)
    expect_pass(result)
