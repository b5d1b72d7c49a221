"""Golden loss curves keyed by device: the default recipe must reproduce its recorded losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmcheck.cli import main
from lmcheck.curves import LossCurve
from lmcheck.errors import GoldenMissingError
from lmcheck.golden import DEFAULT_GOLDEN, device_key, matches_golden, record_golden
from lmcheck.loops.pretraining import default_recipe_curve


def _curve(losses: list[float]) -> LossCurve:
    curve = LossCurve()
    for step, loss in enumerate(losses, start=1):
        curve.record_train(step, loss)
    return curve


@pytest.fixture(scope="module")
def recipe_curve() -> LossCurve:
    """The first 10 steps of chapter 4's CPU default, run here."""
    return default_recipe_curve()


def test_the_default_recipe_matches_this_devices_golden_values(recipe_curve):
    """Same data, seed, model and optimizer: the same first 10 losses, within rtol 1e-4."""
    try:
        result = matches_golden(recipe_curve)
    except GoldenMissingError as missing:
        pytest.skip(str(missing))
    assert result, result.explanation


def test_a_changed_loss_fails_and_names_the_step(tmp_path):
    """Negative control: a loss off by 0.01 (about 10x the allowed 1e-4 x 9.5) fails at its step."""
    golden = tmp_path / "golden.json"
    reference = [10.8, 10.2, 9.8, 9.5, 9.1]
    record_golden([_curve(reference)], golden, steps=5, key="test-device")
    assert matches_golden(_curve(reference), golden, key="test-device")
    changed = reference.copy()
    changed[3] += 1e-2
    result = matches_golden(_curve(changed), golden, key="test-device")
    assert not result
    assert result.explanation.startswith("step 4: loss 9.510000, golden 9.500000")
    assert result.headroom < 0


def test_another_device_has_no_golden_values_and_says_how_to_record_them(tmp_path):
    golden = tmp_path / "golden.json"
    record_golden([_curve([1.0, 0.5])], golden, steps=2, key="cpu-somewhere/torch-0.1")
    with pytest.raises(GoldenMissingError, match="lmcheck golden --update"):
        matches_golden(_curve([1.0, 0.5]), golden, key="cuda-Other_GPU/torch-0.1")


def test_repeated_runs_widen_the_tolerance_to_their_spread(tmp_path):
    golden = tmp_path / "golden.json"
    entry = record_golden([_curve([10.0, 9.0]), _curve([10.0, 9.009])], golden, steps=2, key="k")
    assert entry["measured_spread"] == pytest.approx(1e-3)
    assert entry["rtol"] == pytest.approx(4e-3)
    assert json.loads(golden.read_text())["entries"]["k"]["train"] == [10.0, 9.0]


def test_the_shipped_file_has_an_entry_for_the_development_cpu():
    entries = json.loads(DEFAULT_GOLDEN.read_text())["entries"]
    assert any(key.startswith("cpu-") for key in entries)
    assert all(len(entry["train"]) == 10 for entry in entries.values())
    assert "/torch-" + ".".join(torch.__version__.split(".")[:2]) + "/transformers-" in device_key()


def test_the_golden_command_records_then_compares(tmp_path, capsys):
    golden = tmp_path / "golden.json"
    assert main(["golden", "--update", "--steps", "2", "--file", str(golden)]) == 0
    assert main(["golden", "--steps", "2", "--file", str(golden)]) == 0
    assert "[PASS] matches_golden" in capsys.readouterr().out


def test_update_refuses_to_write_into_an_installed_package(monkeypatch, capsys):
    """Without --file, --update would rewrite the shipped file inside site-packages: refused."""
    monkeypatch.setattr("lmcheck.golden.DEFAULT_GOLDEN",
                        Path("/usr/lib/python3/site-packages/lmcheck/golden/pretrain-cpu-default.json"))
    assert main(["golden", "--update", "--steps", "2"]) == 2
    assert "would write into the installed package" in capsys.readouterr().err
