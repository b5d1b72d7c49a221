"""lmcheck's pytest plugin: markers, options and skips for language-model checks.

Registered through the ``pytest11`` entry point, so installing lmcheck is enough:

- markers ``gpu`` (needs a CUDA device), ``slow`` (minutes, not seconds) and ``pretrained``
  (needs weights in the local Hugging Face cache), registered so ``--strict-markers`` works, and
  their arguments checked (a typo such as ``gpu(counts=2)`` is a usage error, not a silent 1);
- ``gpu`` tests are skipped, with the reason, where no CUDA device is visible; ``pretrained``
  tests where none of their repos is cached; ``slow`` tests run only with ``--lmcheck-slow`` or
  a ``-m`` expression that selects them because they are slow;
- the fixture ``lmcheck_results`` collects results and writes them to ``--lmcheck-json``;
- ``--lmcheck-model`` names your model for the ready-made checks in ``lmcheck.suite``: a folder,
  a cached name, or your own factory ``package.module:function`` (``pytest --pyargs lmcheck.suite
  --lmcheck-model ./my-model``), through the session fixtures ``lmcheck_model`` and
  ``lmcheck_prompts``; a conftest of yours may define ``lmcheck_model`` instead;
- ``--lmcheck-trainer`` names your training setup for the ready-made setup checks in
  ``lmcheck.suite`` (``pytest --pyargs lmcheck.suite --lmcheck-trainer my_project.train:make``):
  a function returning your Trainer, ``(model, train_step, batches)`` or a mapping of
  ``check_loop``'s arguments, run once per session through the fixture ``lmcheck_setup_report``;
- :func:`expect_pass` turns a result into a test outcome: a pass passes, a failure fails with the
  explanation, and a not-applicable result is a skip with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from lmcheck.recipes import SetupBudget
from lmcheck.report import write_results_json
from lmcheck.results import Result

MARKERS = {
    "gpu": "gpu(count=1): needs that many CUDA devices; skipped with the reason otherwise",
    "slow": "takes minutes; runs only with --lmcheck-slow or a -m expression that selects slow",
    "pretrained": "pretrained(*repos, files=('config.json', 'model.safetensors')): needs one of "
                  "the repos' files in the local Hugging Face cache; skipped with the reason otherwise",
}
PRETRAINED_FILES = ("config.json", "model.safetensors")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lmcheck", "language-model checks")
    group.addoption("--lmcheck-slow", action="store_true", default=False,
                    help="also run tests marked slow")
    group.addoption("--lmcheck-json", default=None, metavar="PATH",
                    help="write every result recorded through the lmcheck_results fixture to PATH")
    group.addoption("--lmcheck-model", default=None, metavar="NAME_OR_PATH",
                    help="model for lmcheck.suite: a local folder, a name in the Hugging Face cache, "
                         "'smollm2' (offline), or package.module:function returning a model or "
                         "(model, tokenizer)")
    group.addoption("--lmcheck-tokenizer", default=None, metavar="NAME_OR_PATH",
                    help="tokenizer for a --lmcheck-model factory that returns none (default: gpt2, "
                         "offline)")
    group.addoption("--lmcheck-cloze-threshold", default=None, type=float, metavar="ACCURACY",
                    help="masked LMs: a trained model's top-5 cloze accuracy on the wiki sample must "
                         "reach this (default: none, the model is untrained and its loss at init is "
                         "checked)")
    group.addoption("--lmcheck-trainer", default=None, metavar="PACKAGE.MODULE:FUNCTION",
                    help="training setup for lmcheck.suite's setup checks: a function returning your "
                         "transformers.Trainer, (model, train_step, batches) or a mapping of "
                         "check_loop's arguments; with a 'seed' parameter it is also rebuilt per seed")
    for option, metavar, text in _BUDGET_OPTIONS:
        group.addoption(option, default=None, type=int, metavar=metavar, help=text)
    group.addoption("--lmcheck-prompt", action="append", default=None, metavar="TEXT",
                    help="prompt for lmcheck.suite (repeatable; default: lmcheck.batteries.DEFAULT_PROMPTS)")


# the setup checks' budget, for --lmcheck-trainer (check_trainer's and check_loop's arguments)
_BUDGET = SetupBudget()
_BUDGET_OPTIONS = (
    ("--lmcheck-steps", "N", f"setup checks: optimizer steps of the first run (default {_BUDGET.steps})"),
    ("--lmcheck-overfit-steps", "N", f"setup checks: the overfitting run's budget in optimizer steps "
                                     f"(default {_BUDGET.overfit_steps})"),
    ("--lmcheck-overfit-batches", "N", f"setup checks: micro-batches the overfitting run memorizes "
                                       f"(default {_BUDGET.overfit_batches})"),
    ("--lmcheck-check-every", "N", f"setup checks: optimizer steps between memorization checks "
                                   f"(default {_BUDGET.check_every})"),
)


def budget_options(config: pytest.Config) -> dict[str, Any]:
    """The setup checks' budget given on the command line, as check_trainer's keyword arguments."""
    out: dict[str, Any] = {}
    for option, _, _ in _BUDGET_OPTIONS:
        value = config.getoption(option)
        if value is not None:
            out[option.removeprefix("--lmcheck-").replace("-", "_")] = value
    return out


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    config._lmcheck_results = []  # type: ignore[attr-defined]


def cuda_device_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cached_repo(repos: Sequence[str], files: Sequence[str] = PRETRAINED_FILES) -> str | None:
    """The first of ``repos`` whose ``files`` are all in the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    return next((repo for repo in repos
                 if all(isinstance(try_to_load_from_cache(repo, name), str) for name in files)), None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = _slow_selector(config)
    found: int | None = None
    for item in items:
        gpu = item.get_closest_marker("gpu")
        if gpu is not None:
            needed = _gpu_count(gpu, item)
            if found is None:
                found = cuda_device_count()
            if found < needed:
                item.add_marker(pytest.mark.skip(
                    reason=f"needs {needed} CUDA device{'s' if needed > 1 else ''}, found {found}"))
        pretrained = item.get_closest_marker("pretrained")
        if pretrained is not None:
            repos, files = _pretrained_arguments(pretrained, item)
            if cached_repo(repos, files) is None:
                item.add_marker(pytest.mark.skip(
                    reason=f"{' or '.join(repos)} weights are not in the local Hugging Face cache "
                           f"(needs {', '.join(files)})"))
        if item.get_closest_marker("slow") is not None and not slow(item):
            item.add_marker(pytest.mark.skip(reason="slow test: run with --lmcheck-slow or -m slow"))


def _gpu_count(marker: pytest.Mark, item: pytest.Item) -> int:
    """``gpu``, ``gpu(2)`` or ``gpu(count=2)``; anything else is a usage error naming the test."""
    unknown = set(marker.kwargs) - {"count"}
    if unknown or len(marker.args) > 1 or (marker.args and "count" in marker.kwargs):
        raise pytest.UsageError(f"{item.nodeid}: the gpu marker takes one count, as gpu(2) or "
                                f"gpu(count=2) (got args {marker.args}, keywords {sorted(marker.kwargs)})")
    count = marker.kwargs.get("count", marker.args[0] if marker.args else 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise pytest.UsageError(f"{item.nodeid}: gpu(count=...) must be an int >= 1 (got {count!r})")
    return count


def _pretrained_arguments(marker: pytest.Mark, item: pytest.Item) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The repos (one suffices) and the files each must have, from ``pretrained(*repos, files=...)``."""
    repos, files = marker.args, marker.kwargs.get("files", PRETRAINED_FILES)
    unknown = set(marker.kwargs) - {"files"}
    if not repos or unknown or not all(isinstance(r, str) and r for r in repos) \
            or isinstance(files, str) or not files or not all(isinstance(f, str) for f in files):
        raise pytest.UsageError(f"{item.nodeid}: the pretrained marker names the repos it needs, as "
                                f"pretrained('gpt2') or pretrained('gpt2', files=('config.json',)) "
                                f"(got args {marker.args}, keywords {marker.kwargs})")
    return tuple(repos), tuple(files)


class _Has:
    """The matcher pytest's mark expressions call: is this marker among the item's?"""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def __call__(self, name: str, /, **kwargs: str | int | bool | None) -> bool:
        return name in self.names


def _slow_selector(config: pytest.Config) -> Callable[[pytest.Item], bool]:
    """Whether a slow test runs: with --lmcheck-slow, or when the -m expression selects it
    because it is slow (``-m slow``, ``-m "gpu or slow"``), read as pytest reads it; ``-m "not
    slow"`` or ``-m gpu`` never does."""
    if config.getoption("--lmcheck-slow"):
        return lambda item: True
    markexpr = config.getoption("markexpr", "") or ""
    if not markexpr:
        return lambda item: False
    from _pytest.mark.expression import Expression  # the parser behind -m

    expression = Expression.compile(markexpr)

    def selects(item: pytest.Item) -> bool:
        marks = {mark.name for mark in item.iter_markers()}
        return expression.evaluate(_Has(marks)) and not expression.evaluate(_Has(marks - {"slow"}))

    return selects


@pytest.fixture
def lmcheck_results(request: pytest.FixtureRequest) -> Iterator[list[Result]]:
    """A list to append results to; they are written to ``--lmcheck-json`` at the end."""
    results: list[Result] = []
    yield results
    request.config._lmcheck_results.extend(results)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def lmcheck_model(pytestconfig: pytest.Config) -> Any:
    """``(model, tokenizer)`` named by ``--lmcheck-model``; skips when none is given."""
    name = pytestconfig.getoption("--lmcheck-model")
    if not name:
        pytest.skip("no model given: pass --lmcheck-model NAME_OR_PATH or package.module:function")
    from lmcheck.batteries import load_model_for_checks
    from lmcheck.errors import LmcheckError

    try:
        return load_model_for_checks(name, pytestconfig.getoption("--lmcheck-tokenizer"))
    except LmcheckError as error:
        pytest.fail(f"--lmcheck-model: {error}", pytrace=False)


@pytest.fixture(scope="session")
def lmcheck_cloze_threshold(pytestconfig: pytest.Config) -> float | None:
    """``--lmcheck-cloze-threshold``: None for an untrained masked LM."""
    return pytestconfig.getoption("--lmcheck-cloze-threshold")


@pytest.fixture(scope="session")
def lmcheck_setup_report(pytestconfig: pytest.Config) -> Any:
    """The :class:`~lmcheck.setup.SetupReport` of the training setup named by
    ``--lmcheck-trainer``, run once per session; skips when none is given."""
    spec = pytestconfig.getoption("--lmcheck-trainer")
    if not spec:
        pytest.skip("no training setup given: pass --lmcheck-trainer package.module:function")
    from lmcheck.batteries import run_setup_checks
    from lmcheck.errors import LmcheckError

    try:
        return run_setup_checks(spec, **budget_options(pytestconfig))
    except LmcheckError as error:
        pytest.fail(f"--lmcheck-trainer: {error}", pytrace=False)


def expect_pass(result: Result) -> None:
    """Pass on a passed result, fail with its explanation, skip a not-applicable one with its
    reason; a check that raised fails with the exception and where it came from."""
    if not isinstance(result, Result):
        raise TypeError(f"expect_pass takes a lmcheck Result (got {type(result).__name__})")
    if result.status == "n/a":
        pytest.skip(f"{result.name}: {result.explanation}")
    if result.status == "error":
        pytest.fail(f"{result.name}: could not run: {result.error}", pytrace=False)
    if not result.passed:
        pytest.fail(f"{result.name}: {result.explanation}", pytrace=False)


@pytest.fixture(scope="session")
def lmcheck_prompts(pytestconfig: pytest.Config) -> list[str]:
    """The prompts given with ``--lmcheck-prompt``, or lmcheck.suite's defaults."""
    from lmcheck.batteries import DEFAULT_PROMPTS

    return list(pytestconfig.getoption("--lmcheck-prompt") or DEFAULT_PROMPTS)


def pytest_unconfigure(config: pytest.Config) -> None:
    path: Any = config.getoption("--lmcheck-json", None)
    collected = getattr(config, "_lmcheck_results", [])
    if path and collected:
        write_results_json(collected, path)
