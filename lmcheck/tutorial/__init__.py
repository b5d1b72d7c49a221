"""``lmcheck tutorial``: the four chapters, printed.

Each chapter module has a ``TITLE`` and ``run(report, *, quick, out)`` that calls the same library
functions as the matching ``tests/test_0N_*.py`` and records every check in the report.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from lmcheck.results import Result

__all__ = ["CHAPTERS", "chapter", "expect", "expect_equal"]

# chapter number -> module name in this package; later chapters join as they are written
CHAPTERS: dict[int, str] = {
    1: "ch1_tokenizers",
    2: "ch2_masked",
    3: "ch3_causal",
    4: "ch4_pretraining",
}


def chapter(number: int) -> ModuleType:
    return import_module(f"lmcheck.tutorial.{CHAPTERS[number]}")


def expect(name: str, passed: bool, explanation: str) -> Result:
    """A tutorial step's own check (a shape, an id) as a result, so the summary counts it."""
    return Result(name=name, passed=bool(passed), explanation=explanation)


def expect_equal(name: str, got: object, expected: object) -> Result:
    """A step that must give exactly ``expected``."""
    passed = got == expected
    return Result(name=name, passed=passed, metrics={"got": got, "expected": expected},
                  explanation=f"got {got!r}" + ("" if passed else f", expected {expected!r}"))
