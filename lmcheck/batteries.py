"""The ready-made batteries and the loaders of what users name: the checks that the pytest
modules of ``lmcheck.suite``, ``lmcheck check``, ``lmcheck train-check`` and the tutorial run.

Run them against a model that ``transformers`` can load (a local folder, or a Hub name in your
Hugging Face cache), or against your own code through a factory, ``package.module:function``,
that returns a model or ``(model, tokenizer)``::

    pytest --pyargs lmcheck.suite --lmcheck-model ./my-model
    pytest --pyargs lmcheck.suite --lmcheck-model my_project.lm:build --lmcheck-tokenizer gpt2
    lmcheck check ./my-model
    lmcheck check my_project.lm:build

The model's family picks the battery: a causal LM runs :data:`CAUSAL_CHECKS`, a masked LM
:data:`MASKED_CHECKS`, one test (or one report line) each. A check that needs what the model lacks
(an attention-mask argument, a KV cache, ``generate``) is reported as not applicable; one that
raises is an error (:func:`run_check`), and the others still run.

Your training setup gets the setup checks (:data:`lmcheck.setup.SETUP_CHECKS`) through a
function ``package.module:function`` that returns your ``transformers.Trainer``, ``(model,
train_step, batches)`` or a mapping of :func:`~lmcheck.setup.check_loop`'s arguments
(:func:`load_setup`); where it takes a ``seed``, it is called again with other seeds for the
reproducibility check::

    pytest --pyargs lmcheck.suite --lmcheck-trainer my_project.train:make_trainer
    lmcheck train-check my_project.train:make_trainer --markdown setup-report.md
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmcheck._finite import probe
from lmcheck._validate import FACTORY, describe
from lmcheck.causal import causality, greedy_matches_generate, kv_cache_matches_full
from lmcheck.cloze import cloze_cases
from lmcheck.corpus import load_documents, split_documents
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
from lmcheck.recipes import DEFAULTS, SetupBudget
from lmcheck.results import Result
from lmcheck.setup.trainer import is_trainer
from lmcheck.tokens import load_tokenizer

if TYPE_CHECKING:  # only for the annotation; imported when the checks run
    from lmcheck.setup import SetupReport

__all__ = [
    "CAUSAL_CHECKS",
    "DEFAULT_PROMPTS",
    "GREEDY_STEPS",
    "MASKED_CHECKS",
    "MASKED_TEXTS",
    "iter_checks",
    "load_model_for_checks",
    "load_setup",
    "model_family",
    "run_causal_checks",
    "run_check",
    "run_checks",
    "run_setup_checks",
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


def run_check(name: str, check: Callable[..., Result], *arguments: Any) -> Result:
    """One check of a battery, isolated: its Result, or, where it raised (inside the model or
    inside lmcheck), an ``error`` Result (:meth:`Result.from_exception`) with the exception and
    the frame it came from, so that one check never loses the others' results."""
    try:
        return check(*arguments)
    except Exception as error:  # noqa: BLE001 -- any exception is this check's outcome, said in full
        return Result.from_exception(name, error)


def iter_checks(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] = DEFAULT_PROMPTS, *, max_new_tokens: int = GREEDY_STEPS,
    cloze_threshold: float | None = None,
) -> Iterator[Result]:
    """The battery of the model's family (:func:`model_family`), each check's Result as soon as
    it is known, in order; every check runs isolated (:func:`run_check`)."""
    if model_family(model) == "masked":
        for name, masked in MASKED_CHECKS.items():
            yield run_check(name, masked, model, tokenizer, cloze_threshold)
    else:
        for name, causal in CAUSAL_CHECKS.items():
            yield run_check(name, causal, model, tokenizer, prompts, max_new_tokens)


def run_causal_checks(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] = DEFAULT_PROMPTS, *, max_new_tokens: int = GREEDY_STEPS,
) -> list[Result]:
    """Every check of :data:`CAUSAL_CHECKS` on one model, in order, each isolated."""
    return [run_check(name, check, model, tokenizer, prompts, max_new_tokens)
            for name, check in CAUSAL_CHECKS.items()]


def run_checks(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] = DEFAULT_PROMPTS, *, max_new_tokens: int = GREEDY_STEPS,
    cloze_threshold: float | None = None,
) -> list[Result]:
    """The battery of the model's family (:func:`model_family`), in order (see :func:`iter_checks`)."""
    return list(iter_checks(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                            cloze_threshold=cloze_threshold))




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
    if FACTORY.match(spec) and not os.path.exists(spec):
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
    made = _call_function(spec, "model factory", _import_function(spec, "model factory"))
    model, tokenizer = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model factory {spec!r} must return a torch.nn.Module or (model, tokenizer) "
                         f"(got {describe(made)})")
    if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise InputError(f"model factory {spec!r} returned a tokenizer that is not a transformers "
                         f"tokenizer (got {describe(tokenizer)})")
    return model.eval(), tokenizer


def _import_function(spec: str, what: str) -> Callable[..., Any]:
    """The function that ``spec`` (``package.module:function``) names; an InputError of one line
    naming ``what`` and ``spec`` where the import fails or there is no such function."""
    module_name, function_name = spec.split(":")
    _working_directory_importable()
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's import: any failure is reported in one line
        raise InputError(f"{what} {spec!r}: importing {module_name!r} failed with "
                         f"{type(error).__name__}: {_one_line(error)}") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(f"{what} {spec!r}: {module_name} has no function {function_name!r}")
    return function


def _working_directory_importable() -> None:
    """Put the working directory on ``sys.path``, as ``python -m`` does: the ``lmcheck`` command
    and pytest's console script start without it, and a factory beside the user is the norm."""
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path and os.path.abspath(here) not in map(os.path.abspath, sys.path):
        sys.path.insert(0, here)


def _call_function(spec: str, what: str, function: Callable[..., Any], **arguments: Any) -> Any:
    """``function(**arguments)``; whatever it raises becomes an InputError of one line naming
    ``what`` and ``spec``, with the user's traceback chained."""
    try:
        return function(**arguments)
    except Exception as error:  # the user's code: any failure is reported in one line
        raise InputError(f"{what} {spec!r} raised {type(error).__name__}: {_one_line(error)}") from error


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# ---------------------------------------------------------------- training setups


_SETUP = "training setup"
_LOOP_REQUIRED = ("model", "train_step", "batches")


def load_setup(spec: str, *, seed: int | None = None) -> tuple[Any, Callable[[int], Any] | None]:
    """The user's training setup, from their function ``package.module:function``.

    The function returns a ``transformers.Trainer``, ``(model, train_step, batches)``, or a mapping
    of :func:`~lmcheck.setup.check_loop`'s arguments (``model``, ``train_step`` and
    ``batches``; optionally ``tokenizer``, ``scheduler``, ``max_grad_norm``, ``evaluate``,
    ``as_batch``, ...). Returns ``(setup, rebuild)``: the Trainer, or a dict of check_loop's
    arguments; and, where the function has a parameter named ``seed``, ``rebuild(seed)``, which
    calls ``function(seed=seed)`` and checks what it returns the same way (else None). A function
    whose ``seed`` has no default is first called with ``seed=0``; with ``seed`` given, the
    function is called with it (it must take one). A loop's dict, where the
    function takes a ``seed``, holds ``seed``: its default (else 0), the one check_loop rebuilds
    with (and with the next).

    Raises:
        InputError: ``spec`` is not ``package.module:function``, its import fails, the function
            raises or returns something else (one line that names ``spec``).
    """
    if not isinstance(spec, str) or not FACTORY.match(spec):
        raise InputError(f"the training setup must be named as package.module:function, a function "
                         f"returning a transformers.Trainer, (model, train_step, batches) or a "
                         f"mapping of check_loop's arguments (got {describe(spec)})")
    function = _import_function(spec, _SETUP)
    parameter = _seed_parameter(function)
    first = {"seed": 0} if parameter is not None and parameter.default is inspect.Parameter.empty else {}
    if seed is not None:
        if parameter is None:
            raise InputError(f"training setup {spec!r} takes no seed, so it cannot be built with seed {seed}")
        first = {"seed": seed}
    setup = _setup_value(spec, _call_function(spec, _SETUP, function, **first))
    if parameter is None:
        return setup, None

    def rebuild(value: int) -> Any:
        return _setup_value(spec, _call_function(spec, _SETUP, function, seed=value))

    if not is_trainer(setup) and "trainer" not in setup and "seed" not in setup:  # the seed check_loop gives rebuild
        default = seed if seed is not None else parameter.default
        setup["seed"] = default if isinstance(default, int) and not isinstance(default, bool) else 0
    return setup, rebuild


def run_setup_checks(spec: str, *, progress: Callable[[str, int, int], None] | None = None,
                     **options: Any) -> SetupReport:
    """The setup checks (:data:`~lmcheck.setup.SETUP_CHECKS`) on the training setup that
    ``spec`` names (see :func:`load_setup`): :func:`~lmcheck.setup.check_trainer` for a
    Trainer, :func:`~lmcheck.setup.check_loop` for a loop, with the function itself as
    ``rebuild`` where it takes a ``seed``. ``options`` are those functions' budgets and settings
    (``steps``, ``overfit_batches``, ``overfit_steps``, ``check_every``, ``expect_eos``,
    ``pretrained``); for a loop they take precedence over the mapping's.

    Raises:
        InputError: as :func:`load_setup`; an option that is not one of the above.
    """
    from lmcheck.setup import check_loop, check_trainer

    unknown = sorted(set(options) - set(_SETUP_OPTIONS))
    if unknown:
        raise InputError(f"unknown setup-check option {unknown[0]!r}: the options are "
                         f"{', '.join(_SETUP_OPTIONS)}")
    setup, rebuild = load_setup(spec)
    factory = spec if rebuild is not None else None  # a fresh process builds the resumed runs with it
    if is_trainer(setup):
        return check_trainer(setup, rebuild=rebuild, progress=progress, factory=factory, **options)
    if "trainer" in setup:  # the Trainer and the budget its function chose; options take precedence
        chosen = {k: v for k, v in setup.items() if k != "trainer"}
        return check_trainer(setup["trainer"], rebuild=_trainer_of(rebuild), progress=progress,
                             factory=factory, **{**chosen, **options})
    arguments = {"factory": factory, **setup, **options}
    if rebuild is not None and "rebuild" not in setup:
        arguments["rebuild"] = rebuild
    return check_loop(**arguments, progress=progress)


# the budget's fields and the two switches every entry point takes
_SETUP_OPTIONS = (*(f.name for f in dataclasses.fields(SetupBudget)), "expect_eos", "pretrained")


def _trainer_of(rebuild: Callable[[int], Any] | None) -> Callable[[int], Any] | None:
    """``rebuild`` for a function that returns a Trainer with its budget: the Trainer alone."""
    if rebuild is None:
        return None
    return lambda seed: (lambda made: made["trainer"] if isinstance(made, Mapping) else made)(rebuild(seed))


def _seed_parameter(function: Callable[..., Any]) -> inspect.Parameter | None:
    """The function's parameter named ``seed``, where it can be passed by keyword."""
    try:
        parameter = inspect.signature(function).parameters.get("seed")
    except (TypeError, ValueError):  # a builtin or extension without a signature
        return None
    if parameter is None or parameter.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                   inspect.Parameter.KEYWORD_ONLY):
        return None
    return parameter


def _setup_value(spec: str, made: Any) -> Any:
    """The Trainer, or the loop as a dict of check_loop's arguments; else an InputError naming spec."""
    if is_trainer(made):
        return made
    if isinstance(made, Mapping) and "trainer" in made:  # a Trainer with its budget
        if not is_trainer(made["trainer"]):
            raise InputError(f"training setup {spec!r} returned a mapping whose 'trainer' is not a "
                             f"transformers.Trainer (got {describe(made['trainer'])})")
        unknown = sorted(str(k) for k in made if k != "trainer" and k not in _SETUP_OPTIONS)
        if unknown:
            raise InputError(f"training setup {spec!r} returned a Trainer with unknown option {unknown[0]!r}: "
                             f"the options are {', '.join(_SETUP_OPTIONS)}")
        return dict(made)
    if isinstance(made, tuple) and len(made) == len(_LOOP_REQUIRED):
        arguments = dict(zip(_LOOP_REQUIRED, made, strict=True))
    elif isinstance(made, Mapping):
        arguments = dict(made)
        allowed = _loop_arguments()
        unknown = sorted(str(k) for k in arguments if k not in allowed)
        if unknown:
            raise InputError(f"training setup {spec!r} returned a mapping with unknown key "
                             f"{unknown[0]!r}: its keys are check_loop's arguments "
                             f"({', '.join(allowed)})")
        missing = [k for k in _LOOP_REQUIRED if k not in arguments]
        if missing:
            raise InputError(f"training setup {spec!r} returned a mapping without {missing[0]!r}: "
                             f"a loop needs model, train_step and batches")
    else:
        raise InputError(f"training setup {spec!r} must return a transformers.Trainer, (model, "
                         f"train_step, batches) or a mapping of check_loop's arguments "
                         f"(got {describe(made)})")
    if not isinstance(arguments["model"], torch.nn.Module):
        raise InputError(f"training setup {spec!r} returned a model that is not a torch.nn.Module "
                         f"(got {describe(arguments['model'])})")
    if not callable(arguments["train_step"]):
        raise InputError(f"training setup {spec!r} returned a train_step that is not callable "
                         f"(got {describe(arguments['train_step'])})")
    return arguments


def _loop_arguments() -> tuple[str, ...]:
    """check_loop's arguments that a setup function may return (progress is lmcheck's own)."""
    from lmcheck.setup import check_loop

    return tuple(name for name in inspect.signature(check_loop).parameters if name != "progress")
