"""The cost of the probes that judge a fine-tuning setup at GPT-2 124M's configuration, each in a
fresh process (``benchmarks/check_costs.py``), against the user's own training step on the
same model and batch: ``lora_adapters`` (two steps of its own, a save, a reload, five forwards)
and ``packing_equivalence`` (the packed row and each document alone, forward and backward).

The goals: each probe at most 15 of the user's steps, and at most 0.3x the training's peak
memory beyond it (what it holds: the logits of a few forwards, the adapter's copy, the gradients
of the documents compared).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("check_costs.py")
STEPS_GOAL, MEMORY_GOAL = 15.0, 0.3


@pytest.mark.parametrize("check", ["adapters", "packing", "precision"])
def test_probe_cost_against_the_users_step(benchmark, check):
    runs: dict[str, dict] = {}

    def once() -> None:
        done = subprocess.run([sys.executable, str(SCRIPT), "--check", check, "--size", "124m"],
                              capture_output=True, text=True, check=True, timeout=3600)
        runs["run"] = json.loads(done.stdout.strip().splitlines()[-1])

    benchmark.pedantic(once, rounds=1, iterations=1)
    run = runs["run"]
    assert run["status"] == "pass", run["explanation"]
    steps = run["check_seconds"] / run["user_step_seconds"]
    extra = (run["peak_after_check"] - run["peak_after_steps"]) / run["peak_after_steps"]
    benchmark.extra_info.update({"check": check, "parameters": run["parameters"],
                                 "user_step_seconds": round(run["user_step_seconds"], 2),
                                 "check_seconds": round(run["check_seconds"], 2), "in_user_steps": round(steps, 1),
                                 "training_peak_gib": round(run["peak_after_steps"] / 2**30, 2),
                                 "extra_peak_ratio": round(extra, 2)})
    assert steps <= STEPS_GOAL, benchmark.extra_info
    assert extra <= MEMORY_GOAL, benchmark.extra_info
