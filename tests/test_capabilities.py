"""What a model can do is found by trying, gradients are judged over time, and a battery keeps
every result when one check raises.

Each behaviour has its negative control beside it: a model with a zero-initialised gate passes
the gradient probes, one whose branch is multiplied by a constant zero still fails them; an
expert that a small batch does not reach passes, one that no batch reaches fails; a Hugging Face
forward that swallows the mask in ``**kwargs`` is not applicable, one that names the mask and
ignores it fails with that said.
"""

from __future__ import annotations

import json
import multiprocessing

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import lmcheck
from lmcheck._model import has_cache, takes_mask
from lmcheck.batteries import CAUSAL_CHECKS, run_causal_checks
from lmcheck.cli import main

VOCAB = 97


class GatedLM(nn.Module):
    """An embedding, a branch behind a gate, an output layer. ``gate_init=0`` is the design of
    doge, gemma3n and LoRA (the branch gets its gradient once the gate moves); ``dead=True``
    multiplies the branch by a constant zero, so it never gets one."""

    def __init__(self, *, gate_init: float = 0.0, dead: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.branch = nn.Linear(16, 16)
        self.gate = nn.Parameter(torch.full((16,), gate_init))
        self.register_buffer("off", torch.zeros(16) if dead else torch.ones(16))
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        return self.head(x + self.gate * self.off * self.branch(x))


class RoutedLM(nn.Module):
    """Two experts, hard-routed by the token id: ids below half the vocabulary go to expert 0, the
    others to expert 1. ``unreachable=True`` sends every id to expert 0 (expert 1 is dead)."""

    def __init__(self, *, unreachable: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, VOCAB)
        self.unreachable = unreachable

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        high = (input_ids >= VOCAB // 2) & (not self.unreachable)
        routed = torch.where(high[..., None], self.experts[1](x), self.experts[0](x))
        return self.head(routed)


LOW_IDS = torch.randint(0, VOCAB // 2, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("probe", [lmcheck.gradient_flow, lmcheck.params_update])
def test_a_zero_initialised_gate_passes_and_is_named(probe):
    result = probe(GatedLM(), LOW_IDS)
    assert result, result.explanation
    assert "zero-initialised" in result.explanation
    assert "branch.weight" in result.explanation
    assert "gate" in result.explanation  # the all-zero parameter that held it


@pytest.mark.parametrize("probe", [lmcheck.gradient_flow, lmcheck.params_update])
def test_a_branch_multiplied_by_a_constant_zero_still_fails(probe):
    result = probe(GatedLM(gate_init=1.0, dead=True), LOW_IDS)
    assert result.status == "fail"
    assert "branch.weight" in result.explanation


@pytest.mark.parametrize("probe", [lmcheck.gradient_flow, lmcheck.params_update])
def test_an_expert_the_batch_does_not_reach_passes_with_the_batch_named(probe):
    result = probe(RoutedLM(), LOW_IDS)
    assert result, result.explanation
    assert "experts.1.weight" in result.explanation
    assert "8 x 64" in result.explanation
    assert "this batch does not reach" in result.explanation


@pytest.mark.parametrize("probe", [lmcheck.gradient_flow, lmcheck.params_update])
def test_an_expert_no_batch_reaches_fails(probe):
    result = probe(RoutedLM(unreachable=True), LOW_IDS)
    assert result.status == "fail"
    assert "experts.1.weight" in result.explanation


def test_a_parameter_with_a_gradient_that_the_optimizer_leaves_alone_fails_at_once():
    """Later steps are for parameters without a gradient: one missing from the optimizer is not
    given them."""
    model = GatedLM(gate_init=1.0)
    result = lmcheck.params_update(model, LOW_IDS, optimizer=lambda m: torch.optim.AdamW(
        [p for n, p in m.named_parameters() if not n.startswith("head")], lr=1e-3))
    assert result.status == "fail"
    assert "head.weight" in result.explanation
    assert "it had a gradient" in result.explanation


def test_the_model_is_left_as_it_was_after_the_later_steps():
    model = GatedLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lmcheck.gradient_flow(model, LOW_IDS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- capabilities by trying


def _tiny_gpt2(cls: type = GPT2LMHeadModel) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return cls(config).eval()


class SwallowsTheMask(GPT2LMHeadModel):
    """A Hugging Face model whose forward takes the mask only through ``**kwargs`` and drops it."""

    def forward(self, input_ids=None, **kwargs):
        kwargs.pop("attention_mask", None)
        kwargs.pop("position_ids", None)
        return super().forward(input_ids=input_ids, **kwargs)


class IgnoresTheMask(GPT2LMHeadModel):
    """One that names ``attention_mask`` and ignores it: a defect, not a missing capability."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return super().forward(input_ids=input_ids, **kwargs)


class ReturnsNoCache(GPT2LMHeadModel):
    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        for name in ("past_key_values", "cache"):  # the cache under either name (transformers 5.24 renamed it)
            if name in output:
                output[name] = None
        return output


def test_a_mask_swallowed_by_kwargs_is_not_applicable(gpt2_tokenizer_with_pad):
    model = _tiny_gpt2(SwallowsTheMask)
    assert not takes_mask(model)
    result = lmcheck.padding_invariance(model, gpt2_tokenizer_with_pad, ["Swimming at the beach is"])
    assert result.status == "n/a", result.explanation


def test_a_mask_named_and_ignored_fails_saying_it_has_no_effect(gpt2_tokenizer_with_pad):
    model = _tiny_gpt2(IgnoresTheMask)
    assert takes_mask(model)
    result = lmcheck.padding_invariance(model, gpt2_tokenizer_with_pad, ["Swimming at the beach is"])
    assert result.status == "fail"
    assert "the attention mask has no effect on the logits" in result.explanation


def test_a_healthy_model_has_a_cache_and_takes_the_mask():
    model = _tiny_gpt2()
    assert has_cache(model)
    assert takes_mask(model)


def test_a_model_that_returns_no_cache_is_not_applicable_for_the_cache_check(gpt2_tokenizer_with_pad):
    model = _tiny_gpt2(ReturnsNoCache)
    assert not has_cache(model)
    result = lmcheck.kv_cache_matches_full(model, torch.tensor([[464, 3139, 286, 4881, 318]]))
    assert result.status == "n/a", result.explanation


# ---------------------------------------------------------------- isolation


class RaisesWhenBatched(GPT2LMHeadModel):
    """Raises inside its forward for a batch of more than one row (only batch_invariance batches)."""

    def forward(self, input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[0] > 1:
            raise RuntimeError("this forward takes one row at a time")
        return super().forward(input_ids=input_ids, **kwargs)


def test_a_check_that_raises_is_an_error_and_the_others_still_run(gpt2_tokenizer_with_pad):
    results = run_causal_checks(_tiny_gpt2(RaisesWhenBatched), gpt2_tokenizer_with_pad)
    assert [r.name for r in results] == list(CAUSAL_CHECKS)
    errors = [r for r in results if r.status == "error"]
    assert {r.name for r in errors} == {"greedy_matches_generate", "batch_invariance"}
    assert "RuntimeError: this forward takes one row at a time" in errors[0].error
    assert "in forward" in errors[0].error  # where it was raised
    assert not errors[0]
    assert errors[0].to_dict()["status"] == "error"
    assert {r.status for r in results if r not in errors} <= {"pass", "n/a"}


def test_the_cli_keeps_the_report_and_exits_3_on_an_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "raising_lm.py").write_text(
        "import torch\nfrom transformers import GPT2Config\n"
        "from test_capabilities import RaisesWhenBatched\n"
        "def build():\n    torch.manual_seed(0)\n"
        "    return RaisesWhenBatched(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["check", "raising_lm:build", "--json", "out.json"]) == 3
    out = capsys.readouterr().out
    assert "ERROR batch_invariance" in out
    assert "PASS causality" in out
    saved = {r["name"]: r for r in json.loads((tmp_path / "out.json").read_text())}
    assert saved["batch_invariance"]["status"] == "error"
    assert "this forward takes one row at a time" in saved["batch_invariance"]["error"]


def _masked_loss_in_a_child(queue: multiprocessing.Queue) -> None:
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = lmcheck.load_tokenizer("bert-base-uncased")
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64)).eval()
    result = lmcheck.masked_loss_at_init(model, tokenizer, ["Life is like a box of chocolates."] * 4)
    queue.put(result.status)


def test_masked_loss_at_init_runs_in_a_multiprocessing_child(bert_tokenizer):
    """The collator's own seed= raised ValueError in any child process that is not a DataLoader
    worker; lmcheck seeds a forked generator instead."""
    context = multiprocessing.get_context("spawn")  # a fork of a process running torch's threads may hang
    queue = context.Queue()
    child = context.Process(target=_masked_loss_in_a_child, args=(queue,), daemon=True)
    child.start()
    try:
        status = queue.get(timeout=300)
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert status in ("pass", "fail")
    assert child.exitcode == 0
