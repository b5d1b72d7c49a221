"""Two plain-PyTorch causal LM families, written the way people write them outside ``transformers``,
each with broken twins that lmcheck's probes must catch.

- :class:`NanoGPT`: nanoGPT's shape. ``forward(idx, targets=None)`` returns ``(logits, loss)``;
  without targets only the last position's logits (what generation needs), with targets every
  position's and the cross-entropy over *pre-shifted* targets (``x = data[i:i+T]``,
  ``y = data[i+1:i+T+1]``), ignoring -1. Learned absolute positions, tied input and output
  embeddings, causal attention through ``scaled_dot_product_attention``.
- :class:`RotaryLM`: ``forward(input_ids, attention_mask=None)`` returns the bare ``(B, T, V)``
  logits tensor. Rotary positions counted from the mask (a left pad takes no position), a key
  padding mask, untied output layer. lmcheck recognises it without any wrapping.

The faults (``fault=``): ``"future_leak"`` attends to every position (the causal mask is
dropped), ``"cut_gradient"`` detaches the hidden state after the first block (so the embeddings
and that block learn nothing from the loss), ``"attends_to_pads"`` (RotaryLM) takes the mask but
masks no key with it, so a left-padded prompt attends to its pads. (Counting pads when numbering
the positions would be no fault here: rotary attention depends only on the distance between two
positions, so shifting them all by the same number of pads changes nothing.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FAULTS = ("future_leak", "cut_gradient", "attends_to_pads")


@dataclass(frozen=True)
class Config:
    vocab_size: int = 50257
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32


class Attention(nn.Module):
    def __init__(self, config: Config, *, causal: bool, rotary: bool) -> None:
        super().__init__()
        self.n_head, self.causal, self.rotary = config.n_head, causal, rotary
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                keys: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2)
                   for t in self.qkv(x).split(width, dim=2))  # (B, H, T, D) each
        if self.rotary:
            q, k = rotate(q, positions), rotate(k, positions)
        allowed = None
        if self.causal:
            allowed = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        if keys is not None:  # (B, T): 1 where the key is a real token
            padding = keys.bool()[:, None, None, :]  # (B, 1, 1, T)
            allowed = padding if allowed is None else allowed & padding
            allowed = allowed | torch.eye(length, dtype=torch.bool, device=x.device)  # a pad sees itself
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` (B, H, T, D) at ``positions`` (B, T)."""
    half = x.shape[-1] // 2
    frequencies = 10000 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions[:, None, :, None].float() * frequencies  # (B, 1, T, D/2)
    cos, sin = angles.cos(), angles.sin()
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, config: Config, *, causal: bool, rotary: bool) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(config.n_embd), nn.LayerNorm(config.n_embd)
        self.attn = Attention(config, causal=causal, rotary=rotary)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd))

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                keys: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), positions, keys)
        return x + self.mlp(self.ln_2(x))


def _init(module: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases (so the loss at init is near ln V)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class NanoGPT(nn.Module):
    """nanoGPT's GPT, small: ``forward(idx, targets=None) -> (logits, loss)``."""

    def __init__(self, config: Config = Config(), *, fault: str | None = None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.config, self.fault = config, fault
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList(Block(config, causal=fault != "future_leak", rotary=False)
                            for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(_init)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in nanoGPT

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        _, length = idx.size()
        if length > self.config.block_size:
            raise ValueError(f"Cannot forward sequence of length {length}, block size is only "
                             f"{self.config.block_size}")
        pos = torch.arange(0, length, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for index, block in enumerate(self.transformer.h):
            x = block(x)
            if index == 0 and self.fault == "cut_gradient":
                x = x.detach()
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            return logits, loss
        return self.lm_head(x[:, [-1], :]), None  # inference: the last position only


class RotaryLM(nn.Module):
    """A rotary-position causal LM: ``forward(input_ids, attention_mask=None) -> logits``."""

    def __init__(self, config: Config = Config(), *, fault: str | None = None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.config, self.fault = config, fault
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, causal=fault != "future_leak", rotary=True)
                                    for _ in range(config.n_layer))
        self.norm = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(_init)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        keys = None if self.fault == "attends_to_pads" else attention_mask
        if attention_mask is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # pads take no position
        x = self.embed(input_ids)
        for index, block in enumerate(self.blocks):
            x = block(x, positions, keys)
            if index == 0 and self.fault == "cut_gradient":
                x = x.detach()
        return self.head(self.norm(x))


def nanogpt_logits(model: NanoGPT):
    """The ``logits`` function for ``lmcheck.adapt``: with targets, nanoGPT returns every position."""
    return lambda ids: model(ids, ids)[0]


def nanogpt_loss(model: NanoGPT, *, shift: int = 1):
    """The ``loss`` function for ``lmcheck.adapt``: nanoGPT's own loss on a Hugging Face-style batch
    (labels = inputs, -100 unsupervised). ``shift=1`` is right; 0 and 2 are the documented bugs."""
    def loss(batch):
        ids, labels = batch["input_ids"], batch["labels"].masked_fill(batch["labels"] == -100, -1)
        length = ids.shape[1]
        return model(ids[:, : length - shift] if shift else ids, labels[:, shift:].contiguous())[1]
    return loss


def mean_over_every_label(model: nn.Module):
    """A ``loss`` for ``lmcheck.adapt`` with the wrong token count: the shifted loss summed over the
    supervised tokens, divided by every label position, -100 included (transformers #46204)."""
    def loss(batch):
        logits = model(batch["input_ids"])
        labels = batch["labels"][:, 1:]
        total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                ignore_index=-100, reduction="sum")
        return total / labels.numel()
    return loss


def mean_over_unshifted_count(model: nn.Module):
    """A ``loss`` for ``lmcheck.adapt`` that counts the supervised labels before the shift, label
    position 0 included, so every loss is scaled by about (T-1)/T (transformers #46204)."""
    def loss(batch):
        logits, labels = model(batch["input_ids"]), batch["labels"]
        total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                ignore_index=-100, reduction="sum")
        return total / (labels != -100).sum()
    return loss


def reference_loss_by_hand(model: nn.Module):
    """The right ``loss`` for ``lmcheck.adapt`` over a model that returns logits."""
    def loss(batch):
        logits = model(batch["input_ids"])
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    return loss

