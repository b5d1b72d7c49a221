"""The ``resume`` check: a run stopped at a checkpoint, saved with the setup's own
checkpointing and resumed on a fresh build (or in a fresh process) continues bit for bit as the
run that was never stopped.

The positive controls are a plain loop written as a careful user writes one
(``setups.ResumableLoop``: dropout on, accumulation across epochs, an AMP GradScaler, a warmup,
a checkpoint of everything including where the data is) and the Trainer with dropout on. Each
negative control puts one documented resume bug into them and must fail with its cause named:
the random generator not restored (transformers #17032), the scheduler or the GradScaler left
out of the checkpoint (transformers PR #11663), Adam's moments reset on load (Megatron-Bridge
PR #3832), the loader restarting the epoch, a DataLoader drawing its seed from the restored
generator (Megatron-Bridge #5257), ``global_step`` batches skipped instead of
``global_step x k`` (transformers #5605), a ``zero_grad`` at the start of every epoch that
throws away its partial accumulation (ultralytics PR #11217), ``ignore_data_skip=True``
(transformers #11284), ``save_only_model=True``, and the data order held only in memory
(caught only in a fresh process).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import setup_factories
from transformers import Trainer

from lmcheck.batteries import run_setup_checks
from lmcheck.cli import main
from lmcheck.errors import InputError
from lmcheck.results import Result
from lmcheck.setup import SETUP_CHECKS, check_loop, check_trainer
from lmcheck.setup.resume import Plan, Trace, judge
from tests import setups

SHORT = {"overfit_steps": 5}  # the overfitting run is not the subject here


def loop_resume(fault: str | None = None, **options: Any) -> Result:
    """The resume result of check_loop on the resumable loop (with ``fault``)."""
    def build(seed: int) -> dict[str, Any]:
        return setups.ResumableLoop(seed, fault=fault, **options).setup()

    return check_loop(**build(0), rebuild=build, **SHORT)["resume"]


def trainer_resume(tmp_path: Any, trainer_class: type[Trainer] = Trainer, **arguments: Any) -> Result:
    tok = setups.tokenizer()

    def build(seed: int) -> Trainer:
        return setups.trainer(tok, str(tmp_path / "run"), seed=seed, dropout=0.1, trainer_class=trainer_class,
                              data=setups.examples(tok, 24), **arguments)

    return check_trainer(build(0), rebuild=build, **SHORT)["resume"]


# ---------------------------------------------------------------- the positive controls


def test_a_healthy_loop_resumes_exactly_inside_the_next_epoch():
    result = loop_resume()
    assert result.passed, result.explanation
    # 20 rows in batches of 4: 5 micro-batches an epoch, 2 a step, so the first epoch's end
    # falls inside step 3 and both resumes are in epoch 1
    assert result.metrics["resumed_from"] == [3, 4]
    assert "mid-epoch 1, 1 of its 5 micro-batches" in result.explanation
    assert "the same losses bit for bit" in result.explanation
    assert result.metrics["fresh_process"] is False


def test_a_healthy_loop_without_accumulation_resumes_at_the_end_of_an_epoch():
    result = loop_resume(accumulate=1)
    assert result.passed, result.explanation
    assert result.metrics["resumed_from"] == [5, 6]
    assert "5 (the end of epoch 0)" in result.explanation


def test_a_healthy_trainer_resumes_exactly_at_an_epoch_end_and_inside_the_next(tmp_path):
    result = trainer_resume(tmp_path)
    assert result.passed, result.explanation
    assert list((tmp_path / "run").iterdir()) == []  # its checkpoints went to a temporary folder of lmcheck's
    # cut to 2k + 1 = 5 micro-batches an epoch: the Trainer steps at the epoch's end on a partial one
    assert "3 (the end of epoch 0) and 4 (mid-epoch 1, 2 of its 5 micro-batches)" in result.explanation


# ---------------------------------------------------------------- the negative controls: a plain loop


@pytest.mark.parametrize(("fault", "phrases"), [
    ("no_rng", ["step 4's loss is", "just after loading, the torch generator differs"]),
    ("no_scheduler", ["just after loading, scheduler: `last_epoch` differs: 0 where the straight run has 3"]),
    ("no_scaler", ["just after loading, GradScaler: `scale` differs: 1024.0 where the straight run has 2048.0"]),
    ("adam_reset", ["optimizer state `step` of `transformer.wte.weight` differs: absent where the straight run has 3.0"]),
    ("restart_epoch", ["step 4 trained on 4 of its 8 rows other than the straight run's", "(replayed)"]),
    ("skip_steps", ["step 4 trained on", "(replayed)"]),
    ("loader_seed_after_restore", ["resumed from step 4 (mid-epoch 1, 3 of its 5 micro-batches) on fresh objects: "
                                   "step 5's loss is", "just after loading, the torch generator differs"]),
    ("zero_grad_each_epoch", ["the gradient of micro-batch 5 (after optimizer step 2) was zeroed by "
                              "AdamW.zero_grad() before any optimizer step used it", "ultralytics PR #11217"]),
])
def test_a_broken_loop_resume_fails_with_its_cause_named(fault, phrases):
    result = loop_resume(fault)
    assert result.status == "fail", result.explanation
    for phrase in phrases:
        assert phrase in result.explanation, f"{phrase!r} not in: {result.explanation}"


# ---------------------------------------------------------------- the negative controls: the Trainer


class _NoRngRestore(Trainer):
    def _load_rng_state(self, checkpoint: str | None) -> None:
        """The random generators left as the new Trainer seeded them (accelerate #4283)."""


@pytest.mark.parametrize(("trainer_class", "arguments", "phrases"), [
    (_NoRngRestore, {}, ["step 4's loss is", "just after loading, the torch generator differs"]),
    (Trainer, {"ignore_data_skip": True}, ["trained on", "(replayed)"]),
    (Trainer, {"save_only_model": True}, ["optimizer state `step` of `transformer.wte.weight` differs: absent"]),
])
def test_a_broken_trainer_resume_fails_with_its_cause_named(tmp_path, trainer_class, arguments, phrases):
    result = trainer_resume(tmp_path, trainer_class, **arguments)
    assert result.status == "fail", result.explanation
    for phrase in phrases:
        assert phrase in result.explanation, f"{phrase!r} not in: {result.explanation}"


# ---------------------------------------------------------------- a fresh process


def test_state_held_only_in_memory_passes_in_one_process_and_fails_in_a_fresh_one():
    """The data order kept in a module-level cache nobody saves: every build in one process
    sees the same orders, so the in-process resume matches; the fresh process draws others."""
    build = setup_factories.resumable_loop_order_in_memory
    in_process = check_loop(**build(0), rebuild=build, **SHORT)["resume"]
    assert in_process.passed, in_process.explanation
    fresh = run_setup_checks("setup_factories:resumable_loop_order_in_memory", **SHORT)["resume"]
    assert fresh.status == "fail", fresh.explanation
    assert fresh.metrics["fresh_process"] is True
    assert "in a fresh process: step 4 trained on" in fresh.explanation


def test_train_check_resumes_a_healthy_loop_in_fresh_processes(tmp_path, capsys):
    target = tmp_path / "report.json"
    status = main(["train-check", "setup_factories:resumable_loop", "--overfit-steps", "100", "--json", str(target)])
    resume = next(r for r in json.loads(target.read_text())["results"] if r["name"] == "resume")
    assert resume["status"] == "pass", resume["explanation"]
    assert resume["metrics"]["fresh_process"] is True
    assert resume["metrics"]["steps_elsewhere"] == 5  # 3 and 2 steps resumed, counted in the report's costs
    assert "resumed in a fresh process from step 3" in resume["explanation"]
    assert status == 0, capsys.readouterr().out


@pytest.mark.slow
def test_a_healthy_trainer_resumes_in_fresh_processes():
    result = run_setup_checks("setup_factories:resumable_trainer", **SHORT)["resume"]
    assert result.passed, result.explanation
    assert result.metrics["fresh_process"] is True


# ---------------------------------------------------------------- not applicable, bad input, non-finite


def test_without_a_checkpoint_or_a_rebuild_the_check_is_not_applicable():
    setup = setups.ResumableLoop().setup()
    without_checkpoint = {k: v for k, v in setup.items() if k != "checkpoint"}
    result = check_loop(**without_checkpoint, rebuild=lambda seed: setup, **SHORT)["resume"]
    assert result.status == "n/a"
    assert "no checkpoint=(save, load) was given" in result.explanation
    result = check_loop(**setups.ResumableLoop().setup(), **SHORT)["resume"]
    assert result.status == "n/a"
    assert "no rebuild(seed) was given" in result.explanation


def test_a_trainer_without_a_rebuild_is_not_applicable(tmp_path):
    tok = setups.tokenizer()
    result = check_trainer(setups.trainer(tok, str(tmp_path / "run")), **SHORT)["resume"]
    assert result.status == "n/a"
    assert "no Trainer can be built afresh" in result.explanation


@pytest.mark.parametrize(("options", "phrase"), [
    ({"checkpoint": "state.pt"}, "'checkpoint' must be (save, load): two functions of a folder"),
    ({"checkpoint": (print,)}, "'checkpoint' must be (save, load)"),
    ({"factory": "train.py"}, "'factory' must name the function that builds the setup as package.module:function"),
])
def test_bad_resume_options_are_refused_before_anything_runs(options, phrase):
    setup = setups.ResumableLoop().setup()
    with pytest.raises(InputError) as raised:
        check_loop(**{**setup, **options})
    assert phrase in str(raised.value)


def test_a_rebuild_that_returns_no_checkpoint_is_refused_by_name():
    setup = setups.ResumableLoop().setup()
    with pytest.raises(InputError, match="'rebuild' must return the setup's checkpoint=\\(save, load\\) too"):
        check_loop(**setup, rebuild=lambda seed: (setup["model"], setup["train_step"], setup["batches"]), **SHORT)


def _trace(losses: list[float], start: int = 0) -> Trace:
    return Trace(start=start, losses=losses, rows=[["a"]] * len(losses), ends=list(range(1, len(losses) + 1)))


def test_a_nan_loss_fails_by_construction():
    """NaN == NaN is False, so a NaN would read as a difference; it fails as non-finite instead,
    and a NaN in both runs can never pass."""
    plan = Plan(steps=3, saves=(1,), epoch_calls=None, calls_per_step=1, seed=0, calls_at={1: 1})
    nan = [1.0, math.nan, 1.0]
    result = judge(plan, _trace(nan), _trace(nan[:1]), {1: _trace(nan[1:], start=1)}, fresh=False)
    assert result.status == "fail"
    assert result.metrics["non_finite"]
    assert "the loss of its micro-batch 1 is nan" in result.explanation


def test_a_trace_survives_its_json_round_trip():
    trace = _trace([1.5, 0.1 + 0.2])
    trace.states = {1: {"parameter `w`": ("abc", "norm 1")}}
    trace.generators = {"the torch generator": ("d", "")}
    assert Trace.from_dict(json.loads(json.dumps(trace.to_dict()))) == trace


def test_the_resumable_loop_passes_every_check_of_the_battery():
    """The positive control of the whole battery with resume: nothing failed, nothing n/a but
    packing_equivalence (its rows are padded, not packed)."""
    build = setup_factories.resumable_loop
    report = check_loop(**build(0), rebuild=build)
    assert {r.name: r.status for r in report} == {**dict.fromkeys(SETUP_CHECKS, "pass"), "packing_equivalence": "n/a", "preference_at_init": "n/a",
                                                           "importance_ratio": "n/a", "adapters": "n/a"}, \
        {r.name: r.explanation for r in report if r.status != "pass"}
    assert report.costs["resume"]["optimizer_steps"] == report["resume"].metrics["optimizer_steps"]


@pytest.mark.gpu
@pytest.mark.parametrize("fault", [None, "no_rng"])
def test_on_a_gpu_the_cuda_generator_is_compared_too(fault):
    """Dropout on the GPU draws from the CUDA generator: a checkpoint that holds only the CPU
    generator's state resumes with other masks."""
    result = loop_resume(fault, device="cuda")
    if fault is None:
        assert result.passed, result.explanation
    else:
        assert result.status == "fail"
        assert "the CUDA generator of device 0 differs" in result.explanation
