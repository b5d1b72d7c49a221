"""lora_adapters: a PEFT LoRA covers the model, trains, saves, reloads and merges. Healthy
adapters on a tiny Llama pass; each documented adapter bug put into one fails with its cause
named; a resize keeps the old vocabulary's rows of a base loaded from a folder (a head
re-initialised after it fails, naming its rows; without the folder the part is not checked);
through the setup checks, a LoRA whose weights are left out of the user's optimizer fails."""

from __future__ import annotations

import functools
import math

import pytest
import stacks
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

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
    assert result.metrics["resize_check"] == "no resize"  # the base's vocabulary is its checkpoint's
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


# ---------------------------------------------------------------- the resize keeps the old vocabulary


def untied_base(tok, folder, kind, *, steps=20):
    """A tiny base with an untied head (Llama's layout, or GPT-2's: ``transformer.wte``, a
    ``Conv1D`` body), trained a little as ``stacks.pretrained_llama`` is (a LoRA's base must predict
    better than chance), saved and loaded back: its config names the folder. ``gpt2-sharded`` is
    saved in shards with an index; ``gpt2-hub-keys`` renames the checkpoint's keys as GPT-2's hub
    checkpoint has them (``wte.weight``, saved from ``GPT2Model``)."""
    torch.manual_seed(3)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=128, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False))
    else:
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, tie_word_embeddings=False))
    rows = [tok(s)["input_ids"] + [tok.eos_token_id] for s in stacks.sentences(32, seed=9)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder, max_shard_size="40KB" if kind == "gpt2-sharded" else "5GB")
    if kind == "gpt2-hub-keys":
        file = f"{folder}/model.safetensors"
        tensors = {k.removeprefix("transformer."): v for k, v in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(folder)


BASES = ["llama", "gpt2-sharded", "gpt2-hub-keys"]
EMBEDDINGS = {"llama": "model.embed_tokens.weight", "gpt2-sharded": "transformer.wte.weight",
              "gpt2-hub-keys": "transformer.wte.weight"}


def lora_for(model, **options):
    """LoRA on every linear layer; GPT-2's Conv1D layers store their weight transposed."""
    return stacks.lora(model, fan_in_fan_out=type(model).__name__.startswith("GPT2"), **options)


@pytest.mark.parametrize("kind", BASES, ids=BASES)
def test_a_resize_that_keeps_the_old_rows_passes(tok, batch, tmp_path, kind):
    """transformers' resize copies the old rows and mean-initialises the new ones: the old
    vocabulary's rows of the embedding and of the untied head are the checkpoint's, value for value."""
    model = untied_base(tok, str(tmp_path / "base"), kind)
    model.resize_token_embeddings(len(tok) + 4)
    result = lora_adapters(lora_for(model), batch)
    assert result.passed, result.explanation
    assert result.metrics["resize_check"] == "rows kept"
    assert (result.metrics["old_vocabulary"], result.metrics["old_rows_changed"]) == (len(tok), 0)
    assert f"the output head (base_model.model.lm_head.weight: {len(tok)} of {len(tok) + 4} rows)" \
           in result.explanation
    assert result.metrics["resize_unchecked"] == []


@pytest.mark.parametrize("kind", BASES, ids=BASES)
def test_a_head_reinitialised_after_a_resize_fails_naming_its_rows(tok, batch, tmp_path, kind):
    """transformers PR #45079: before it, ``post_init`` after a resize re-initialised the new,
    untied head (``_init_weights`` on it, as here); the adapter then trains on a random head."""
    model = untied_base(tok, str(tmp_path / "base"), kind)
    model.resize_token_embeddings(len(tok) + 4)
    model._init_weights(model.lm_head)
    result = lora_adapters(lora_for(model), batch)
    assert not result.passed
    assert f"the resize changed the old vocabulary's rows of the output head: {len(tok)} of the {len(tok)} old rows " \
           f"of base_model.model.lm_head.weight differ from lm_head.weight in {tmp_path / 'base'} (first: row 0)" \
           in result.explanation
    assert "transformers PR #45079" in result.explanation
    assert f"base_model.model.{EMBEDDINGS[kind]}" not in result.explanation  # the embedding's rows were kept
    assert result.metrics["resize_check"] == "rows changed"


def test_a_tied_head_is_compared_as_the_embedding(tok, batch, pretrained):
    """A tied head is the embedding: its rows are compared once, under the embedding's name."""
    pretrained.resize_token_embeddings(len(tok) + 4)
    result = lora_adapters(stacks.lora(pretrained), batch)
    assert result.passed, result.explanation
    assert "the output head (tied to the input embedding) (base_model.model.model.embed_tokens.weight: " \
           f"{len(tok)} of {len(tok) + 4} rows)" in result.explanation
    model = LlamaForCausalLM.from_pretrained(pretrained.name_or_path)
    model.resize_token_embeddings(len(tok) + 4)
    with torch.no_grad():
        model.model.embed_tokens.weight[7:9].normal_()
    result = lora_adapters(stacks.lora(model), batch)
    assert not result.passed
    assert "rows of the output head (tied to the input embedding): 2 of the" in result.explanation
    assert "(first: row 7)" in result.explanation


WRAPS = {
    "modules_to_save": dict(modules_to_save=["lm_head", "embed_tokens"]),
    "trainable_token_indices": dict(trainable_token_indices={"embed_tokens": [1, 2, 300, 301]}),
    "lora_on_the_head": dict(target_modules=["q_proj", "v_proj", "lm_head", "embed_tokens"]),
}
BASE_HEADS = {"modules_to_save": "base_model.model.lm_head.original_module.weight",
              "trainable_token_indices": "base_model.model.lm_head.weight",
              "lora_on_the_head": "base_model.model.lm_head.base_layer.weight"}


@pytest.mark.parametrize("wrap", list(WRAPS), ids=list(WRAPS))
def test_the_base_rows_are_compared_not_the_adapters(tok, batch, tmp_path, wrap):
    """Under PEFT's wrappers the base's weights are compared (``original_module``, ``base_layer``):
    the adapter's own copy or deltas may change the old rows, as training does; a head
    re-initialised before wrapping still fails, under the base's name."""
    model = untied_base(tok, str(tmp_path / "base"), "llama")
    model.resize_token_embeddings(len(tok) + 4)
    adapted = stacks.lora(model, **WRAPS[wrap])
    with torch.no_grad():  # what the adapter learned: its copy, its token deltas, its lora_B
        for name, parameter in adapted.named_parameters():
            if parameter.requires_grad and ("modules_to_save" in name or "trainable_tokens_delta" in name
                                            or "lora_embedding_B" in name or "lm_head.lora_B" in name):
                parameter.add_(1.0)
    result = lora_adapters(adapted, batch)
    assert result.metrics["resize_check"] == "rows kept", result.explanation
    assert BASE_HEADS[wrap] in result.metrics["resize_note"]
    model = untied_base(tok, str(tmp_path / "again"), "llama")
    model.resize_token_embeddings(len(tok) + 4)
    model._init_weights(model.lm_head)
    result = lora_adapters(stacks.lora(model, **WRAPS[wrap]), batch)
    assert not result.passed
    assert f"{len(tok)} of the {len(tok)} old rows of {BASE_HEADS[wrap]} differ from lm_head.weight" \
           in result.explanation


def test_a_load_that_cast_the_dtype_is_compared_in_the_live_dtype(tok, batch, tmp_path):
    """Loaded in bfloat16 from float32: the saved rows cast as the load cast them are the live
    rows bit for bit; one ulp off in one row is a change."""
    untied_base(tok, str(tmp_path / "base"), "llama")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.bfloat16)
    model.resize_token_embeddings(len(tok) + 4)
    result = lora_adapters(stacks.lora(model), batch)
    assert result.metrics["resize_check"] == "rows kept", result.explanation
    with torch.no_grad():
        value = model.lm_head.weight[11, 3]
        model.lm_head.weight[11, 3] = torch.nextafter(value, value + 1)
    result = lora_adapters(stacks.lora(model), batch)
    assert not result.passed
    assert f"1 of the {len(tok)} old rows of base_model.model.lm_head.weight differ" in result.explanation
    assert "(first: row 11)" in result.explanation


def test_a_checkpoint_with_non_finite_rows_fails_saying_where(tok, batch, tmp_path):
    """An Inf in the saved head is no row to keep: it fails by construction, saying where."""
    model = untied_base(tok, str(tmp_path / "base"), "llama")
    with torch.no_grad():
        model.lm_head.weight[5, 2] = math.inf
    model.save_pretrained(str(tmp_path / "base"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    with torch.no_grad():
        model.lm_head.weight[5, 2] = 0.0  # the live head is finite: only the checkpoint is broken
    model.resize_token_embeddings(len(tok) + 4)
    result = lora_adapters(stacks.lora(model), batch)
    assert not result.passed
    assert "the checkpoint's lm_head.weight in" in result.explanation
    assert "is not finite (inf at row 5, column 2" in result.explanation


def in_memory(model, folder):
    return stacks.llama(stacks.chat_tokenizer())


def hub_id(model, folder):
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M"
    return model


def bin_only(model, folder):
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"")  # never opened: lmcheck reads no pickle
    model.config._name_or_path = str(folder)
    return model


@pytest.mark.parametrize(("source", "said"), [
    (in_memory, "the base was built in memory (its config names no folder it was loaded from)"),
    (hub_id, "the base names 'HuggingFaceTB/SmolLM2-135M', not a local folder (a Hub id"),
    (bin_only, "holds no *.safetensors weights (only pytorch_model.bin: lmcheck reads safetensors only"),
], ids=["in-memory", "hub-id", "bin-only"])
def test_without_the_pre_resize_weights_the_resize_is_not_checked(tok, batch, pretrained, tmp_path, source, said):
    """No folder with safetensors: the part is said to be not checked, never folded into a pass;
    the chance-level check still runs where the base names where it came from."""
    model = source(pretrained, tmp_path / "weights")
    model.resize_token_embeddings(len(tok) + 4)
    result = lora_adapters(stacks.lora(model), batch)
    assert result.passed, result.explanation
    assert result.metrics["resize_check"] == "not checked"
    assert "whether a resize kept the old vocabulary's rows was not checked: " in result.explanation
    assert said in result.explanation
    assert ("base_loss" in result.metrics) == (source is not in_memory)  # the chance-level check ran
