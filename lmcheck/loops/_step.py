"""What both of lmcheck's AdamW loops share: the optimizer step and the seeded data order."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def adamw(model: torch.nn.Module, lr: float, *, embedding_lr: float | None = None,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over every parameter, no weight decay: the loops' optimizer.

    ``embedding_lr`` gives every ``nn.Embedding`` table (token and learned positions; a tied
    output layer shares the token table) a learning rate of its own; None: ``lr``. Each step is
    the fused kernel where the parameters live on a CPU or a CUDA device.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    groups: list[dict] = [{"params": [p for p in parameters if id(p) not in tables], "lr": lr}]
    if embedding_lr is not None:
        groups.append({"params": [p for p in parameters if id(p) in tables], "lr": embedding_lr})
    else:
        groups[0]["params"] = parameters
    groups = [g for g in groups if g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=0.0, fused=fused or None)


def warmup_then_decay(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                      decay: str) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then the rate held (``decay="constant"``) or
    brought down linearly to 0 at ``total_steps`` (``"linear"``)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
