"""Tests of the ready-made checks for users' own models: ``lmcheck.suite`` and ``lmcheck check``."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import lmcheck
from lmcheck.batteries import CAUSAL_CHECKS, MASKED_CHECKS, load_setup, run_checks
from lmcheck.cli import main
from lmcheck.errors import InputError
from lmcheck.models import bert_from_scratch, gpt2_from_scratch
from lmcheck.setup import DISTRIBUTED_CHECKS, SETUP_CHECKS

SETUP_TESTS = len(SETUP_CHECKS) + len(DISTRIBUTED_CHECKS)  # the ready setup suite's tests

PLAIN_MODELS = Path(__file__).with_name("plain_models.py")
# a user's module of factories, next to a copy of the plain models (tests/plain_models.py)
FACTORIES = """
from plain_models import NanoGPT, RotaryLM

def rotary():
    return RotaryLM()

def leaky():
    return RotaryLM(fault="future_leak")

def nanogpt():
    return NanoGPT()  # not adapted: its forward gives the last position only

def broken():
    raise RuntimeError("weights not found")

def not_a_model():
    return "model.pt"
"""


@pytest.fixture(scope="module")
def user_model_folder(tmp_path_factory, gpt2_tokenizer):
    """A user's own causal LM on disk: a tiny GPT-2 with random weights, saved as safetensors."""
    folder = tmp_path_factory.mktemp("my-model")
    gpt2_from_scratch(gpt2_tokenizer, preset="gpt2-tiny-cpu").save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


def test_check_command_runs_every_check_on_a_users_model(user_model_folder, tmp_path, capsys):
    target = tmp_path / "results.json"
    assert main(["check", str(user_model_folder), "--prompt", "Hello there", "--prompt",
                 "The capital of France is", "--json", str(target)]) == 0
    results = json.loads(target.read_text())
    assert [r["name"] for r in results] == list(CAUSAL_CHECKS)
    assert all(r["passed"] for r in results)
    assert f"{len(CAUSAL_CHECKS)} of {len(CAUSAL_CHECKS)} checks passed" in capsys.readouterr().out


def test_check_command_names_a_missing_model(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_the_pytest_suite_runs_against_a_users_model(pytester, user_model_folder):
    """In a separate process, as a user runs it (the other suite runs here are in-process)."""
    result = pytester.runpytest_subprocess("--pyargs", "lmcheck.suite", "-p", "no:cacheprovider",
                                           f"--lmcheck-model={user_model_folder}")
    # not a masked LM; no training setup given
    result.assert_outcomes(passed=len(CAUSAL_CHECKS), skipped=len(MASKED_CHECKS) + SETUP_TESTS)


def test_the_pytest_suite_skips_without_a_model(pytester):
    result = pytester.runpytest_inprocess("--pyargs", "lmcheck.suite", "-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=len(CAUSAL_CHECKS) + len(MASKED_CHECKS) + SETUP_TESTS)
    result.stdout.fnmatch_lines(["*no model given: pass --lmcheck-model NAME_OR_PATH*"])
    result.stdout.fnmatch_lines(["*no training setup given: pass --lmcheck-trainer package.module:function*"])


# ---------------------------------------------------------------- users' own code: factories


@pytest.fixture
def factories(tmp_path, monkeypatch) -> Path:
    (tmp_path / "plain_models.py").write_text(PLAIN_MODELS.read_text())
    (tmp_path / "my_lm.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_the_pytest_suite_runs_a_plain_model_from_a_factory(pytester):
    """A plain module from the user's factory: what it lacks is skipped with the reason, never passed."""
    pytester.makepyfile(plain_models=PLAIN_MODELS.read_text(), my_lm=FACTORIES)
    pytester.syspathinsert()  # the user's module is importable, as from their project's folder
    result = pytester.runpytest_inprocess("--pyargs", "lmcheck.suite", "-p", "no:cacheprovider", "-rs",
                                           "--lmcheck-model=my_lm:rotary", "--lmcheck-tokenizer=gpt2")
    result.assert_outcomes(passed=3, skipped=2 + len(MASKED_CHECKS) + SETUP_TESTS)
    result.stdout.fnmatch_lines(["*greedy_matches_generate: not applicable: *has no generate()*",
                                 "*kv_cache_matches_full: not applicable: lmcheck drives a KV cache*"])
    leaky = pytester.runpytest_inprocess("--pyargs", "lmcheck.suite", "-p", "no:cacheprovider",
                                          "--lmcheck-model=my_lm:leaky")
    leaky.assert_outcomes(passed=2, failed=1, skipped=2 + len(MASKED_CHECKS) + SETUP_TESTS)
    leaky.stdout.fnmatch_lines(["*causality: position 0 of * sees the future*"])


def test_the_check_command_runs_a_factory_and_counts_not_applicable_apart(factories, capsys):
    assert main(["check", "my_lm:rotary", "--prompt", "Hello there", "--prompt", "The capital of France is"]) == 0
    out = capsys.readouterr().out
    assert "3 of 5 checks passed, 2 not applicable" in out
    assert out.count("n/a") == 2
    assert main(["check", "my_lm:leaky", "--prompt", "Hello there", "--prompt", "The capital of France is"]) == 1


@pytest.mark.parametrize(("factory", "message"), [
    ("my_lm:nothing", "my_lm has no function 'nothing'"),
    ("my_lm:broken", "model factory 'my_lm:broken' raised RuntimeError: weights not found"),
    ("my_lm:not_a_model", "must return a torch.nn.Module or (model, tokenizer) (got 'model.pt'"),
    ("no_such_module:build", "importing 'no_such_module' failed with ModuleNotFoundError"),
])
def test_a_factory_that_fails_gets_one_line_naming_it(factory, message, factories, capsys):
    assert main(["check", factory]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_a_nanogpt_factory_gets_the_adapt_advice(factories, capsys):
    """Not a traceback from inside the model: the check that calls it is an error with lmcheck's
    message and the adapt call to write, the other checks' results are kept, exit status 3."""
    assert main(["check", "my_lm:nanogpt"]) == 3
    out = capsys.readouterr().out
    assert "ERROR causality" in out
    assert "the last position's only" in out
    assert "lmcheck.adapt" in out
    assert "4 not applicable, 1 could not run (error)" in out


# ---------------------------------------------------------------- masked LMs in the ready suite


def _causal_by_mistake(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA attention with a causal mask added: an encoder that cannot see to the right."""
    length = query.shape[-2]
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    mask = causal if attention_mask is None else (attention_mask if attention_mask.dtype == torch.bool
                                                  else attention_mask == 0) & causal
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)


AttentionInterface.register("lmcheck_causal_by_mistake", _causal_by_mistake)


@pytest.fixture(scope="module")
def tiny_bert(bert_tokenizer):
    return bert_from_scratch(bert_tokenizer, preset=dict(num_hidden_layers=2, num_attention_heads=2,
                                                         hidden_size=32, intermediate_size=64)).eval()


def test_a_masked_lm_gets_the_masked_battery(tiny_bert, bert_tokenizer, tmp_path, capsys):
    results = run_checks(tiny_bert, bert_tokenizer)
    assert [r.name for r in results] == ["fill_mask", "bidirectionality", "encoder_padding_invariance",
                                         "masked_loss_at_init"]
    for result in results:
        assert result, result.explanation
    folder = tmp_path / "my-bert"
    tiny_bert.save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    assert main(["check", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "(masked LM)" in out
    assert f"{len(MASKED_CHECKS)} of {len(MASKED_CHECKS)} checks passed" in out


def test_a_masked_lm_that_attends_causally_fails_bidirectionality(tiny_bert, bert_tokenizer):
    tiny_bert.set_attn_implementation("lmcheck_causal_by_mistake")
    try:
        result = lmcheck.bidirectionality(tiny_bert, bert_tokenizer)
    finally:
        tiny_bert.set_attn_implementation("sdpa")
    assert not result
    assert "does not read the right context; it attends causally" in result.explanation
    assert lmcheck.bidirectionality(tiny_bert, bert_tokenizer)  # mended: the control


def test_an_encoder_that_attends_to_pads_fails_padding_invariance(tiny_bert, bert_tokenizer):
    handle = tiny_bert.register_forward_pre_hook(
        lambda module, args, kwargs: (args, {**kwargs, "attention_mask": None}), with_kwargs=True)
    try:
        result = lmcheck.encoder_padding_invariance(
            tiny_bert, bert_tokenizer, ["paris is the capital of france.", "a short one."])
    finally:
        handle.remove()
    assert not result
    assert result.explanation.startswith("text 1 in a padded batch of 2")


def test_a_trained_masked_lm_is_held_to_a_cloze_threshold(tiny_bert, bert_tokenizer):
    """With a threshold the model counts as trained: an untrained one fails the cloze accuracy."""
    (cloze,) = [r for r in run_checks(tiny_bert, bert_tokenizer, cloze_threshold=0.5)
                if r.name == "cloze_accuracy"]
    assert not cloze
    assert cloze.threshold == 0.5


# ---------------------------------------------------------------- users' training setups


TESTS = Path(__file__).parent  # tests/setup_factories.py: a user's module of setup functions


@pytest.fixture
def setup_factories(monkeypatch) -> None:
    """``setup_factories`` importable here and in a pytest subprocess, as a user's module would be.
    Imported here first: an in-process pytest run drops the modules it imported for the first time
    (transformers' Trainer and its imports among them), and later tests would see two copies."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    importlib.import_module("setup_factories")


def test_the_setup_suite_passes_a_healthy_trainer(pytester, setup_factories):
    result = pytester.runpytest_inprocess("--pyargs", "lmcheck.suite", "-p", "no:cacheprovider",
                                           "--lmcheck-trainer=setup_factories:trainer")
    # no model given: the model batteries skip
    # packing_equivalence (padded rows), adapters (no PEFT model), preference_at_init and
    # importance_ratio (neither a preference nor an RL trainer) are not applicable: skipped with
    # their reasons
    result.assert_outcomes(passed=len(SETUP_CHECKS) - 4,
                           skipped=len(CAUSAL_CHECKS) + len(MASKED_CHECKS) + len(DISTRIBUTED_CHECKS) + 4)


def test_the_setup_suite_fails_the_check_a_faulty_loop_breaks(pytester, setup_factories):
    result = pytester.runpytest_inprocess("--pyargs", "lmcheck.suite", "-p", "no:cacheprovider",
                                           "--lmcheck-trainer=setup_factories:scheduler_per_micro_batch")
    # resume (the loop has no checkpoint functions), packing_equivalence (padded rows), adapters,
    # preference_at_init and importance_ratio are not applicable: skipped with their reasons
    result.assert_outcomes(passed=len(SETUP_CHECKS) - 6, failed=1,
                           skipped=len(CAUSAL_CHECKS) + len(MASKED_CHECKS) + len(DISTRIBUTED_CHECKS) + 5)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["FAILED *test_training_setup[[]lr_schedule[]]*"])
    result.stdout.fnmatch_lines(["*lr_schedule: at optimizer step * the scheduler is stepped on every "
                                 "micro-batch*"])
    result.stdout.no_fnmatch_line("*Traceback*")


def test_the_setup_suite_fails_in_one_line_on_a_setup_it_cannot_load(pytester, setup_factories):
    """Each setup test fails with the one-line error (the battery is not retried per test)."""
    result = pytester.runpytest_inprocess("--pyargs", "lmcheck.suite", "-p", "no:cacheprovider",
                                          "-k", "training_setup", "--lmcheck-trainer=setup_factories:broken")
    result.assert_outcomes(errors=SETUP_TESTS)
    result.stdout.fnmatch_lines(["*--lmcheck-trainer: training setup 'setup_factories:broken' raised "
                                 "RuntimeError: no training data at /data/train.jsonl*"])


@pytest.mark.parametrize("devices", [0, 1])
def test_the_setup_tests_are_gpu_tests_where_a_gpu_is_visible(pytester, monkeypatch, devices):
    """``pytest -m gpu`` selects them on a machine with a CUDA device, and deselects them where
    they would run on the CPU."""
    monkeypatch.setattr("lmcheck.pytest_plugin.cuda_device_count", lambda: devices)
    result = pytester.runpytest_inprocess("--pyargs", "lmcheck.suite", "-p", "no:cacheprovider",
                                          "-m", "gpu", "--collect-only", "-q")
    selected = [line for line in result.outlines if "test_training_setup[" in line or "test_data_parallel_setup[" in line]
    assert len(selected) == (SETUP_TESTS if devices else 0)


def test_load_setup_returns_a_trainer_and_a_rebuild_by_seed(setup_factories):
    trainer, rebuild = load_setup("setup_factories:trainer")
    assert type(trainer).__name__ == "Trainer"
    assert rebuild is not None
    other = rebuild(3)
    assert other is not trainer
    assert other.args.seed == 3


def test_load_setup_takes_a_loop_as_a_tuple_or_a_mapping(setup_factories):
    loop, rebuild = load_setup("setup_factories:loop_tuple")
    assert sorted(loop) == ["batches", "model", "train_step"]
    assert rebuild is None  # no seed parameter: reproducible is not applicable
    loop, rebuild = load_setup("setup_factories:loop")
    assert {"tokenizer", "scheduler", "max_grad_norm"} <= set(loop)
    assert loop["seed"] == 0  # the function's default, given to rebuild
    assert rebuild is not None
    assert isinstance(rebuild(1)["model"], torch.nn.Module)


@pytest.mark.parametrize(("spec", "message"), [
    ("setup_factories:unknown_key", "returned a mapping with unknown key 'learning_rate': its keys are "
                                    "check_loop's arguments (model, train_step, batches, tokenizer"),
    ("setup_factories:not_a_setup", "must return a transformers.Trainer"),
    ("setup_factories.trainer", "must be named as package.module:function"),
])
def test_load_setup_names_what_it_cannot_take(spec, message, setup_factories):
    with pytest.raises(InputError, match=re.escape(message)):
        load_setup(spec)


def test_a_factory_may_return_its_trainer_with_a_budget(setup_factories):
    """``{"trainer": trainer, "overfit_steps": 3}``: the budget travels with the setup; an option
    given by the caller (the command line) wins over it."""
    from lmcheck.batteries import run_setup_checks

    report = run_setup_checks("setup_factories:trainer_with_budget", steps=2)
    assert report["overfits"].metrics["budget"] == 3
    assert "after 3 optimizer steps (overfit_steps)" in report["overfits"].explanation
    assert len(report["lr_schedule"].metrics["observed"]) == 2


def test_the_setup_suite_takes_the_budget_on_the_command_line(pytester, setup_factories):
    """``--lmcheck-overfit-steps`` and ``--lmcheck-check-every`` reach check_trainer: one step
    memorizes nothing, so overfits fails and names that budget."""
    result = pytester.runpytest_inprocess("--pyargs", "lmcheck.suite", "-p", "no:cacheprovider", "-k",
                                          "training_setup", "--lmcheck-trainer=setup_factories:trainer",
                                          "--lmcheck-overfit-steps=1", "--lmcheck-check-every=1",
                                          "--lmcheck-steps=2")
    result.stdout.fnmatch_lines(["*overfits: after 1 optimizer steps (overfit_steps)*"])


def test_train_check_imports_a_factory_from_the_working_directory(tmp_path):
    """``lmcheck train-check factories:make`` run beside ``factories.py``: the console script
    starts without the working directory on sys.path; lmcheck puts it there, as ``python -m``
    does, so the factory is found (here it raises, and is named)."""
    import os
    import subprocess
    import sys

    (tmp_path / "my_factories.py").write_text("def make():\n    raise RuntimeError('reached my factory')\n")
    command = Path(sys.executable).with_name("lmcheck")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(command), "train-check", "my_factories:make"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "raised RuntimeError: reached my factory" in done.stderr + done.stdout
    assert "ModuleNotFoundError" not in done.stderr + done.stdout


def test_the_setup_suite_resumes_in_fresh_processes(pytester, setup_factories):
    """``--lmcheck-trainer`` names an importable function: the resume check's resumed runs go to
    fresh Python processes, each building the setup with it."""
    result = pytester.runpytest_inprocess("--pyargs", "lmcheck.suite", "-p", "no:cacheprovider", "-k", "resume",
                                          "--lmcheck-trainer=setup_factories:resumable_loop", "--lmcheck-json=out.json")
    result.assert_outcomes(passed=1)
    resume = next(r for r in json.loads((pytester.path / "out.json").read_text()) if r["name"] == "resume")
    assert resume["metrics"]["fresh_process"] is True
