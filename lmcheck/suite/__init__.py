"""Ready-made checks for your own language model: as pytest tests, and as ``lmcheck check``.

Run them against a model that ``transformers`` can load (a local folder, or a Hub name in your
Hugging Face cache), or against your own code through a factory, ``package.module:function``,
that returns a model or ``(model, tokenizer)``::

    pytest --pyargs lmcheck.suite --lmcheck-model ./my-model
    pytest --pyargs lmcheck.suite --lmcheck-model my_project.lm:build --lmcheck-tokenizer gpt2
    lmcheck check ./my-model
    lmcheck check my_project.lm:build

The model's family picks the battery: a causal LM runs :data:`CAUSAL_CHECKS`, a masked LM
:data:`MASKED_CHECKS`, one test (or one report line) each. A check that needs what the model lacks
(an attention-mask argument, a KV cache, ``generate``) is reported as not applicable.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmcheck._finite import probe
from lmcheck._validate import describe
from lmcheck.causal import causality, greedy_matches_generate, kv_cache_matches_full
from lmcheck.cloze import cloze_cases
from lmcheck.corpus import load_documents, split_documents
from lmcheck.defaults import DEFAULTS
from lmcheck.errors import InputError, ModelError
from lmcheck.invariance import batch_invariance, padding_invariance
from lmcheck.masked import (
    bidirectionality,
    encoder_padding_invariance,
    fill_mask,
    mask_fill_accuracy,
    masked_loss_at_init,
)
from lmcheck.models import load_language_model
from lmcheck.results import Result
from lmcheck.tokens import load_tokenizer

__all__ = [
    "CAUSAL_CHECKS",
    "DEFAULT_PROMPTS",
    "GREEDY_STEPS",
    "MASKED_CHECKS",
    "MASKED_TEXTS",
    "load_model_for_checks",
    "model_family",
    "run_causal_checks",
    "run_checks",
]

# prompts of different lengths (so a batch needs left padding), shared with chapter 3
DEFAULT_PROMPTS: tuple[str, ...] = tuple(DEFAULTS["causal_prompts"])
# texts for the masked battery: the tutorial's sentence first ([MASK] is the tokenizer's own)
MASKED_TEXTS: tuple[str, ...] = (
    DEFAULTS["masked_sentence"], "The capital of France is [MASK].",
    "Swimming at the beach is a great way to spend a [MASK] afternoon with friends and family.")

Check = Callable[[torch.nn.Module, PreTrainedTokenizerBase, Sequence[str], int], Result]
MaskedCheck = Callable[[torch.nn.Module, PreTrainedTokenizerBase, "float | None"], Result]


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


@probe("fill_mask")
def _fills_the_mask(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> Result:
    """The tokenizer has a mask token and fill_mask gives finite top-5 probabilities for it."""
    if tokenizer.mask_token is None:
        return Result(name="fill_mask", passed=False,
                      explanation=f"the tokenizer ({type(tokenizer).__name__}) has no mask token: a "
                                  f"masked LM's tokenizer must have one to mark the blanks")
    text = MASKED_TEXTS[0].replace("[MASK]", tokenizer.mask_token)
    predictions = fill_mask(model, tokenizer, text)  # NaN logits: a failed result, through @probe
    top = predictions[0]
    return Result(name="fill_mask", passed=True, metrics={"top_tokens": list(top.tokens),
                                                         "top_probability": top.probabilities[0]},
                  explanation=f"{tokenizer.mask_token} in {MASKED_TEXTS[0]!r} is filled with "
                              f"{', '.join(repr(t) for t in top.tokens)} (p = {top.probabilities[0]:.3f} "
                              f"for the first)")


def _cloze_or_loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                   cloze_threshold: float | None) -> Result:
    """An untrained model's loss at init (None), or a trained one's cloze accuracy on the wiki
    sample's validation documents (top-5), held to ``cloze_threshold``."""
    documents = load_documents(DEFAULTS["documents"])
    valid = split_documents(documents, n_train=DEFAULTS["n_train"], n_valid=DEFAULTS["n_valid"],
                            seed=DEFAULTS["split_seed"])["validation"]
    if cloze_threshold is None:
        return masked_loss_at_init(model, tokenizer, list(valid["text"][:8]))
    cases = cloze_cases(tokenizer, valid, n=40)
    return mask_fill_accuracy(model, tokenizer, cases, top_k=5, threshold=cloze_threshold,
                              name="cloze_accuracy")


# The masked battery: each check gets the model, its tokenizer and the cloze threshold (None: the
# model is untrained, so its loss at init is checked instead of its cloze accuracy).
MASKED_CHECKS: dict[str, MaskedCheck] = {
    "fill_mask": lambda m, t, c: _fills_the_mask(m, t),
    "bidirectionality": lambda m, t, c: bidirectionality(m, t, MASKED_TEXTS[2]),
    "encoder_padding_invariance": lambda m, t, c: encoder_padding_invariance(
        m, t, [s.replace("[MASK]", t.mask_token or "[MASK]") for s in MASKED_TEXTS]),
    "loss_at_init_or_cloze": _cloze_or_loss,
}


def model_family(model: object) -> str:
    """``"masked"`` for a Hugging Face model that cannot generate (``*ForMaskedLM``), else
    ``"causal"`` (every plain or adapted module is taken as causal)."""
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"'model' must be a torch.nn.Module (got {describe(model)})")
    if isinstance(model, PreTrainedModel) and not model.can_generate():
        if type(model).__name__.endswith("ForMaskedLM"):
            return "masked"
        raise ModelError(f"a {type(model).__name__} is neither a causal LM (it cannot generate) nor a "
                         f"masked LM (*ForMaskedLM): lmcheck's batteries check language models")
    return "causal"


def run_causal_checks(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] = DEFAULT_PROMPTS, *, max_new_tokens: int = GREEDY_STEPS,
) -> list[Result]:
    """Every check of :data:`CAUSAL_CHECKS` on one model, in order."""
    return [check(model, tokenizer, prompts, max_new_tokens) for check in CAUSAL_CHECKS.values()]


def run_checks(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] = DEFAULT_PROMPTS, *, max_new_tokens: int = GREEDY_STEPS,
    cloze_threshold: float | None = None,
) -> list[Result]:
    """The battery of the model's family (:func:`model_family`), in order."""
    if model_family(model) == "masked":
        return [check(model, tokenizer, cloze_threshold) for check in MASKED_CHECKS.values()]
    return run_causal_checks(model, tokenizer, prompts, max_new_tokens=max_new_tokens)


_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load_model_for_checks(
    spec: str, tokenizer: str | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The user's model and tokenizer, ready for the checks.

    ``spec`` is a folder or a name in the Hugging Face cache (a causal or a masked LM), or a factory
    ``package.module:function`` that returns a model or ``(model, tokenizer)``. ``tokenizer`` names
    the tokenizer (a folder, a cached name, or one of lmcheck's offline ones, such as ``gpt2``)
    where the factory returns none; default: the offline GPT-2 tokenizer. A tokenizer without a pad
    token pads with eos (the padded positions are masked out anyway).

    Raises:
        InputError: the factory cannot be imported, raises, or returns something else (one line
            that names it); nothing loadable is found under ``spec``.
    """
    if not isinstance(spec, str) or not spec:
        raise InputError(f"'model' must be a folder, a cached model name or package.module:function "
                         f"(got {describe(spec)})")
    if _FACTORY.match(spec) and not os.path.exists(spec):
        model, found = _from_factory(spec)
        if found is None:
            found = load_tokenizer(tokenizer or "gpt2")
        elif tokenizer is not None:
            found = load_tokenizer(tokenizer)
    else:
        model, found = load_language_model(spec)
        if tokenizer is not None:
            found = load_tokenizer(tokenizer)
    if found.pad_token is None and found.eos_token is not None:
        found.pad_token = found.eos_token
    return model, found


def _from_factory(spec: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's import: any failure is reported in one line
        raise InputError(f"model factory {spec!r}: importing {module_name!r} failed with "
                         f"{type(error).__name__}: {error}") from error
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise InputError(f"model factory {spec!r}: {module_name} has no function {function_name!r}")
    try:
        made = factory()
    except Exception as error:  # the user's code: any failure is reported in one line
        raise InputError(f"model factory {spec!r} raised {type(error).__name__}: {error}") from error
    model, tokenizer = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model factory {spec!r} must return a torch.nn.Module or (model, tokenizer) "
                         f"(got {describe(made)})")
    if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise InputError(f"model factory {spec!r} returned a tokenizer that is not a transformers "
                         f"tokenizer (got {describe(tokenizer)})")
    return model.eval(), tokenizer
