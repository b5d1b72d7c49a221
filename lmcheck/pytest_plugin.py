"""lmcheck's pytest plugin: markers, options and skips for language-model checks.

Registered through the ``pytest11`` entry point, so installing lmcheck is enough:

- markers ``gpu`` (needs a CUDA device), ``slow`` (minutes, not seconds) and ``pretrained``
  (needs weights in the local Hugging Face cache), registered so ``--strict-markers`` works;
- ``gpu`` tests are skipped, with the reason, where no CUDA device is visible; ``slow`` tests
  run only with ``--lmcheck-slow``;
- the fixture ``lmcheck_results`` collects results and writes them to ``--lmcheck-json``;
- ``--lmcheck-model`` names your causal LM for the ready-made checks in ``lmcheck.suite``
  (``pytest --pyargs lmcheck.suite --lmcheck-model ./my-model``), through the session fixtures
  ``lmcheck_causal_lm`` and ``lmcheck_prompts``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from lmcheck.report import write_results_json
from lmcheck.results import Result

MARKERS = {
    "gpu": "gpu(count=1): needs that many CUDA devices; skipped with the reason otherwise",
    "slow": "takes minutes; runs only with --lmcheck-slow or -m slow",
    "pretrained": "needs pretrained weights in the local Hugging Face cache; skips otherwise",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lmcheck", "language-model checks")
    group.addoption("--lmcheck-slow", action="store_true", default=False,
                    help="also run tests marked slow")
    group.addoption("--lmcheck-json", default=None, metavar="PATH",
                    help="write every result recorded through the lmcheck_results fixture to PATH")
    group.addoption("--lmcheck-model", default=None, metavar="NAME_OR_PATH",
                    help="causal LM for lmcheck.suite: a local folder, a name in the Hugging Face "
                         "cache, or 'smollm2' (offline)")
    group.addoption("--lmcheck-prompt", action="append", default=None, metavar="TEXT",
                    help="prompt for lmcheck.suite (repeatable; default: three English prompts)")


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.getoption("markexpr", "") or ""
    run_slow = config.getoption("--lmcheck-slow") or "slow" in markexpr
    found: int | None = None
    for item in items:
        gpu = item.get_closest_marker("gpu")
        if gpu is not None:
            needed = int(gpu.kwargs.get("count", gpu.args[0] if gpu.args else 1))
            if found is None:
                found = cuda_device_count()
            if found < needed:
                item.add_marker(pytest.mark.skip(
                    reason=f"needs {needed} CUDA device{'s' if needed > 1 else ''}, found {found}"))
        if item.get_closest_marker("slow") is not None and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow test: run with --lmcheck-slow or -m slow"))


@pytest.fixture
def lmcheck_results(request: pytest.FixtureRequest) -> Iterator[list[Result]]:
    """A list to append results to; they are written to ``--lmcheck-json`` at the end."""
    results: list[Result] = []
    yield results
    request.config._lmcheck_results.extend(results)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def lmcheck_causal_lm(pytestconfig: pytest.Config) -> Any:
    """``(model, tokenizer)`` named by ``--lmcheck-model``; skips when none is given."""
    name = pytestconfig.getoption("--lmcheck-model")
    if not name:
        pytest.skip("no model given: pass --lmcheck-model NAME_OR_PATH")
    from lmcheck.suite import load_model_for_checks

    return load_model_for_checks(name)


@pytest.fixture(scope="session")
def lmcheck_prompts(pytestconfig: pytest.Config) -> list[str]:
    """The prompts given with ``--lmcheck-prompt``, or lmcheck.suite's defaults."""
    from lmcheck.suite import DEFAULT_PROMPTS

    return list(pytestconfig.getoption("--lmcheck-prompt") or DEFAULT_PROMPTS)


def pytest_unconfigure(config: pytest.Config) -> None:
    path: Any = config.getoption("--lmcheck-json", None)
    collected = getattr(config, "_lmcheck_results", [])
    if path and collected:
        write_results_json(collected, path)
