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

__all__ = ["CAUSAL_CHECKS", "DEFAULT_PROMPTS", "load_model_for_checks", "run_causal_checks"]

# prompts of different lengths (so a batch needs left padding), shared with chapter 3
DEFAULT_PROMPTS: tuple[str, ...] = tuple(DEFAULTS["causal_prompts"])

Check = Callable[[torch.nn.Module, PreTrainedTokenizerBase, Sequence[str]], Result]


def _first_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> torch.Tensor:
    return torch.tensor([tokenizer(prompts[0])["input_ids"]])  # (1, T)


CAUSAL_CHECKS: dict[str, Check] = {
    "greedy_matches_generate": lambda m, t, p: greedy_matches_generate(m, t, list(p), max_new_tokens=20),
    "kv_cache_matches_full": lambda m, t, p: kv_cache_matches_full(m, _first_prompt_ids(t, p)),
    "padding_invariance": lambda m, t, p: padding_invariance(m, t, list(p)),
    "batch_invariance": lambda m, t, p: batch_invariance(m, t, list(p)),
    "causality": lambda m, t, p: causality(m, _first_prompt_ids(t, p)),
}


def run_causal_checks(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
) -> list[Result]:
    """Every check of :data:`CAUSAL_CHECKS` on one model, in order."""
    return [check(model, tokenizer, prompts) for check in CAUSAL_CHECKS.values()]


def load_model_for_checks(name_or_path: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The user's causal LM and tokenizer, ready for the checks: padding needs a pad token, so a
    tokenizer without one pads with eos (the padded positions are masked out anyway)."""
    model, tokenizer = load_causal_lm(name_or_path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
