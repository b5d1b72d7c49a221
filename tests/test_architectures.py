"""The architecture matrix as tests: every transformers LM class at a tiny size, through lmcheck's
ready battery and training probes (``tests/architectures.py`` builds and runs them).

A healthy architecture must pass every probe or be not applicable; a cell that fails because of
the model is listed in ``KNOWN_DEFECTS`` with the words its explanation must contain, so a real
defect keeps failing and keeps being explained; no cell may be an error that is not listed. A
dozen representative architectures run in the default suite with eager attention; the whole
matrix, with sdpa too where a class has it, runs as ``python3 dev.py matrix`` (CI runs it).
"""

from __future__ import annotations

import architectures as matrix
import pytest

ARCHITECTURES = matrix.architectures()
FULL = (pytest.mark.slow, pytest.mark.architectures)  # python3 dev.py matrix


@pytest.fixture(scope="module")
def matrix_tokenizers():
    return matrix.tokenizers()


@pytest.mark.parametrize(("arch", "attention"), [
    pytest.param(a, attention, id=f"{a.key}-{attention}",
                 marks=() if a.key in matrix.REPRESENTATIVE and attention == "eager" else FULL)
    for a in ARCHITECTURES for attention in matrix.attentions(a)])
def test_architecture(arch, attention, matrix_tokenizers):
    row = matrix.run_row(arch, matrix_tokenizers[arch.family], attention=attention)
    if row.build_error:
        pytest.skip(f"the tiny {arch.class_name} cannot be built or run by the rule: {row.build_error}")
    surprises = []
    for probe, (status, text) in row.cells.items():
        known = matrix.KNOWN_DEFECTS.get((arch.key, probe))
        if known is not None:
            expected, words, _ = known
            if status != expected or words not in text:
                surprises.append(f"{probe}: expected {expected} saying {words!r}, got {status}: {text}")
        elif status not in ("pass", "n/a"):
            surprises.append(f"{probe}: {status}: {text}")
    assert not surprises, "\n".join(surprises)


def test_the_representative_dozen_is_in_the_matrix():
    keys = {a.key for a in ARCHITECTURES}
    assert set(matrix.REPRESENTATIVE) <= keys, set(matrix.REPRESENTATIVE) - keys


def test_every_known_defect_names_a_checked_architecture():
    keys = {a.key for a in ARCHITECTURES}
    assert {key for key, _ in matrix.KNOWN_DEFECTS} <= keys
