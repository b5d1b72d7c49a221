"""A NaN never passes: every public probe fails on non-finite values and says where they were.

``NaN > tol`` is False, so a check written as ``difference > tolerance`` passes a model full of
NaNs. Each public probe (collected from ``lmcheck.__all__`` and its namespaces', so a new probe cannot be added without
a row here) meets three broken models, and must fail with an explanation that names the
non-finite value:

- ``nan_weights``: NaN in one MLP layer's weights (the model as saved after a diverged run);
- ``inf_logit``: finite weights, but the logits hold +inf at one vocabulary entry (id 7);
- ``nan_later``: finite on short inputs, NaN from position 3 on, so the loss turns NaN and a
  greedy loop meets NaN only after a few steps.

Curve probes read losses, not models: their curve records three finite steps and then the
broken model's own loss. ``lmcheck check`` and the ready pytest suite exit 1 on each model.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from public import public_names
from transformers import PreTrainedTokenizerBase

import lmcheck
import lmcheck.decoding
import lmcheck.golden
import lmcheck.lora
import lmcheck.precision
import lmcheck.rl
import lmcheck.setup.distributed
from lmcheck.batteries import CAUSAL_CHECKS, MASKED_CHECKS
from lmcheck.cli import main
from lmcheck.curves import LossCurve
from lmcheck.errors import NonFiniteError
from lmcheck.models import bert_from_scratch, gpt2_from_scratch
from lmcheck.results import Result, headroom_above, headroom_below
from lmcheck.setup import DISTRIBUTED_CHECKS, SETUP_CHECKS
from tests import setups

SETUP_TESTS = len(SETUP_CHECKS) + len(DISTRIBUTED_CHECKS)  # the ready setup suite's tests

FAULTS = ("nan_weights", "inf_logit", "nan_later")
INF_TOKEN = 7  # the vocabulary entry whose logit is +inf in the inf_logit model
NAN_FROM = 3  # first position whose embedding is NaN in the nan_later model
PROMPTS = ["Hello there", "The capital of France is a city"]
# what an explanation of a non-finite failure must say
NAMES_IT = re.compile(r"\b(nan|inf|NaN|Inf)\b.*not finite|not finite.*\b(nan|inf)\b|non-finite", re.S)

# probes that read no number a model computes, with the reason
NO_NUMBERS = {"round_trip": "compares token ids and texts only; nothing in it can be NaN",
              "rope_precision": "reads the rotary tables, computed from the config and inv_freq, not a model output; "
                                "non-finite weights are refused by the probe wrapper before it runs",
              "batch_supervision": "reads integer ids, labels and masks only; nothing in it can be NaN",
              "data_sharding": "compares the token ids each rank sees; nothing in it can be NaN",
              "same_init": "compares weights bit for bit and computes nothing; non-finite weights are "
                           "refused by the probe wrapper before it runs"}


# --- the broken models -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def healthy_causal(gpt2_tokenizer_with_pad: PreTrainedTokenizerBase) -> torch.nn.Module:
    """A 2-layer, 32-wide GPT-2 with the full vocabulary: every probe passes or fails on merit."""
    preset = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    return gpt2_from_scratch(gpt2_tokenizer_with_pad, preset=preset).eval()


@pytest.fixture(scope="module")
def healthy_masked(bert_tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    preset = dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                  max_position_embeddings=64)
    return bert_from_scratch(bert_tokenizer, preset=preset).eval()


def broken(model: torch.nn.Module, fault: str) -> torch.nn.Module:
    """A copy of ``model`` with ``fault``; the shared healthy model is never touched."""
    model = copy.deepcopy(model)
    if fault == "nan_weights":
        name, weight = next((n, p) for n, p in model.named_parameters()
                            if ("mlp" in n or "intermediate" in n) and p.dim() == 2)
        with torch.no_grad():
            weight[:4] = math.nan
    elif fault == "inf_logit":
        def inf_at_one_entry(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[..., INF_TOKEN] = math.inf
            return output
        model.get_output_embeddings().register_forward_hook(inf_at_one_entry)
    elif fault == "nan_later":
        positions = (model.transformer.wpe if hasattr(model, "transformer")
                     else model.bert.embeddings.position_embeddings)

        def nan_from_position(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
            late = (args[0] >= NAN_FROM).unsqueeze(-1)  # position ids (B, T) or (T,)
            return output.masked_fill(late, math.nan)
        positions.register_forward_hook(nan_from_position)
    else:
        raise ValueError(fault)
    return model


@dataclass
class Case:
    """What one probe is given: the broken causal and masked models and their tokenizers."""

    fault: str
    causal: torch.nn.Module
    healthy_causal: torch.nn.Module
    masked: torch.nn.Module
    gpt2: PreTrainedTokenizerBase
    bert: PreTrainedTokenizerBase

    def ids(self, length: int = 8) -> torch.Tensor:
        return self.gpt2(PROMPTS[1], return_tensors="pt").input_ids[:, :length]  # (1, T)

    def curve(self) -> LossCurve:
        """Three finite steps, then the broken model's own loss on a chunk (step 4 on)."""
        curve = LossCurve()
        for step, loss in enumerate((10.9, 9.0, 7.5), start=1):
            curve.record_train(step, loss)
        ids = self.ids()
        with torch.no_grad():
            loss = float(self.causal(input_ids=ids, labels=ids).loss)
        for step in range(4, 11):
            curve.record_train(step, loss)
        curve.record_valid(10, loss)
        return curve


def _golden(case: Case, tmp_path: Any) -> Result:
    path = tmp_path / "golden.json"
    lmcheck.golden.record_golden([_finite_curve()], path, steps=10, key="test")
    return lmcheck.golden.matches_golden(case.curve(), path, key="test")


def _finite_curve() -> LossCurve:
    """The golden run: the same three first steps as Case.curve, then finite losses."""
    curve = LossCurve()
    for step, loss in enumerate((10.9, 9.0, 7.5, 7.0, 6.5, 6.0, 5.5, 5.0, 4.5, 4.0), start=1):
        curve.record_train(step, loss)
    return curve


def _additive_mask(case: Case) -> dict[str, torch.Tensor]:
    """A causal batch whose 4-D additive mask holds the fault: NaN, +inf, or NaN late."""
    ids = case.ids()
    length = ids.shape[1]
    mask = torch.full((1, 1, length, length), -math.inf).triu(1)  # 0 = attend, -inf = blocked
    value = {"nan_weights": math.nan, "inf_logit": math.inf, "nan_later": math.nan}.get(case.fault)
    if value is not None:  # the healthy control keeps its mask
        mask[0, 0, NAN_FROM if case.fault == "nan_later" else 0, 0] = value
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": mask}


def _packed(case: Case) -> dict[str, torch.Tensor]:
    """The case's ids as one packed row of two documents, positions restarting at the second."""
    ids = case.ids()
    half = ids.shape[1] // 2
    return {"input_ids": ids, "position_ids": torch.cat([torch.arange(half), torch.arange(ids.shape[1] - half)])[None]}


# How each public probe is called on a case. A new public probe fails
# test_every_public_probe_has_a_row until it gets a row here.
@contextmanager
def one_rank(folder: Any) -> Iterator[None]:
    """A process group of one gloo rank: the distributed probes run as on rank 0 of many."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _sgd_step(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    # lr 0: the shared model is left as it was
    return setups.ids_step(model, torch.optim.SGD(model.parameters(), lr=0.0))


def _on_one_rank(call: Callable[[Case], Result]) -> Callable[[Case, Any], Result]:
    def run(case: Case, folder: Any) -> Result:
        with one_rank(folder):
            return call(case)
    return run


CALLS: dict[str, Callable[[Case, Any], Result]] = {
    "grads_synchronized": _on_one_rank(lambda c: lmcheck.setup.distributed.grads_synchronized(
        c.causal, _sgd_step(c.causal), [c.ids()], steps=1)),
    "ddp_matches_single": _on_one_rank(lambda c: lmcheck.setup.distributed.ddp_matches_single(
        c.causal, _sgd_step(c.causal), [c.ids()])),
    "rank_randomness": _on_one_rank(lambda c: lmcheck.setup.distributed.rank_randomness(c.causal, c.ids())),
    "greedy_matches_generate": lambda c, _: lmcheck.greedy_matches_generate(
        c.causal, c.gpt2, PROMPTS, max_new_tokens=4),
    "kv_cache_matches_full": lambda c, _: lmcheck.kv_cache_matches_full(c.causal, c.ids(2), max_new_tokens=4),
    "padding_invariance": lambda c, _: lmcheck.padding_invariance(c.causal, c.gpt2, PROMPTS),
    "batch_invariance": lambda c, _: lmcheck.batch_invariance(c.causal, c.gpt2, PROMPTS),
    "causality": lambda c, _: lmcheck.causality(c.causal, c.ids(6)),
    "loss_at_init": lambda c, _: lmcheck.loss_at_init(c.causal, c.ids()),
    "gradient_flow": lambda c, _: lmcheck.gradient_flow(c.causal, c.ids()),
    "params_update": lambda c, _: lmcheck.params_update(c.causal, c.ids()),
    "loss_matches_reference": lambda c, _: lmcheck.loss_matches_reference(c.causal, c.ids()),
    "memorizes": lambda c, _: lmcheck.memorizes(c.causal, None, c.ids(), prefix_length=2,
                                                continuation_length=4, min_verbatim_rate=0.0),
    "causal_batch": lambda c, _: lmcheck.causal_batch(_additive_mask(c)),
    "packing_equivalence": lambda c, _: lmcheck.packing_equivalence(c.causal, _packed(c)),
    "lora_adapters": lambda c, _: lmcheck.lora.lora_adapters(_lora(c.causal), {"input_ids": c.ids(), "labels": c.ids()}),
    "loss_precision": lambda c, _: lmcheck.precision.loss_precision(c.causal, _labelled(c)),
    "autocast_ops": lambda c, _: lmcheck.precision.autocast_ops(c.causal, _labelled(c)),
    "fp16_headroom": lambda c, _: lmcheck.precision.fp16_headroom(c.causal, _labelled(c)),
    "lost_updates": lambda c, _: _lost_updates(c),
    "importance_ratio": lambda c, _: lmcheck.rl.importance_ratio(c.causal, c.ids(), _tempered(c.causal),
                                                                 temperature=0.7, max_new_tokens=3),
    "mask_fill_accuracy": lambda c, _: lmcheck.mask_fill_accuracy(
        c.masked, c.bert, [("paris is the capital of [MASK] and its largest city.", "france")],
        threshold=0.0),
    "bidirectionality": lambda c, _: lmcheck.bidirectionality(c.masked, c.bert),
    "encoder_padding_invariance": lambda c, _: lmcheck.encoder_padding_invariance(
        c.masked, c.bert, ["paris is the capital of france.", "a short one."]),
    "masked_loss_at_init": lambda c, _: lmcheck.masked_loss_at_init(
        c.masked, c.bert, ["paris is the capital of france and its largest city by far."],
        mlm_probability=0.5),
    "loss_decreases": lambda c, _: lmcheck.loss_decreases(c.curve()),
    "overfits": lambda c, _: lmcheck.overfits(c.curve(), max_loss=20.0),
    "generalization_gap": lambda c, _: lmcheck.generalization_gap(c.curve(), min_gap=-100.0),
    "finite_loss": lambda c, _: lmcheck.finite_loss(c.curve()),
    "reproducible": lambda c, _: lmcheck.reproducible(c.curve(), c.curve(), steps=10, atol=1e9),
    "matches_golden": _golden,
}


def _labelled(c: Case) -> dict[str, torch.Tensor]:
    return {"input_ids": c.ids(), "labels": c.ids()}


def _lost_updates(c: Case) -> Result:
    """Two SGD steps of the (broken) model on its ids, watched; fp32, so forced."""
    optimizer = torch.optim.SGD(c.causal.parameters(), lr=1e-3)

    def step() -> None:
        c.causal(**_labelled(c)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return lmcheck.precision.lost_updates(c.causal, optimizer, step, steps=2, force=True)


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    """A LoRA over the (broken) GPT-2: its fused attention and MLP projections."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))


def _tempered(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """An RL update's log-probs of the completion tokens, at the sampler's temperature 0.7."""
    def logprobs(sequences: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
        logits = model(input_ids=sequences, attention_mask=mask).logits[:, -length - 1:-1] / 0.7
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, sequences[:, -length:, None]).squeeze(-1)
    return logprobs


def public_probes() -> dict[str, Callable[..., Any]]:
    """Every public name of lmcheck and its namespaces whose return annotation is Result."""
    found = {}
    for name, value in public_names().items():
        if getattr(value, "__module__", "") == "lmcheck.batteries":
            continue  # run_check runs the probes here, row by row (its isolation: test_capabilities.py)
        if callable(value) and not isinstance(value, type) and \
                inspect.signature(value).return_annotation in (Result, "Result"):
            found[name] = value
    return found


def test_every_public_probe_has_a_row():
    probes = public_probes()
    assert len(probes) >= 18
    assert sorted(set(probes) - set(NO_NUMBERS)) == sorted(CALLS)
    unwrapped = [name for name, function in probes.items() if not hasattr(function, "__lmcheck_probe__")]
    assert unwrapped == [], "every public probe must be wrapped by lmcheck._finite.probe"


@pytest.fixture(scope="module", params=FAULTS)
def case(request, healthy_causal, healthy_masked, gpt2_tokenizer_with_pad, bert_tokenizer) -> Case:
    return Case(request.param, broken(healthy_causal, request.param), healthy_causal,
                broken(healthy_masked, request.param), gpt2_tokenizer_with_pad, bert_tokenizer)


@pytest.mark.parametrize("probe", sorted(CALLS))
def test_probe_fails_on_non_finite_values_and_names_them(probe, case, tmp_path):
    result = CALLS[probe](case, tmp_path)
    assert isinstance(result, Result)
    assert not result.passed, f"{probe} passed on {case.fault}: {result.explanation}"
    assert NAMES_IT.search(result.explanation), result.explanation
    assert result.headroom is None or not math.isnan(result.headroom)
    if case.fault == "nan_weights" and probe in {"greedy_matches_generate", "causality", "params_update",
                                                 "mask_fill_accuracy", "loss_at_init"}:
        assert "already holds non-finite weights" in result.explanation
        assert re.search(r"(mlp|intermediate)\.\S*weight has [\d,]+ NaN of", result.explanation), result.explanation
    json.dumps(result.to_dict())  # a failure report is still valid JSON


@pytest.mark.parametrize("probe", sorted(CALLS))
def test_probe_passes_or_fails_on_merit_on_the_healthy_model(probe, healthy_causal, healthy_masked,
                                                             gpt2_tokenizer_with_pad, bert_tokenizer, tmp_path):
    """The control: the same calls on the healthy models meet no non-finite value."""
    case = Case("healthy", healthy_causal, healthy_causal, healthy_masked, gpt2_tokenizer_with_pad,
                bert_tokenizer)
    result = CALLS[probe](case, tmp_path)
    assert not result.metrics.get("non_finite"), result.explanation
    assert "not finite" not in result.explanation


def test_the_explanation_locates_the_value(healthy_causal, gpt2_tokenizer_with_pad):
    """Where, not only what: the step, row, position and token id of the first non-finite logit."""
    result = lmcheck.kv_cache_matches_full(broken(healthy_causal, "inf_logit"),
                                           torch.tensor([[464, 3139]]), max_new_tokens=3)
    # step 0 computes the prompt's last position only (as generate does): the logits it decodes from
    assert result.explanation == (
        "the loop with the cache: the logits at decoding step 0 (from 0): inf at row 0, position 1, "
        "token id 7 (1 of 50,257 values are not finite)")
    late = lmcheck.kv_cache_matches_full(broken(healthy_causal, "nan_later"),
                                         torch.tensor([[464, 3139]]), max_new_tokens=4)
    assert late.explanation.startswith(
        "the loop with the cache: the logits at decoding step 2 (from 0): nan at row 0, position 3")


def test_a_result_with_a_nan_metric_cannot_pass():
    """The last line of defence: a probe that forgot a check still cannot report a NaN as a pass."""
    result = Result(name="forgetful", passed=True, metrics={"max_abs_diff": math.nan}, threshold=1e-4,
                    headroom=math.nan, explanation="largest difference nan")
    assert not result.passed
    assert result.headroom == -math.inf
    assert "headroom is NaN" in result.explanation
    nested = Result(name="nested", passed=True, metrics={"losses": [1.0, math.nan]})
    assert not nested
    assert "metrics['losses'][1] is NaN" in nested.explanation
    assert Result(name="fine", passed=True, metrics={"gap": math.inf}).passed  # inf may be a metric


def test_headroom_of_nan_is_minus_infinity():
    assert headroom_below(math.nan, 1.0) == -math.inf
    assert headroom_above(math.nan, 1.0) == -math.inf


@pytest.mark.parametrize(("call", "argument"), [
    (lambda m, i: lmcheck.kv_cache_matches_full(m, i, atol=math.nan), "atol"),
    (lambda m, i: lmcheck.causality(m, i, atol=math.nan), "atol"),
    (lambda m, i: lmcheck.loss_at_init(m, i, tolerance=math.nan), "tolerance"),
    (lambda m, i: lmcheck.params_update(m, i, lr=math.inf), "lr"),
    (lambda m, i: lmcheck.reproducible(LossCurve(), LossCurve(), atol=math.nan), "atol"),
])
def test_a_nan_tolerance_is_refused(call, argument, healthy_causal):
    """A NaN tolerance would make every difference pass: it is misuse, named."""
    with pytest.raises(lmcheck.InputError, match=f"'{argument}' must be a finite number"):
        call(healthy_causal, torch.tensor([[464, 3139, 318]]))


def test_data_functions_raise_instead_of_returning_meaningless_tokens(healthy_causal, healthy_masked,
                                                                      bert_tokenizer):
    """greedy_decode and fill_mask return data, not a verdict: on NaN logits they raise."""
    with pytest.raises(NonFiniteError, match=r"decoding step 0 \(from 0\): nan at row 0, position 1"):
        lmcheck.decoding.greedy_decode(broken(healthy_causal, "nan_weights"), [[464, 3139]], max_new_tokens=2)
    with pytest.raises(NonFiniteError, match="the logits of texts 0 to 0: inf at text 0"):
        lmcheck.fill_mask(broken(healthy_masked, "inf_logit"), bert_tokenizer, "a [MASK] b")


# --- the same models through `lmcheck check` and the ready pytest suite ------------------------

@pytest.fixture(scope="module")
def nan_model_folder(tmp_path_factory, healthy_causal, gpt2_tokenizer_with_pad):
    """The reported case: a GPT-2 saved (safetensors) with NaN weights in one MLP layer."""
    folder = tmp_path_factory.mktemp("nan-model")
    broken(healthy_causal, "nan_weights").save_pretrained(folder)
    gpt2_tokenizer_with_pad.save_pretrained(folder)
    return folder


def test_check_command_exits_1_on_a_saved_nan_model(nan_model_folder, capsys):
    assert main(["check", str(nan_model_folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]) == 1
    out = capsys.readouterr().out
    assert f"0 of {len(CAUSAL_CHECKS)} checks passed" in out
    assert "already holds non-finite weights" in out


@pytest.mark.parametrize("fault", FAULTS)
def test_check_command_exits_1_on_each_broken_model(fault, healthy_causal, gpt2_tokenizer_with_pad,
                                                   monkeypatch, capsys):
    model = broken(healthy_causal, fault)
    monkeypatch.setattr("lmcheck.batteries.load_model_for_checks", lambda *_: (model, gpt2_tokenizer_with_pad))
    # the long prompt first: causality runs on the first, and nan_later is finite on 2 tokens
    assert main(["check", "broken", "--prompt", PROMPTS[1], "--prompt", PROMPTS[0]]) == 1
    out = capsys.readouterr().out
    assert f"0 of {len(CAUSAL_CHECKS)} checks passed" in out
    assert out.count("FAIL") == len(CAUSAL_CHECKS)  # each result printed once


def test_the_pytest_suite_fails_on_a_saved_nan_model(pytester, nan_model_folder):
    result = pytester.runpytest_inprocess("--pyargs", "lmcheck.suite", "-p", "no:cacheprovider",
                                           f"--lmcheck-model={nan_model_folder}")
    # a causal LM; no training setup given
    result.assert_outcomes(failed=len(CAUSAL_CHECKS), skipped=len(MASKED_CHECKS) + SETUP_TESTS)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*already holds non-finite weights*"])


@pytest.mark.parametrize("fault", ["inf_logit", "nan_later"])
def test_the_pytest_suite_fails_on_each_broken_model(pytester, fault):
    """A user's conftest provides the model: the ready tests fail on it, exit status 1."""
    pytester.makeconftest(f"""
        import pytest
        from lmcheck.tokens import load_tokenizer
        from lmcheck.models import gpt2_from_scratch
        from tests_nonfinite_faults import broken

        @pytest.fixture(scope="session")
        def lmcheck_model():
            tokenizer = load_tokenizer("gpt2")
            tokenizer.pad_token = tokenizer.eos_token
            model = gpt2_from_scratch(tokenizer, preset=dict(n_layer=2, n_head=2, n_embd=32, n_positions=64))
            return broken(model.eval(), {fault!r}), tokenizer
    """)
    header = ("import copy, math\nfrom typing import Any\nimport torch\n"
              f"INF_TOKEN = {INF_TOKEN}\nNAN_FROM = {NAN_FROM}\n\n")
    pytester.makepyfile(tests_nonfinite_faults=header + inspect.getsource(broken))
    pytester.makepyfile(test_ready="from lmcheck.suite.test_causal_lm import test_causal_lm  # noqa: F401\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "test_ready.py")
    result.assert_outcomes(failed=len(CAUSAL_CHECKS))
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*not finite*"])


def test_the_weight_scan_counts_every_non_finite_value_and_nothing_else():
    """The scan reads each tensor's sum first: +Inf and -Inf in one tensor (a NaN sum) are both
    found, and fp16 weights whose sum overflows yet hold only finite values are not reported."""
    from lmcheck._finite import non_finite_parameters

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).half())
    with torch.no_grad():
        model[0].weight[0, :2] = torch.tensor([math.inf, -math.inf])
        model[1].weight.fill_(60000.0)  # finite; the fp16 sum is Inf
    model[0].register_buffer("mask", torch.full((2, 2), -math.inf))  # a buffer's -Inf is on purpose
    assert non_finite_parameters(model) == [{"parameter": "0.weight", "nan": 0, "inf": 2, "values": 16}]
    with torch.no_grad():
        model[0].mask[0, 0] = math.nan
    assert [row["parameter"] for row in non_finite_parameters(model)] == ["0.weight", "0.mask"]
