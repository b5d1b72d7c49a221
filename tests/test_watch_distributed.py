"""The guard under ``torchrun`` with 2 gloo processes on the CPU: every rank takes the same
decision at the same step, even where only one rank sees the fault.

One launch of ``tests/watch_scenarios.py`` runs four plain DDP loops inside ``lmcheck.watch``
on both ranks: a healthy one, one that stops on a non-finite gradient, one that skips it, and one
that stops on a learning rate off its schedule; each fault is rank 1's alone, made after DDP's
all-reduce. The launch takes about 6 s on a quiet 2-core machine (14 s on a busy one), most of it
the two processes' imports. ``--standalone`` lets torchrun pick a free port, and a timeout ends
both processes if one hangs: a rank that stopped while the other went on leaves their next
collective waiting for ever (without the guard's all-reduce, the stop scenario hangs so).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FAULT_STEP = 4  # watch_scenarios.FAULT_STEP
STEPS = 8  # watch_scenarios.STEPS
HANG_S = 120

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, dict]]:
    """Each rank's results, rank 0 first."""
    out = tmp_path_factory.mktemp("watch-ranks")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "watch_scenarios.py"), str(out)]
    # a session of its own: a hang ends the launcher and both ranks it started
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the ranks did not end within {HANG_S} s (one rank waiting in a collective the "
                    f"other never joined?); both were killed:\n{stderr[-3000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


def test_a_healthy_ddp_run_raises_no_event(ranks):
    first, second = (rank["healthy"] for rank in ranks)
    for run in (first, second):
        assert run["events"] == [], run["events"]
        assert run["guard_step"] == STEPS
    assert first["weights"] == second["weights"]


def test_a_nan_gradient_on_one_rank_stops_every_rank_at_that_step(ranks):
    """``Rules(nonfinite="stop")``: ``optimizer.step()`` raises GuardStop on both ranks at the
    poisoned step, before the update, and neither rank hangs."""
    first, second = (rank["stop"] for rank in ranks)
    for run in (first, second):
        assert run["stopped_at"] == FAULT_STEP
        assert run["guard_step"] == FAULT_STEP
        assert [(e["step"], e["condition"], e["action"]) for e in run["events"]] == [(FAULT_STEP, "nonfinite", "stop")]
        assert run["stop_event"]["condition"] == "nonfinite"
    # rank 0's own gradients were finite: it learned of the NaN only through the guard's all-reduce
    assert first["stop_event"]["names"] == []
    assert second["stop_event"]["names"] == ["hidden.weight"]


def test_a_stopped_step_leaves_the_weights_of_the_step_before_on_every_rank(ranks):
    first, second = (rank["stop"] for rank in ranks)
    for run in (first, second):
        # [weights, optimizer state] after step FAULT_STEP - 1 (taken before the poisoned step)
        assert run["after_fault"] == run["before_fault"]
        assert [run["weights"], run["optimizer"]] == run["before_fault"]
        assert run["finite"]
    assert first["weights"] == second["weights"]
    assert first["optimizer"] == second["optimizer"]


def test_a_nan_gradient_on_one_rank_is_skipped_on_every_rank(ranks):
    """``Rules(nonfinite="skip")``: both ranks withhold the poisoned step, train on, and end
    with the same finite weights and optimizer state."""
    first, second = (rank["skip"] for rank in ranks)
    for run in (first, second):
        assert run["stopped_at"] is None
        assert run["skipped"] == [FAULT_STEP]
        assert [(e["step"], e["condition"], e["action"]) for e in run["events"]] == [(FAULT_STEP, "nonfinite", "skip")]
        assert run["after_fault"] == run["before_fault"]  # the skipped step moved nothing
        assert run["guard_step"] == run["steps_run"] == STEPS
        assert run["finite"]
    assert first["weights"] == second["weights"]
    assert first["optimizer"] == second["optimizer"]


def test_a_learning_rate_off_its_schedule_on_one_rank_stops_every_rank(ranks):
    """``Rules(learning_rate="stop")``, rank 1's rate halved at the last step: both ranks stop
    there (at the last step, so that ranks that part ways have no collective left to hang in)."""
    first, second = (rank["learning_rate_stop"] for rank in ranks)
    for run in (first, second):
        assert run["stopped_at"] == STEPS, run["events"]
        assert [(e["step"], e["condition"], e["action"]) for e in run["events"]] == [(STEPS, "learning_rate", "stop")]
        assert [run["weights"], run["optimizer"]] == run["before_fault"]
