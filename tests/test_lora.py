"""lora_adapters: a PEFT LoRA covers the model, trains, saves, reloads and merges. Healthy
adapters on a tiny Llama pass; each documented adapter bug put into one fails with its cause
named; through the setup checks, a LoRA whose weights are left out of the user's optimizer fails."""

from __future__ import annotations

import functools
import math

import pytest
import stacks
import torch

import lmcheck
from lmcheck.errors import InputError
from lmcheck.lora import lora_adapters

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tok():
    return stacks.chat_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    ids = torch.tensor([tok(s)["input_ids"][:8] for s in stacks.sentences(2, seed=9, low=8, high=9)])
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


@pytest.fixture
def pretrained(tok, tmp_path):
    return stacks.pretrained_llama(tok, str(tmp_path / "base"), steps=20)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_a_healthy_lora_passes_and_is_put_back(tok, batch, pretrained, targets):
    """The original LoRA recipe (q and v: 4 of 14 linear layers) and all-linear both pass; the
    probe's own steps are undone: lora_B is zero again, and the adapter is the one active."""
    model = stacks.lora(pretrained, target_modules=targets)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = lora_adapters(model, batch)
    assert result.passed, result.explanation
    assert result.metrics["coverage"] == (1.0 if targets == "all-linear" else 4 / 14)
    assert result.metrics["reloaded_gap"] <= 1e-4
    assert result.metrics["adapter_effect"] > 1e-3
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert model.active_adapter == "default"
    assert list(model.peft_config) == ["default"]


def test_an_adapter_on_one_projection_of_one_layer_fails(tok, batch):
    """peft #3554: targets that cover a sliver of the model (NemotronH: 7% of its layers)."""
    model = stacks.lora(stacks.llama(tok), target_modules=r"model\.layers\.0\.self_attn\.q_proj")
    result = lora_adapters(model, batch)
    assert not result.passed
    assert "the adapter covers 1 of the base's 14 linear layers (7%, below 10%" in result.explanation
    assert "1 block(s) carry no adapter (first: model.layers.1)" in result.explanation
    assert "peft #3554" in result.explanation


def test_a_pattern_that_matches_nothing_beside_one_that_matches_fails(tok, batch):
    """peft #40: PEFT refuses targets that match nothing at all, not one typo among good names."""
    result = lora_adapters(stacks.lora(stacks.llama(tok), target_modules=["q_proj", "v_prj"]), batch)
    assert not result.passed
    assert "target_modules pattern(s) 'v_prj' match no module" in result.explanation
    assert result.metrics["unmatched_patterns"] == ["v_prj"]


def test_reentrant_checkpointing_with_frozen_embeddings_fails(tok, batch):
    """transformers #26334: with use_reentrant=True and frozen embeddings no input of a
    checkpointed block requires grad. transformers and PEFT now register a hook on the
    embeddings that makes their output require grad; without it (older versions, or a model
    whose hook was lost) the adapters get no gradient."""
    base = stacks.llama(tok)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = stacks.lora(base)
    model.get_base_model().get_input_embeddings()._forward_hooks.clear()
    model.train()
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        result = lora_adapters(model, batch)
    assert not result.passed
    assert "the loss does not require grad" in result.explanation
    assert "enable_input_require_grads" in result.explanation
    assert "transformers #26334" in result.explanation


def test_an_adapter_saved_without_its_resized_embedding_fails(tok, batch, pretrained):
    """artidoro/qlora #214: new tokens, the resized embedding made trainable, then saved without
    it: a reloaded model gets the base's rows. (PEFT now saves a resized embedding by default;
    the user's save here passes save_embedding_layers=False, as older versions behaved.)"""
    pretrained.resize_token_embeddings(len(tok) + 4, mean_resizing=False)
    model = stacks.lora(pretrained)
    model.get_base_model().get_input_embeddings().weight.requires_grad_(True)
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    result = lora_adapters(model, batch)
    assert not result.passed
    assert "1 trainable parameter(s) are not in the saved adapter (first: " \
           "base_model.model.model.embed_tokens.weight)" in result.explanation
    assert "artidoro/qlora #214" in result.explanation


def test_an_untied_head_reinitialised_after_a_resize_fails(tok, batch, pretrained):
    """transformers PR #45079: a resized, untied head re-initialised by post_init: the
    pretrained base predicts no better than chance, so the adapter trains on gibberish."""
    pretrained.config.tie_word_embeddings = False
    pretrained.lm_head.weight = torch.nn.Parameter(torch.randn_like(pretrained.lm_head.weight) * 0.02)
    result = lora_adapters(stacks.lora(pretrained), batch)
    assert not result.passed
    assert "predicts the batch no better than chance" in result.explanation
    assert result.metrics["base_loss"] > 0.9 * math.log(len(tok))
    assert "transformers PR #45079" in result.explanation


def test_a_head_untied_from_embeddings_the_config_ties_fails(tok, batch):
    model = stacks.llama(tok)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    result = lora_adapters(stacks.lora(model), batch)
    assert not result.passed
    assert "the config ties the embeddings (tie_word_embeddings=True) but the output head" in result.explanation


def test_a_model_without_an_adapter_is_not_applicable(tok, batch):
    result = lora_adapters(stacks.llama(tok), batch)
    assert result.status == "n/a"
    assert "not a PEFT model (LlamaForCausalLM)" in result.explanation


def test_non_finite_weights_fail_naming_them(tok, batch):
    model = stacks.lora(stacks.llama(tok))
    with torch.no_grad():
        model.get_base_model().model.layers[0].mlp.up_proj.weight[0, 0] = math.nan
    result = lora_adapters(model, batch)
    assert not result.passed
    assert "up_proj" in result.explanation


@pytest.mark.parametrize(("argument", "value", "said"), [
    ("batch", {"input_ids": torch.ones(1, 3, dtype=torch.long)}, "'batch' must be a mapping with 'input_ids' and 'labels'"),
    ("min_coverage", 2.0, "'min_coverage'"),
    ("steps", 0, "'steps'"),
    ("lr", math.nan, "'lr'"),
])
def test_bad_input_names_the_argument(tok, batch, argument, value, said):
    arguments = {"model": stacks.lora(stacks.llama(tok)), "batch": batch, argument: value}
    with pytest.raises(InputError, match=said):
        lora_adapters(**arguments)


# ---------------------------------------------------------------- through the setup checks


def test_lora_weights_left_out_of_the_users_optimizer_fail(tok, pretrained):
    """A plain loop whose optimizer holds only the lora_A weights: lora_B never leaves zero, the
    adapter's output stays zero (peft #1402). params_update names the parameters first; the
    adapters check says what it means for the adapter."""
    model = stacks.lora(pretrained)
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_A" in n], lr=1e-2)
    report = lmcheck.check_loop(model, stacks.train_step(model, optimizer), stacks.padded_loader(tok), tokenizer=tok, overfit_steps=5)
    assert report.failures()[0].name in ("gradient_flow", "params_update")
    assert not report["adapters"].passed
    assert "lora_B weight(s) are still zero after" in report["adapters"].explanation
    assert "peft #1402" in report["adapters"].explanation
