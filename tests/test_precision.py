"""The precision probes: what low precision silently loses. Each probe passes on a healthy tiny
Llama (fp32, or bf16 where it keeps fp32 where it must) and fails on its documented bug put in:
the loss over bf16 logits (Modalities PR #464), bf16 weights whose updates round away
(vllm-project/speculators PR #765, workofart/ml-by-hand PR #85), bf16 Adam moments that stop
moving, a softmax in bf16 inside a custom autocast region, an FFN activation past fp16's range
(transformers #5651), two finfo.min masks summed on a fully masked row (transformers PR #17306),
and RoPE tables computed in bf16 (transformers PR #29285)."""

from __future__ import annotations

import math
import re

import pytest
import stacks
import torch
import torch.nn.functional as F
from transformers import DataCollatorForLanguageModeling, Trainer
from transformers.models.llama import modeling_llama

import lmcheck
from lmcheck.errors import InputError
from lmcheck.precision import (
    REPLAYABLE,
    UpdateReplay,
    autocast_ops,
    fp16_headroom,
    loss_precision,
    lost_updates,
    rope_precision,
)


@pytest.fixture(scope="module")
def tok():
    return stacks.chat_tokenizer()


@pytest.fixture
def batch(tok):
    """Two rows of 12 random tokens; the first three labels of row 1 left out (a prompt)."""
    ids = torch.randint(3, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :3] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


class TinyAttentionLM(torch.nn.Module):
    """One causal attention layer between an embedding and an output head, written by hand:
    ``forward(input_ids, attention_mask=None) -> (B, T, V) logits``. Its masks are additive
    ``finfo.min`` biases. ``fault``:

    - ``"softmax_in_bf16"``: the attention's softmax runs on scores cast to bf16 inside a
      custom autocast region (autocast disabled), so autocast cannot keep it in fp32;
    - ``"masks_summed"``: ``finfo.min`` is added where the key is a pad and again where the query
      is a pad, as two masks summed (transformers PR #17306): a fully masked row sums to -inf,
      and its softmax is NaN. Without it the bias is clamped at ``finfo.min``.
    """

    def __init__(self, vocab: int, width: int = 16, *, fault: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fault = fault
        self.embed = torch.nn.Embedding(vocab, width)
        self.attention = TinyAttention(width, fault)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)  # (B, T, C)
        return self.head(x + self.attention(x, attention_mask))  # (B, T, V)


class TinyAttention(torch.nn.Module):
    def __init__(self, width: int, fault: str | None) -> None:
        super().__init__()
        self.fault = fault
        self.qkv = torch.nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, T, C) each
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, T, T)
        low = torch.finfo(scores.dtype).min
        length = x.shape[1]
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        bias = torch.zeros_like(scores).masked_fill(future, low)
        if mask is not None:
            pads = (1 - mask.to(scores.dtype)) * low  # (B, T)
            bias = bias + pads[:, None, :] + pads[:, :, None]  # the keys' mask, then the queries'
            if self.fault != "masks_summed":
                bias = bias.clamp(min=low)
        scores = scores + bias
        if self.fault == "softmax_in_bf16":
            with torch.autocast(x.device.type, enabled=False):  # a custom autocast region
                weights = torch.softmax(scores.to(torch.bfloat16), dim=-1)
        else:
            weights = torch.softmax(scores.float(), dim=-1)
        return weights.to(v.dtype) @ v


def train_step(model, optimizer, batch):
    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return step


def cross_entropy_in_bf16(model, batch):
    """A loss written by hand that casts the logits to bf16 first (Modalities PR #464)."""
    logits = model(input_ids=batch["input_ids"]).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].to(torch.bfloat16).reshape(-1, logits.shape[-1]),
                           batch["labels"][:, 1:].reshape(-1))


# ---------------------------------------------------------------- loss_precision


@pytest.mark.parametrize("setting", ["fp32", "bf16 weights", "bf16 autocast"])
def test_the_model_s_own_loss_is_the_fp32_cross_entropy_of_its_logits(tok, batch, setting):
    """transformers upcasts the logits before its loss, whatever the weights' dtype or autocast."""
    model = stacks.llama(tok)
    if setting == "bf16 weights":
        model = model.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "bf16 autocast"):
        result = loss_precision(model, batch)
    assert result.passed, result.explanation
    assert result.metrics["difference"] <= result.metrics["tolerance"]
    assert result.metrics["logits_dtype"] == ("float32" if setting == "fp32" else "bfloat16")
    assert ("_log_softmax", "float32") in result.metrics["loss_ops"]


def test_a_loss_over_bf16_logits_is_named(tok, batch):
    result = loss_precision(stacks.llama(tok), batch, loss=cross_entropy_in_bf16)
    assert not result.passed
    assert "is the cross-entropy of the logits in bfloat16 (equal to it within 1e-6); the fp32 cross-entropy of " \
           f"the same logits is {result.metrics['reference_loss']:.6g}" in result.explanation
    assert "_log_softmax ran in bfloat16" in result.explanation
    assert "Modalities PR #464" in result.explanation
    # off by up to one bf16 step of the loss (2**-5 between 4 and 8), far above the fp32 tolerance
    assert 100 * result.metrics["tolerance"] < result.metrics["difference"] <= 2 ** -5


def test_a_plain_module_s_loss_is_read_through_its_last_linear(tok, batch):
    model = TinyAttentionLM(len(tok))

    def loss(net, data):
        logits = net(data["input_ids"])
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), data["labels"][:, 1:].reshape(-1))

    result = loss_precision(model, batch, loss=loss)
    assert result.passed, result.explanation
    assert result.metrics["output_head"] == "head"
    bad = loss_precision(model, batch, loss=lambda net, data: loss(net, data).to(torch.bfloat16))
    assert not bad.passed
    assert "differs from the fp32 cross-entropy" in bad.explanation


def test_a_loss_that_never_calls_the_output_head_is_not_applicable(tok, batch):
    result = loss_precision(stacks.llama(tok), batch, loss=lambda model, data: torch.tensor(1.0))
    assert result.status == "n/a"
    assert "lm_head" in result.skip_reason
    assert "was not called" in result.skip_reason


# ---------------------------------------------------------------- lost_updates


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fp32_master_weights_are_not_applicable_unless_forced(tok, batch, autocast):
    """Autocast keeps the weights and the optimizer in fp32: the remedy the failures name."""
    model = stacks.llama(tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plain_step = train_step(model, optimizer, batch)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            plain_step()

    skipped = lost_updates(model, optimizer, step)
    assert skipped.status == "n/a"
    assert "fp32 weights and optimizer state: nothing rounds away" in skipped.skip_reason
    result = lost_updates(model, optimizer, step, force=True)
    assert result.passed, result.explanation
    assert result.metrics["lost_fraction"] == 0
    # the fp64 replay makes Adam's update: about the learning rate per element
    medians = [row["median_intended_update"] for row in result.details]
    assert all(5e-4 < m < 2e-3 for m in medians), medians


@pytest.mark.parametrize("kind", REPLAYABLE, ids=lambda kind: kind.__name__)
def test_the_fp64_replay_makes_the_optimizer_s_own_update(tok, batch, kind):
    """In fp32 each stored weight is within a few fp32 steps of the fp64 replay of its update (at
    most 6 measured, RMSprop's; 0.5 is a replay rounded to fp32): the replay is the optimizer's."""
    model = stacks.llama(tok)
    optimizer = kind(model.parameters(), lr=1e-3, **({"momentum": 0.9} if kind is torch.optim.SGD else {}))
    result = lost_updates(model, optimizer, train_step(model, optimizer, batch), steps=2, force=True)
    assert result.passed, result.explanation
    assert result.metrics["replay_error_ulps"] < 32
    # every element of every weight is meant to move at each step (the tied output head gives every
    # embedding row a gradient), but where Rprop's gradient changed sign: it skips those elements
    elements = 2 * sum(p.numel() for p in model.parameters())
    if kind is torch.optim.Rprop:
        assert 0.9 * elements < result.metrics["intended_updates"] < elements  # 53,372 of 56,384 measured
    else:
        assert result.metrics["intended_updates"] == elements


@pytest.mark.parametrize("kind", REPLAYABLE, ids=lambda kind: kind.__name__)
def test_a_sample_of_each_weight_replays_as_the_whole_does(tok, batch, kind):
    """The optimizers update each element from that element alone: 64 elements of each weight,
    stepped alone, land where the same elements do inside the whole weight (within a few fp32
    steps), and the share of lost updates, each sample counted for the size of its weight, is the
    whole model's (0.11% lost in fp32 with RAdam's and Adadelta's tiny first updates, 0.07% and
    0.04% estimated from the samples)."""
    model = stacks.llama(tok)
    optimizer = kind(model.parameters(), lr=1e-3, **({"momentum": 0.9} if kind is torch.optim.SGD else {}))
    step = train_step(model, optimizer, batch)
    whole = lost_updates(model, optimizer, step, steps=2, force=True)
    sampled = lost_updates(model, optimizer, step, steps=2, force=True, sample=64)
    assert sampled.passed, sampled.explanation
    assert sampled.metrics["replay_error_ulps"] < 32
    weights = list(model.parameters())
    assert sampled.metrics["followed_elements"] <= 64 * len(weights) < sum(p.numel() for p in weights)
    assert sampled.metrics["sample"] == 64
    assert abs(sampled.metrics["lost_fraction"] - whole.metrics["lost_fraction"]) < 2e-3
    # a weight of at most 64 elements is followed whole: the same counts
    by_name = {row["name"]: row for row in whole.details}
    norms = [row for row in sampled.details if row["name"].endswith("norm.weight")]
    assert norms
    assert all((row["intended"], row["lost"]) == (by_name[row["name"]]["intended"], by_name[row["name"]]["lost"])
               for row in norms)


def test_bf16_weights_at_a_small_learning_rate_never_move(tok, batch):
    """vllm-project/speculators PR #765: norm weights stored in bf16 stay at exactly 1.0."""
    model = stacks.llama(tok).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = lost_updates(model, optimizer, train_step(model, optimizer, batch))
    assert not result.passed
    named = result.explanation.split(" steps: ", 1)[1]
    assert named.split(" ", 1)[0].endswith("layernorm.weight"), result.explanation
    assert "100% lost, stored in bfloat16: updates below half its ulp, 0.0039 at 1.0, vanish" in named
    assert "speculators PR #765" in result.explanation
    assert "ml-by-hand PR #85" in result.explanation
    assert result.metrics["lost_fraction_by_parameter"]["model.norm.weight"] == 1.0
    assert result.metrics["lost_fraction"] > 0.5
    assert result.metrics["parameter_dtypes"] == {"bfloat16": len(before)}
    assert result.metrics["state_dtypes"]["exp_avg_sq"] == ["bfloat16"]
    assert result.metrics["replay_error_ulps"] < 4  # 3.2 measured: the stored weights are the replay, rounded
    # everything put back: the weights as before, the optimizer with no state yet
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert not optimizer.state


def test_bf16_adam_moments_that_stop_moving_are_named(tok, batch):
    """An optimizer built on bf16 weights keeps its moments in bf16: once the second moment
    holds the squared gradients (a long run), its decay by beta2 = 0.999 and the new 0.001 g**2
    are below half its bf16 step, so it stops following the gradients."""
    model = stacks.llama(tok).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)  # the weights move
    step = train_step(model, optimizer, batch)
    step()
    model(**batch).loss.backward()
    for p in model.parameters():  # the state of a long run
        optimizer.state[p]["exp_avg_sq"].copy_(p.grad.float() ** 2)
        optimizer.state[p]["step"].fill_(1000)
    optimizer.zero_grad()
    saved = {k: v.clone() for k, v in optimizer.state[model.model.norm.weight].items()}
    result = lost_updates(model, optimizer, step, steps=2, max_lost_fraction=0.05)
    assert not result.passed
    assert result.explanation.startswith("exp_avg_sq stored in bfloat16: ")
    assert "of its intended updates were rounded away" in result.explanation
    assert result.metrics["state_lost_fraction"]["exp_avg_sq"] > 0.5  # 67% measured
    assert result.metrics["lost_fraction"] < 0.05  # the weights move: 0.8% measured
    assert result.metrics["state_lost_fraction"]["exp_avg"] < 0.05
    restored = optimizer.state[model.model.norm.weight]
    assert all(torch.equal(restored[k], v) and restored[k].dtype == v.dtype for k, v in saved.items())


def test_a_step_given_a_closure_is_replayed_once_the_closure_has_run(tok, batch):
    """optimizer.step(closure), as Lightning calls it: the gradients exist only after the
    closure's backward, inside the step; the replay waits for them."""
    model = stacks.llama(tok).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        def closure():
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            return loss
        optimizer.step(closure)

    result = lost_updates(model, optimizer, step)
    assert not result.passed
    assert result.metrics["lost_fraction_by_parameter"]["model.norm.weight"] == 1.0
    assert result.metrics["replay_error_ulps"] < 4
    with UpdateReplay(model, sample=64) as replay:
        for _ in range(2):
            optimizer.step(closure=lambda: step_loss(model, optimizer, batch))
    replayed = replay.result()
    assert not replayed.passed
    assert replayed.metrics["steps"] == 2
    assert replayed.metrics["lost_fraction_by_parameter"]["model.norm.weight"] == 1.0


def step_loss(model, optimizer, batch):
    optimizer.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("kind", [torch.optim.AdamW, torch.optim.SGD], ids=lambda kind: f"fused-{kind.__name__}")
def test_a_fused_optimizer_under_a_grad_scaler_is_replayed_unscaled(tok, batch, kind):
    """torch.amp.GradScaler hands a fused optimizer (its _step_supports_amp_scaling) the gradients
    still scaled by 65536, and the scale and the overflow flag as the attributes grad_scale and
    found_inf for the step (torch 2.13; the step's keyword arguments stay empty): the replay
    divides by the scale, and a step the scaler skips is not compared. A healthy fp32 run then
    loses nothing (SGD: 6 of 56,384 updates, below half an fp32 step), and the stored weights are the
    replay's within 20 fp32 steps (19.6 measured, fused AdamW; 2.3 fused SGD, whose update without
    the division would be 65536 times too large)."""
    model = stacks.llama(tok)
    optimizer = kind(model.parameters(), lr=1e-2, fused=True, **({"momentum": 0.9} if kind is torch.optim.SGD else {}))
    scaler = torch.amp.GradScaler("cpu")
    calls = []

    def step(overflow_at=None):
        calls.append(1)
        scaler.scale(model(**batch).loss).backward()
        if len(calls) == overflow_at:
            model.model.norm.weight.grad[0] = math.inf  # the scaler finds it and skips this step
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()

    result = lost_updates(model, optimizer, step, force=True)
    assert result.passed, result.explanation
    assert result.metrics["lost_fraction"] < 1e-3
    if kind is torch.optim.AdamW:
        assert result.metrics["lost_updates"] == 0
    assert result.metrics["replay_error_ulps"] < 32
    calls.clear()
    skipped = lost_updates(model, optimizer, lambda: step(overflow_at=2), force=True)
    assert skipped.passed, skipped.explanation
    assert skipped.metrics["skipped_steps"] == 1
    assert skipped.metrics["steps"] == 2
    assert "1 step(s) the loss scaler skipped (inf or NaN gradients) are not compared" in skipped.explanation


def test_an_optimizer_it_cannot_replay_is_not_applicable(tok, batch):
    class MyAdamW(torch.optim.AdamW):
        pass

    model = stacks.llama(tok).to(torch.bfloat16)
    optimizer = MyAdamW(model.parameters(), lr=1e-5)
    result = lost_updates(model, optimizer, train_step(model, optimizer, batch))
    assert result.status == "n/a"
    assert "a MyAdamW's step cannot be replayed" in result.skip_reason


# ---------------------------------------------------------------- autocast_ops


def test_an_eager_llama_keeps_softmax_norms_and_loss_in_fp32_under_autocast(tok, batch):
    model = stacks.llama(tok)
    model.set_attn_implementation("eager")
    result = autocast_ops(model, batch)
    assert result.passed, result.explanation
    assert result.metrics["op_dtypes"]["_softmax float32"] == 2  # one per layer
    assert result.metrics["op_dtypes"]["rsqrt float32"] == 5  # the RMSNorms, upcast by hand
    assert result.metrics["fused_attention_calls"] == 0


def test_sdpa_attention_is_counted_as_unseen(tok, batch):
    result = autocast_ops(stacks.llama(tok), batch)
    assert result.passed, result.explanation
    assert result.metrics["fused_attention_calls"] == 2
    assert "attn_implementation='eager'" in result.explanation


def test_a_softmax_in_bf16_inside_a_custom_autocast_region_is_named(tok, batch):
    assert autocast_ops(TinyAttentionLM(len(tok)), batch).passed
    result = autocast_ops(TinyAttentionLM(len(tok), fault="softmax_in_bf16"), batch)
    assert not result.passed
    assert "_softmax ran in bfloat16 in attention" in result.explanation
    assert result.metrics["half_precision_ops"] == 1


def test_a_hand_written_rms_norm_without_its_upcast_is_named(tok, batch):
    """In a bf16 model an RMSNorm that skips transformers' upcast takes its statistics in bf16."""
    model = stacks.llama(tok).to(torch.bfloat16)
    norm = model.model.layers[0].input_layernorm
    norm.forward = lambda h: norm.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    result = autocast_ops(model, batch)
    assert not result.passed
    assert "pow, mean, rsqrt ran in bfloat16 in model.layers.0.input_layernorm" in result.explanation
    assert "model.layers.1" not in result.explanation


# ---------------------------------------------------------------- fp16_headroom


def test_a_tiny_llama_is_far_from_fp16_s_range(tok, batch):
    result = fp16_headroom(stacks.llama(tok), batch)
    assert result.passed, result.explanation
    assert result.metrics["max_ratio"] < 1e-3
    assert "a fully masked row and the real row beside it give finite logits" in result.explanation


def test_an_mlp_activation_past_half_of_fp16_s_range_is_named(tok, batch):
    """transformers #5651: T5's FFN outputs overflow fp16."""
    model = stacks.llama(tok)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e5)
    result = fp16_headroom(model, batch)
    assert not result.passed
    assert result.explanation.startswith("model.layers.0.mlp.up_proj's output reaches ")  # 40,881 measured
    assert "of float16's 65504 (bound 50%, 32,752)" in result.explanation
    assert "transformers #5651" in result.explanation
    assert result.metrics["max_activation"] > 32752
    assert "the real row beside a fully masked one" not in result.explanation  # finite in fp16, barely


def test_two_finfo_min_masks_summed_on_a_fully_masked_row_give_nan(tok, batch):
    """transformers PR #17306: the model is fp16, and runs as it is."""
    assert fp16_headroom(TinyAttentionLM(len(tok)).half(), batch).passed
    result = fp16_headroom(TinyAttentionLM(len(tok), fault="masks_summed").half(), batch)
    assert not result.passed
    assert result.explanation.startswith("a fully masked row gives NaN in float16 (nan at position 0")
    assert "finfo.min plus another negative term" in result.explanation
    assert "transformers PR #17306" in result.explanation
    assert result.metrics["float16_by"] == "weights"


# ---------------------------------------------------------------- rope_precision


def long_llama(tok, positions=8192):
    config = stacks.llama(tok).config
    config.max_position_embeddings = positions
    return modeling_llama.LlamaForCausalLM(config)


def test_fp32_rope_tables_are_accurate_at_8k_positions(tok):
    result = rope_precision(long_llama(tok))
    assert result.passed, result.explanation
    assert result.metrics["context_length"] == 8192
    assert result.metrics["max_error"] < 2e-4  # 1.4e-4 measured
    assert result.metrics["reference"].startswith("recomputed in float64 from the config")


def test_rope_tables_computed_in_bf16_drift_with_the_position(tok, monkeypatch):
    model = long_llama(tok)

    def in_bf16(self, x, position_ids):  # the positions and the angles in bf16
        angle = position_ids[..., None].to(torch.bfloat16) * self.inv_freq.to(torch.bfloat16)
        emb = torch.cat((angle, angle), dim=-1).float()
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", in_bf16)
    result = rope_precision(model)
    assert not result.passed
    assert result.explanation.startswith("as called and under torch.autocast(bfloat16), the RoPE table of "
                                         "model.rotary_emb (float32) drifts")
    assert "transformers PR #29285" in result.explanation
    assert result.metrics["max_error"] > 1


def test_a_rope_matmul_that_autocast_runs_in_bf16_is_named(tok, monkeypatch):
    """transformers PR #29285: before it, the angles were a matmul, which autocast runs in bf16."""
    model = long_llama(tok)

    def matmul(self, x, position_ids):
        angle = (self.inv_freq[None, :, None].float() @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((angle, angle), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", matmul)
    result = rope_precision(model)
    assert not result.passed
    assert result.explanation.startswith("under torch.autocast(bfloat16), the RoPE table")
    assert result.metrics["errors"]["as called"] < 2e-4
    assert rope_precision(model, autocast=False).passed


def test_a_bf16_llama_s_inv_freq_is_named(tok):
    """model.to(torch.bfloat16) casts the inv_freq buffer: the angles drift from position 6 on."""
    result = rope_precision(stacks.llama(tok).to(torch.bfloat16))
    assert not result.passed
    assert "model.rotary_emb.inv_freq is stored in bfloat16" in result.explanation
    assert result.metrics["table_dtype"] == "bfloat16"


ROPE_TYPES = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("kind", ROPE_TYPES)
def test_a_scaled_rope_s_bf16_inv_freq_is_measured_against_transformers_own_frequencies(tok, kind):
    """For a rope type other than the default, the reference frequencies are transformers'
    ROPE_INIT_FUNCTIONS of the config (float32), not the module's buffer: an inv_freq buffer cast
    to bf16 drifts from them (0.016 by position 127 for llama3, 0.054 for yarn, measured)."""
    config = stacks.llama(tok).config
    config.rope_parameters = {"rope_theta": 10000.0, **ROPE_TYPES[kind]}
    model = modeling_llama.LlamaForCausalLM(config)
    healthy = rope_precision(model)
    assert healthy.passed, healthy.explanation
    assert healthy.metrics["reference"] == f"transformers' ROPE_INIT_FUNCTIONS[{kind!r}] of the config, computed in float32"
    assert healthy.metrics["max_error"] < 2e-6  # 4.8e-7 and 1.1e-6 measured
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq.to(torch.bfloat16)
    result = rope_precision(model)
    assert not result.passed
    assert "the RoPE table of model.rotary_emb (float32) drifts from its float64 values" in result.explanation
    assert "model.rotary_emb.inv_freq is stored in bfloat16" in result.explanation
    assert result.metrics["max_error"] > 10 * result.metrics["tolerance"]


def test_a_rope_type_transformers_does_not_know_falls_back_to_the_module_s_own(tok):
    model = stacks.llama(tok)
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_type": "my-rope"}
    result = rope_precision(model)
    assert result.passed, result.explanation
    assert result.metrics["reference"] == ("the module's own inv_freq in float64 (rope type 'my-rope' is not in "
                                           "transformers' ROPE_INIT_FUNCTIONS), whose float32 rounding it shares")


def test_a_model_without_rotary_embeddings_is_not_applicable(tok):
    result = rope_precision(TinyAttentionLM(len(tok)), context_length=16)
    assert result.status == "n/a"
    assert "no rotary embedding module" in result.skip_reason


# ---------------------------------------------------------------- misuse and NaN


@pytest.mark.parametrize(("call", "argument"), [
    (lambda model, batch: loss_precision(model, {"input_ids": batch["input_ids"]}), "'batch'"),
    (lambda model, batch: loss_precision(model, batch, loss="cross_entropy"), "'loss'"),
    (lambda model, batch: lost_updates(model, torch.optim.SGD(model.parameters()), lambda: None, steps=0), "'steps'"),
    (lambda model, batch: lost_updates(model, "adamw", lambda: None), "'optimizer'"),
    (lambda model, batch: autocast_ops(model, batch, dtype=torch.float32), "'dtype'"),
    (lambda model, batch: fp16_headroom(model, batch, fraction=2), "'fraction'"),
    (lambda model, batch: fp16_headroom(model, {**batch, "attention_mask": batch["input_ids"]}),
     "'batch['attention_mask']'"),
    (lambda model, batch: rope_precision(model, context_length=0), "'context_length'"),
], ids=["batch-without-labels", "loss-not-callable", "steps-0", "optimizer-a-str", "dtype-fp32", "fraction-2",
        "mask-not-0-1", "context-0"])
def test_bad_input_raises_input_error_naming_the_argument(tok, batch, call, argument):
    with pytest.raises(InputError, match="^" + re.escape(argument)):
        call(stacks.llama(tok), batch)


def test_a_step_that_never_steps_the_optimizer_raises_and_restores(tok, batch):
    model = stacks.llama(tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(InputError, match=r"'step' must call optimizer.step\(\) \(it stepped 0 times in 16 calls\)"):
        lost_updates(model, optimizer, lambda: model(**batch).loss.backward(), steps=1, force=True)
    assert all(p.grad is None for p in model.parameters())  # the gradients it accumulated are gone


@pytest.mark.parametrize("check", [
    lambda model, batch: loss_precision(model, batch),
    lambda model, batch: lost_updates(model, torch.optim.SGD(model.parameters()), lambda: None),
    lambda model, batch: autocast_ops(model, batch),
    lambda model, batch: fp16_headroom(model, batch),
    lambda model, batch: rope_precision(model),
], ids=["loss_precision", "lost_updates", "autocast_ops", "fp16_headroom", "rope_precision"])
def test_a_nan_weight_fails_naming_the_parameter(tok, batch, check):
    model = stacks.llama(tok)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = math.nan
    result = check(model, batch)
    assert result.status == "fail"
    assert "model.layers.1.mlp.up_proj.weight has 1 NaN" in result.explanation


def test_an_activation_that_overflows_under_fp16_autocast_fails_saying_where(tok, batch):
    """An fp32 model is run under float16 autocast, as mixed-precision training runs it: no copy."""
    model = stacks.llama(tok)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(3e5)  # outputs past 65504: inf in fp16
    result = fp16_headroom(model, batch, fraction=1.0)
    assert result.status == "fail"
    assert "in float16, the real row beside a fully masked one: nan at row 0, position 0" in result.explanation
    assert "the first module whose output is not finite there: model.layers.1.mlp.up_proj" in result.explanation


def test_a_nan_gradient_fails_naming_the_parameter_and_the_step(tok, batch):
    model = stacks.llama(tok).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    before = model.model.norm.weight.detach().clone()

    def step():
        model(**batch).loss.backward()
        if model.model.norm.weight.grad is not None and optimizer.state:
            model.model.norm.weight.grad[4] = math.nan  # at the second step
        optimizer.step()
        optimizer.zero_grad()

    result = lost_updates(model, optimizer, step)
    assert result.status == "fail"
    assert result.explanation.startswith("the gradient of model.norm.weight at optimizer step 2: nan at index (4,)")
    assert torch.equal(model.model.norm.weight, before)  # put back all the same
    assert not optimizer.state


def test_a_nan_gradient_in_a_sample_fails_naming_the_element(tok, batch):
    """Sampled, the non-finite values are looked for among the sampled elements, and read after
    the run: the first in the run's order is named, with its index in the weight."""
    model = stacks.llama(tok).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    weight = model.model.layers[1].mlp.up_proj.weight  # (64, 32): 16 of its elements sampled

    def step():
        model(**batch).loss.backward()
        if optimizer.state:
            weight.grad[:] = math.nan  # at the second step, every element
        optimizer.step()
        optimizer.zero_grad()

    result = lost_updates(model, optimizer, step, sample=16)
    assert result.status == "fail"
    assert re.match(r"the gradient of model\.layers\.1\.mlp\.up_proj\.weight at optimizer step 2: nan at index "
                    r"\(\d+, \d+\) \(1\d of the 1\d sampled values are not finite\)", result.explanation), result.explanation


def test_a_nan_rope_frequency_fails_naming_the_buffer(tok):
    model = stacks.llama(tok)
    model.model.rotary_emb.inv_freq[2] = math.nan
    result = rope_precision(model)
    assert result.status == "fail"
    assert "model.rotary_emb.inv_freq" in result.explanation


# ---------------------------------------------------------------- through the setup checks


def plain_loop(tok, model, lr):
    step = stacks.train_step(model, torch.optim.AdamW(model.parameters(), lr=lr))
    return lmcheck.check_loop(model, step, stacks.padded_loader(tok), tokenizer=tok, overfit_steps=5)


def test_the_setup_check_passes_a_healthy_fp32_loop(tok):
    """fp32 weights without autocast: the loss and the RoPE tables are checked, the rest is n/a."""
    report = plain_loop(tok, stacks.llama(tok), 1e-2)
    result = report["precision"]
    assert result.passed, result.explanation
    assert result.metrics == {"loss_precision": "pass", "rope_precision": "pass", "lost_updates": "n/a",
                              "optimizer_state": "pass"}
    assert result.explanation.startswith("weights in float32: loss_precision: ")


def test_the_setup_check_fails_pure_bf16_weights_first(tok):
    """vllm-project/speculators PR #765 in the user's own loop: weights stored in bf16 at a small
    learning rate; the norm weights never move. precision leads (params_update follows from it),
    naming a norm weight, and the bf16 RoPE tables (model.to(bfloat16) casts inv_freq too)."""
    report = plain_loop(tok, stacks.llama(tok).to(torch.bfloat16), 1e-5)
    failures = report.failures()
    assert failures[0].name == "precision", [(r.name, r.explanation[:80]) for r in failures]
    explanation = failures[0].explanation
    # each step of the run replayed in fp64 on a sample of each bf16 weight's elements
    assert re.search(r"lost_updates: \d+\.\d% of the intended updates were rounded away in 8 steps of the run: "
                     r"model\.layers\.0\.input_layernorm\.weight \(100% lost, stored in bfloat16: updates below "
                     r"half its ulp, 0\.0039 at 1\.0, vanish", explanation), explanation
    assert "(replayed in float64 on a fixed sample of at most 4,096 elements of each weight" in explanation
    replay = failures[0].metrics["lost_updates_replay"]
    assert replay["lost_fraction"] > 0.5  # 90% measured
    assert replay["replay_error_ulps"] < 4  # 2.0 measured: the stored weights are the replay, rounded
    assert replay["steps"] == 8
    assert "did not change at all" not in explanation  # the approximation is not needed
    assert "rope_precision: " in explanation
    assert "optimizer_state: the optimizer keeps exp_avg_sq in half precision" in explanation
    assert report["params_update"].explanation.startswith("follows from precision")


def test_the_setup_check_counts_the_elements_of_a_weight_that_moved_only_in_part(tok):
    """A bf16 weight a quarter of whose rows sit at 8, where half a bf16 step is 0.031: AdamW's
    updates of about 0.01 move the other elements and vanish on those. Every trainable weight
    changes (params_update passes: the whole-weight check would see nothing); the element-wise
    replay counts 25% of the updates lost and fails, naming the weight."""
    model = stacks.llama(tok).to(torch.bfloat16)
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.compute_default_rope_parameters(model.config)[0]  # fp32 again: only the weights bf16
    weight = model.model.layers[0].mlp.up_proj.weight
    for p in model.parameters():
        p.requires_grad_(p is weight)
    with torch.no_grad():
        weight[::4] = 8 * torch.sign(weight[::4])
    step = stacks.train_step(model, torch.optim.AdamW([weight], lr=1e-2))
    report = lmcheck.check_loop(model, step, stacks.padded_loader(tok), tokenizer=tok, overfit_steps=5)
    assert report["params_update"].passed, report["params_update"].explanation
    result = report["precision"]
    assert result.metrics["lost_updates"] == "fail"
    assert result.metrics["rope_precision"] == "pass"
    assert "lost_updates: 25.4% of the intended updates were rounded away in 8 steps of the run: " \
           "model.layers.0.mlp.up_proj.weight (25% lost, stored in bfloat16" in result.explanation
    assert 0.24 < result.metrics["lost_updates_replay"]["lost_fraction"] < 0.27


def test_the_setup_check_approximates_an_optimizer_it_cannot_replay(tok):
    """A subclass may change the step: the first run's steps are not replayed, and the row falls
    back to the half-precision weights that did not change at all, saying why."""
    class MyAdamW(torch.optim.AdamW):
        pass

    model = stacks.llama(tok).to(torch.bfloat16)
    step = stacks.train_step(model, MyAdamW(model.parameters(), lr=1e-5))
    report = lmcheck.check_loop(model, step, stacks.padded_loader(tok), tokenizer=tok, overfit_steps=5)
    explanation = report["precision"].explanation
    assert "half-precision weights did not change at all in 8 optimizer steps" in explanation
    assert "(first: model.layers.0.input_layernorm.weight)" in explanation
    assert "(approximate, whole weights only: the element-wise replay was not possible, the half-precision " \
           "weights are trained by a MyAdamW, not one of torch.optim's element-wise optimizers" in explanation
    assert "lost_updates_replay" not in report["precision"].metrics


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process: a Trainer made with bf16=True leaves
    bf16 in it for every Accelerator made after, in other tests too. Reset after the test."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_setup_check_reads_the_trainers_autocast(tok, tmp_path, fresh_accelerate_state):
    """A Trainer with bf16=True: the ops under its autocast are traced, and stay in fp32."""
    trainer = Trainer(model=stacks.llama(tok), args=stacks.training_arguments(str(tmp_path), bf16=True),
                      train_dataset=stacks.examples(tok),
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False), processing_class=tok)
    report = lmcheck.check_trainer(trainer, steps=2, overfit_steps=5)
    result = report["precision"]
    assert result.passed, result.explanation
    assert result.metrics["autocast_ops"] == "pass"
    assert report.setup["mixed precision"] == "bf16"


@pytest.mark.gpu
def test_on_a_gpu_the_ops_under_cuda_autocast_and_the_lost_updates(tok, batch):
    """CUDA's autocast keeps softmax, the norms and the loss in fp32 (eager attention, so the
    softmax is seen); pure bf16 weights lose their norm updates on the GPU as on the CPU."""
    model = stacks.llama(tok).cuda()
    model.config._attn_implementation = "eager"
    on_gpu = {k: v.cuda() for k, v in batch.items()}
    traced = autocast_ops(model, on_gpu, dtype=torch.bfloat16)
    assert traced.passed, traced.explanation
    model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    lost = lost_updates(model, optimizer, train_step(model, optimizer, on_gpu))
    assert not lost.passed
    assert "layernorm.weight (100% lost" in lost.explanation


@pytest.mark.gpu
def test_on_a_gpu_the_sampled_replay_and_a_fused_optimizer_under_a_grad_scaler(tok, batch):
    """The sample's indices stay on the GPU and its numbers are read back once, after the run;
    CUDA's GradScaler hands a fused AdamW the gradients scaled, and the replay unscales them."""
    on_gpu = {k: v.cuda() for k, v in batch.items()}
    model = stacks.llama(tok).cuda().to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sampled = lost_updates(model, optimizer, train_step(model, optimizer, on_gpu), sample=64)
    assert not sampled.passed
    assert "layernorm.weight (100% lost" in sampled.explanation
    model = stacks.llama(tok).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cuda")

    def step():
        scaler.scale(model(**on_gpu).loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()

    fused = lost_updates(model, optimizer, step, force=True, sample=4096)
    assert fused.passed, fused.explanation
    assert fused.metrics["replay_error_ulps"] < 32

