"""The distributed probes under ``torchrun`` with 2 gloo processes on the CPU.

Two launches of ``tests/distributed_scenarios.py`` run every healthy setup and every documented
bug on both ranks: ``torchrun`` the distributed probes' scenarios with the healthy check_loop and
check_trainer, ``accelerate launch`` check_loop and check_trainer on healthy and faulty setups
(about 10 s each on an idle 2-core machine). Each test reads one scenario's result from both
ranks' reports. ``--standalone``
lets torchrun pick a free port, so parallel test workers never collide, and a timeout ends both
processes if one hangs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import lmcheck
import lmcheck.models
import lmcheck.setup
from lmcheck.errors import InputError
from lmcheck.setup import distributed

HERE = Path(__file__).parent

pytestmark = pytest.mark.timeout(300)


def launch(out: Path, backend: str = "gloo", *extra: str) -> list[dict[str, dict]]:
    """Every scenario on 2 ranks under torchrun; each rank's results."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "distributed_scenarios.py"), str(out), *extra]
    return run_ranks(command, out, {**os.environ, "LMCHECK_DIST_BACKEND": backend})


def run_ranks(command: list[str], out: Path, env: dict[str, str] | None = None) -> list[dict[str, dict]]:
    """Run a launcher in a session of its own, so that a hang ends the launcher and every rank it
    started; each rank's results."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command[2]} did not end within 240 s; every rank was killed:\n{stderr[-3000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict[str, dict]]:
    """The probes' scenarios and the healthy check_loop and check_trainer, under torchrun."""
    return launch(tmp_path_factory.mktemp("ranks"), "gloo", "probes")


@pytest.fixture(scope="module")
def accelerate_reports(tmp_path_factory) -> list[dict[str, dict]]:
    """check_loop and check_trainer, healthy and faulty, launched by ``accelerate launch``."""
    out = tmp_path_factory.mktemp("accelerate")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", str(HERE / "distributed_scenarios.py"), str(out), "setup"]
    return run_ranks(command, out)


def outcome(reports: list[dict[str, dict]], scenario: str) -> dict:
    """The scenario's result, the same on both ranks (a failure on one rank fails everywhere)."""
    first, second = (report[scenario] for report in reports)
    assert first["status"] == second["status"], (first, second)
    return first


@pytest.mark.parametrize("scenario", ["same_init", "data_sharding", "grads_synchronized",
                                      "grads_synchronized/fsdp2", "ddp_matches_single", "rank_randomness"])
def test_a_healthy_ddp_setup_passes(reports, scenario):
    """One seed before the model, a DistributedSampler with set_epoch, no_sync on every micro-batch
    but the last, the loss as DDP expects it, and each rank reseeded after the model is built."""
    result = outcome(reports, scenario)
    assert result["status"] == "pass", result["explanation"]


@pytest.mark.parametrize(("scenario", "names"), [
    # each rank seeds with its rank before building the model (transformers #37932)
    ("same_init/seed_per_rank", ["rank 1", "#37932"]),
    # the loop never calls DistributedSampler.set_epoch (pytorch #31771)
    ("data_sharding/no_set_epoch", ["same order", "#31771"]),
    # each rank's sampler seeded with its rank (LongLive #71)
    ("data_sharding/seed_per_rank", ["more than one rank", "LongLive #71"]),
    # no_sync on the last micro-batch instead of the others (FunASR #3472, build-nanogpt #30)
    ("grads_synchronized/inverted_no_sync", ["step 1", "rank 1", "#3472"]),
    # FSDP2: each rank clips its shard by its own norm, not the global one (pytorch #170862)
    ("grads_synchronized/fsdp2_clip_per_shard", ["global norm", "max_grad_norm=1", "#170862"]),
    # the loss multiplied by the world size while DDP averages (sparseml #135)
    ("ddp_matches_single/loss_times_world", ["2 times", "sparseml #135"]),
    # set_seed(42) on every rank: the same dropout masks everywhere (transformers #31412)
    ("rank_randomness/constant_seed", ["rank 1", "#31412"]),
])
def test_each_documented_ddp_bug_is_caught_by_its_probe(reports, scenario, names):
    result = outcome(reports, scenario)
    assert result["status"] == "fail"
    for name in names:
        assert name in result["explanation"], result["explanation"]


def test_the_probes_refuse_to_run_outside_a_process_group():
    model = lmcheck.models.gpt2_from_scratch(lmcheck.load_tokenizer("gpt2"), preset=dict(n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(InputError, match="init_process_group"):
        distributed.same_init(model)


def test_check_loop_runs_unchanged_under_torchrun_on_a_healthy_ddp_loop(reports):
    """The whole battery on every rank of a plain DDP loop (accumulation 2, no_sync on the first
    micro-batch, a DistributedSampler given as a function of the epoch): the accumulation reference
    covers both ranks' micro-batches, and the distributed probes join the report."""
    first, second = (report["check_loop"] for report in reports)
    assert [r["status"] for r in first["results"]] == [r["status"] for r in second["results"]]
    names = [r["name"] for r in first["results"]]
    assert names == list(lmcheck.setup.SETUP_CHECKS + lmcheck.setup.DISTRIBUTED_CHECKS)
    not_passed = {r["name"]: r["status"] for r in first["results"] if r["status"] != "pass"}
    assert not_passed == {"reproducible": "n/a", "resume": "n/a", "rank_randomness": "n/a",
                          "packing_equivalence": "n/a", "preference_at_init": "n/a",
                          "importance_ratio": "n/a", "adapters": "n/a"}, first["results"]
    assert first["setup"]["world size"] == 2


def test_check_loop_under_accelerate_launch_catches_an_inverted_no_sync_on_every_rank(accelerate_reports):
    for report in (r["check_loop/inverted_no_sync"] for r in accelerate_reports):
        failed = {r["name"]: r["explanation"] for r in report["results"] if r["status"] == "fail"}
        assert set(failed) == {"accumulation", "grads_synchronized"}, failed
        assert "#3472" in failed["grads_synchronized"]
        assert failed["accumulation"].startswith("on rank ")


def test_check_trainer_runs_unchanged_under_torchrun(reports):
    """A Trainer that runs DDP itself: every check passes on both ranks, resume (the Trainer's
    own checkpoint, each rank's generator file) included, and nothing is written."""
    for report in (r["check_trainer"] for r in reports):
        assert report["passed"], [r for r in report["results"] if r["status"] != "pass"]
        assert [r["name"] for r in report["results"]] == list(lmcheck.setup.SETUP_CHECKS + lmcheck.setup.DISTRIBUTED_CHECKS)
        assert report["setup"]["world size"] == 2
        resume = next(r for r in report["results"] if r["name"] == "resume")
        assert resume["status"] == "pass", resume["explanation"]
        assert report["written"] == []
        # the Trainer is left able to train: evaluate() marked the model prepared, which would
        # have kept the next train() from wrapping it in DDP, and the ranks from syncing
        assert report["user_train_still_syncs"]


def test_check_trainer_under_accelerate_launch_catches_a_per_micro_batch_mean(accelerate_reports):
    for report in (r["check_trainer/per_micro_mean"] for r in accelerate_reports):
        failed = {r["name"]: r["explanation"] for r in report["results"] if r["status"] == "fail"}
        assert "accumulation" in failed, failed
        assert "#34191" in failed["accumulation"]


@pytest.mark.parametrize("check", ["check_loop", "check_trainer"])
def test_the_setup_checks_run_unchanged_under_accelerate_launch(accelerate_reports, check):
    """``accelerate launch --multi_gpu`` starts the ranks through torchrun's machinery; on a CPU
    the process group is gloo, and the reports are the same as under torchrun."""
    first, second = (report[check] for report in accelerate_reports)
    assert [r["status"] for r in first["results"]] == [r["status"] for r in second["results"]]
    assert all(r["status"] != "fail" for r in first["results"]), first["results"]
    assert first["setup"]["world size"] == 2


@pytest.mark.gpu(count=2)
def test_every_scenario_holds_with_nccl_on_two_gpus(tmp_path):
    """The same scenarios with one GPU per rank and the NCCL backend: healthy setups pass, each
    documented bug fails its probe."""
    found = launch(tmp_path, "nccl")
    for scenario, result in found[0].items():
        status = result.get("status", "pass" if result.get("passed") else "fail")
        healthy = "/" not in scenario
        assert (status != "fail") == healthy, (scenario, result)


def test_resume_under_torchrun_matches_every_rank_with_torch_distributed_checkpoint(reports):
    """A DDP loop checkpointed with torch.distributed.checkpoint and each rank's own generator
    and data position: every rank's resumed runs continue as its straight run."""
    result = outcome(reports, "resume")
    assert result["status"] == "pass", result["explanation"]
    assert result["metrics"]["fresh_process"] is False  # the ranks' process group lives in this process


def test_resume_that_restores_rank_0s_state_on_every_rank_fails_naming_the_rank(accelerate_reports):
    """Megatron-LM PR #6858: every rank loads rank 0's generator and position; rank 1's dropout
    masks after the resume are rank 0's."""
    result = outcome(accelerate_reports, "resume/rank0_state")
    assert result["status"] == "fail"
    assert result["explanation"].startswith("on rank 1: resumed from step"), result["explanation"]
    assert "the torch generator differs" in result["explanation"]
