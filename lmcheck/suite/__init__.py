"""Ready-made checks for your own causal LM: as pytest tests, and as ``lmcheck check``.

Run them against any causal LM that ``transformers`` can load (a local folder, or a Hub name in
your Hugging Face cache)::

    pytest --pyargs lmcheck.suite --lmcheck-model ./my-model
    lmcheck check ./my-model

Both run the checks in :data:`CAUSAL_CHECKS`, one test (or one report line) each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from lmcheck.causal import causality, greedy_matches_generate, kv_cache_matches_full
from lmcheck.defaults import DEFAULTS
from lmcheck.invariance import batch_invariance, padding_invariance
from lmcheck.models import load_causal_lm
from lmcheck.results import Result

__all__ = ["CAUSAL_CHECKS", "DEFAULT_PROMPTS", "GREEDY_STEPS", "load_model_for_checks", "run_causal_checks"]

# prompts of different lengths (so a batch needs left padding), shared with chapter 3
DEFAULT_PROMPTS: tuple[str, ...] = tuple(DEFAULTS["causal_prompts"])

Check = Callable[[torch.nn.Module, PreTrainedTokenizerBase, Sequence[str], int], Result]


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])  # (1, T)


def _longest(prompts: Sequence[str]) -> str:
    return max(prompts, key=len)


# The causal battery and its arguments: the one table that the ready pytest suite, `lmcheck check`,
# chapter 3 of the tutorial and its tests all run. Each check gets the model, its tokenizer, the
# prompts (of different lengths, so a batch of them needs left padding) and the greedy steps.
CAUSAL_CHECKS: dict[str, Check] = {
    "greedy_matches_generate": lambda m, t, p, n: greedy_matches_generate(m, t, list(p), max_new_tokens=n),
    # the longest prompt: the cache is read at the most positions
    "kv_cache_matches_full": lambda m, t, p, n: kv_cache_matches_full(m, _ids(t, _longest(p))),
    "padding_invariance": lambda m, t, p, n: padding_invariance(m, t, list(p)),
    "batch_invariance": lambda m, t, p, n: batch_invariance(m, t, list(p)),
    "causality": lambda m, t, p, n: causality(m, _ids(t, p[0])),
}
GREEDY_STEPS = 20  # tokens each greedy comparison decodes (chapter 3's quick mode: 10)


def run_causal_checks(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] = DEFAULT_PROMPTS, *, max_new_tokens: int = GREEDY_STEPS,
) -> list[Result]:
    """Every check of :data:`CAUSAL_CHECKS` on one model, in order."""
    return [check(model, tokenizer, prompts, max_new_tokens) for check in CAUSAL_CHECKS.values()]


def load_model_for_checks(name_or_path: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The user's causal LM and tokenizer, ready for the checks: padding needs a pad token, so a
    tokenizer without one pads with eos (the padded positions are masked out anyway)."""
    model, tokenizer = load_causal_lm(name_or_path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
