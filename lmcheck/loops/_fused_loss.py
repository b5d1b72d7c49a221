"""A fused, chunked linear cross-entropy: the output layer and the loss in one pass.

A small GPT-2 spends nearly all of its training FLOPs in the output layer: at width 128, 39 of
the 41 MFLOP per token go to the 50,257-wide vocabulary. Computed the usual way, the step writes
the (tokens x 50,257) fp32 logits (206 MB at 8 x 128 tokens), reads them back for the softmax,
writes their gradient and reads that twice more. Here the logits of ``chunk`` positions at a time
are made, turned into their gradient in place (softmax minus one-hot) while they are still in
cache, and multiplied out at once into the gradients of the hidden states and of the output
weight; the backward pass hands over what the forward pass made. The same logits give the
argmax at every position for free: the teacher-forced prediction the memorization screen reads.

The method is the fused linear cross-entropy of Liger Kernel and of Apple's Cut Cross-Entropy,
written here in plain PyTorch so that it runs on a CPU. The result equals ``F.cross_entropy``
over ``hidden @ weight.T`` (mean over the supervised positions, ``-100`` ignored) up to float
rounding; the tests compare the two, loss and gradients.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                predict: torch.Tensor | None, chunk: int, grads: bool) -> tuple[torch.Tensor, torch.Tensor]:
        supervised = targets != IGNORE_INDEX
        count = max(int(supervised.sum()), 1)
        grad_hidden = torch.empty_like(hidden) if grads else None
        grad_weight = torch.empty_like(weight) if grads else None  # the first chunk writes it whole
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        predicted = torch.full(targets.shape, -1, dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]  # (c, d)
            keep = supervised[start:start + chunk].unsqueeze(1)  # (c, 1)
            target = targets[start:start + chunk].clamp_min(0).unsqueeze(1)  # (c, 1)
            logits = h @ weight.T  # (c, V)
            if predict is None:
                predicted[start:start + chunk] = logits.max(dim=-1).indices
            elif (rows := predict[start:start + chunk].nonzero().squeeze(1)).numel():
                predicted[start + rows] = logits[rows].max(dim=-1).indices  # a pass: ask only for what is read
            # Four passes over the logits, all in place: max, subtract, exp, sum. The softmax is
            # left unnormalised; its 1 / sum folds into the rows' scale below.
            top = logits.amax(dim=-1, keepdim=True)
            picked = logits.gather(1, target)
            exp = logits.sub_(top).exp_()
            sums = exp.sum(dim=-1, keepdim=True)
            total += ((top + sums.log() - picked) * keep).sum(dtype=torch.float32)
            if not grads:
                continue
            exp.scatter_add_(1, target, -sums)  # sum * (softmax - one-hot)
            scale = keep.to(h.dtype) / (count * sums)  # unsupervised rows get no gradient
            part = grad_hidden[start:start + chunk]  # type: ignore[index]
            torch.mm(exp, weight, out=part)
            part *= scale
            if start == 0:
                torch.mm(exp.T, h * scale, out=grad_weight)
            else:
                grad_weight.addmm_(exp.T, h * scale)  # type: ignore[union-attr]
        # Kept on ctx (they are neither inputs nor outputs) rather than saved, and handed over by
        # the one backward pass, so that autograd takes them as they are: measured on 2 CPU cores,
        # copying the output weight's (V x d) gradient to scale it by 1 cost 10 of 188 ms a step.
        ctx.grads = (grad_hidden, grad_weight)
        ctx.mark_non_differentiable(predicted)
        return total / count, predicted

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_predicted: Any) -> tuple[Any, ...]:
        grads = ctx.__dict__.pop("grads", None)
        if grads is None:
            raise RuntimeError("the fused linear cross-entropy's backward runs once per forward: its "
                               "gradients are handed over, not kept (retain_graph=True cannot reuse them)")
        grad_hidden, grad_weight = grads
        # backward() of the loss itself gives 1; on a GPU, scaling costs less than asking (a sync)
        if grad_loss.device.type != "cpu" or bool(grad_loss != 1):
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         predict: torch.Tensor | None = None, chunk: int = 128,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, and the argmax per position.

    Args:
        hidden: (N, d) hidden states, one per position that predicts a target.
        weight: (V, d) output layer weight (no bias).
        targets: (N,) token ids, ``-100`` where a position is not supervised.
        predict: (N,) bools, the positions whose argmax is wanted (None: all). Over a 50,257-wide
            vocabulary an argmax costs about a tenth of the step, so ask only for what is read.
        chunk: positions whose logits are made at a time. Measured on a 2-core AVX-512 CPU at
            width 160 (508 positions), whole loss: 144 ms at 128, 175 ms at 64, 192 ms at 32 (before
            the in-place softmax, which took a whole training step from 180 to 145 ms at 128).

    Returns:
        The loss (a float32 scalar that backpropagates into ``hidden`` and ``weight``; under
        ``torch.no_grad()`` no gradient is computed at all) and the (N,) argmax of the logits at
        every position asked for (-1 elsewhere).
    """
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)  # forward runs without
    loss, predicted = _LinearCrossEntropy.apply(hidden, weight, targets, predict, chunk, grads)
    return loss, predicted
