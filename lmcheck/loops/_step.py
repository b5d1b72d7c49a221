"""What both of lmcheck's AdamW loops share: the optimizer step and the seeded data order."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW over every parameter, no weight decay: the loops' optimizer."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def optimizer_step(model: torch.nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                   max_grad_norm: float = 1.0) -> None:
    """Backward, clip the gradient norm to ``max_grad_norm``, step, and clear the gradients."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def seeded_batches(count: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Row indices, ``batch_size`` at a time, epoch after epoch without end: each epoch a fresh
    permutation from one seeded generator; an epoch's last batch may be shorter."""
    order = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(count, generator=order).split(batch_size)
