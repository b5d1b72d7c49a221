"""The gradient family of the setup checks, judged at the user's recorded optimizer steps:
``gradient_flow`` (every trainable parameter reached), ``params_update`` (every one changed,
no frozen one) and ``accumulation`` (the update equals the gradient of the mean loss over every
supervised token of the step's micro-batches)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmcheck._finite import locate, non_finite_result
from lmcheck._model import (
    kind,
    model_device,
    model_forward,
    no_dropout,
    parameter_dtype,
    token_loss_sum,
)
from lmcheck._ranks import gathered, world_size
from lmcheck._recording import OptimizerStep, Snapshot
from lmcheck.results import Result, headroom_below
from lmcheck.training import Later, gradient_flow_result, params_update_result, zero_weights

# Relative L2 error allowed between the user's gradient and the reference one, by parameter
# dtype. Both sides are computed by the same model on the same tokens; in float32 on a 2-core
# x86 CPU they differed by below 1e-6 (summation order). A normalisation bug moves the gradient
# by 10% or more (a factor of k, or micro-batches weighted 2:1).
GRADIENT_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def gradient_flow(model: torch.nn.Module, steps: Sequence[OptimizerStep], snapshot: Snapshot) -> Result:
    """The probe's judgement (:func:`lmcheck.training.gradient_flow`) of the user's recorded steps:
    every trainable parameter has a finite gradient at the first step, and a non-zero one at the
    first step or soon after: a factor whose partner starts at zero (LoRA's ``lora_A``, PEFT starts
    ``lora_B`` at zero) or a branch behind a zero-initialised gate gets an exactly zero gradient at
    step 1 by design, and trains from step 2."""
    grads = steps[0].grads or {}
    flagged = [s for s in steps if s.nonzero is not None]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    later = Later(gates=zero_weights(snapshot.parameters(), set(trainable)))
    for name in trainable:
        grad = grads.get(name)
        if grad is None or not bool(grad.any()):
            at = next((s.index for s in flagged[1:] if name in (s.nonzero or ())), None)
            if at is not None:
                later.found[name] = f"step {at}"
    within = (f"within the first {len(flagged)} optimizer steps" if len(flagged) > 1
              else "at the first optimizer step")
    return gradient_flow_result(model, {n: grads.get(n) for n in trainable}, later, within=within,
                                steps_seen=len(flagged) or 1)


def params_update(model: torch.nn.Module, snapshot: Snapshot, after: Mapping[str, torch.Tensor],
                  steps: int) -> Result:
    """The probe's judgement (:func:`lmcheck.training.params_update`) of the parameters as the
    user's ``steps`` optimizer steps left them (``after``) against the saved ones."""
    before = snapshot.parameters()
    non_finite = [f"{name} holds a non-finite value after the steps: {found}" for name, value in after.items()
                  if (found := locate(value, ("index",) * value.dim())) is not None]
    changed = {name: not torch.equal(before[name], after[name]) for name, _ in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return params_update_result(changed, trainable, Later(), after_text=f"in {steps} optimizer steps of the user's "
                                "loop", non_finite=non_finite)


@dataclass
class _Reference:
    """The reference side of ``accumulation``: flat gradients of the micro-batches' summed losses."""

    summed: torch.Tensor  # the sum of the micro-batches' gradients of their summed losses
    per_micro: torch.Tensor  # the sum of their gradients of their mean losses
    counts: list[int]  # supervised tokens per micro-batch, after the shift
    unshifted: list[int]  # the same counted before the shift (transformers #46204)
    loss: float  # the mean loss over every supervised token


def _reference(model: torch.nn.Module, parameters: Sequence[torch.Tensor],
               micro_batches: Sequence[Mapping[str, torch.Tensor]]) -> _Reference | Result:
    """Each micro-batch's summed loss backpropagated into ``.grad`` with dropout off (as the user's
    step computes its own: torch.autograd.grad returns None for the parameters inside reentrant
    checkpointed blocks); a non-finite result where a loss is NaN or Inf."""
    device = model_device(model)
    counts, unshifted, losses = [], [], []
    summed: torch.Tensor | None = None
    per_micro: torch.Tensor | None = None
    with no_dropout(model):
        model.train()
        for batch in micro_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits, _ = model_forward(model, batch["input_ids"], batch.get("attention_mask"), None,
                                      use_cache=False, what="the logits of a micro-batch")
            total, count, before_shift = token_loss_sum(logits, batch)
            if not bool(torch.isfinite(total)):
                return non_finite_result("accumulation", f"the reference loss of a micro-batch of the first step "
                                                         f"is {float(total)}")
            for parameter in parameters:
                parameter.grad = None
            total.backward()
            flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad.detach()).float().reshape(-1)
                              for p in parameters])
            losses.append(float(total.detach()))
            summed = flat if summed is None else summed + flat
            per_micro = flat / max(count, 1) if per_micro is None else per_micro + flat / max(count, 1)
            counts.append(count)
            unshifted.append(before_shift)
    if summed is None or per_micro is None:
        return Result.not_applicable("accumulation", "no micro-batch of the first step was seen")
    if sum(counts) == 0:
        return Result.not_applicable("accumulation", "the first step's micro-batches supervise no token")
    return _Reference(summed, per_micro, counts, unshifted, sum(losses) / sum(counts))


def _flat(grad: torch.Tensor | None, parameter: torch.Tensor) -> torch.Tensor:
    """A gradient flattened in float32; zeros for a parameter that got none."""
    return (grad if grad is not None else torch.zeros_like(parameter)).float().reshape(-1)


def _fit(user: torch.Tensor, direction: torch.Tensor) -> tuple[float, float]:
    """(scale c, residual) of the user's gradient as c * direction."""
    norm = float(direction.norm())
    if norm == 0:
        return 0.0, float("inf")
    scale = float(user @ direction) / norm**2
    return scale, float((user - scale * direction).norm()) / max(float(user.norm()), 1e-30)


def accumulation(model: torch.nn.Module, snapshot: Snapshot, micro_batches: Sequence[Mapping[str, torch.Tensor]],
                 step: OptimizerStep, max_grad_norm: float | None, rtol: float | None = None) -> Result:
    """The user's gradient at the first optimizer step against the gradient of the mean loss
    over every supervised token of its micro-batches."""
    name = "accumulation"
    if not micro_batches:
        return Result.not_applicable(name, "no micro-batch of the first step was seen")
    world = world_size()
    if world > 1:  # DDP averages the ranks' gradients: the reference covers every rank's tokens
        local = [{k: v.detach().cpu() for k, v in b.items()} for b in micro_batches]
        micro_batches = [b for rank_batches in gathered(local) for b in rank_batches]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    parameters = [p for n, p in model.named_parameters() if p.requires_grad]
    snapshot.restore()
    reference = _reference(model, parameters, micro_batches)
    snapshot.restore()
    if isinstance(reference, Result):
        return reference
    k, counts = len(micro_batches), reference.counts
    correct = reference.summed / sum(counts)
    if not bool(correct.any()):
        return Result.not_applicable(name, f"the gradient of the mean loss over the first step's {k} micro-batches "
                                     f"is exactly zero, so there is no update to compare the user's with")
    user_grads = step.grads or {}
    user = torch.cat([_flat(user_grads.get(n), p) for n, p in zip(names, parameters, strict=True)])
    tol = rtol if rtol is not None else GRADIENT_RTOL.get(parameter_dtype(model), GRADIENT_RTOL[torch.float32])
    if (found := locate(user, ("index",))) is not None:
        return non_finite_result(name, f"the gradient at the user's first optimizer step is not finite: {found}")
    metrics: dict[str, Any] = {"micro_batches": k, "supervised_tokens": counts,
                               "reference_norm": float(correct.norm()), "user_norm": float(user.norm()),
                               "reference_loss": reference.loss}
    clipped_by = _clipped_by(step.clip, float(user.norm()), tol)
    if clipped_by is not None:  # seen through the clipping: the update before it is compared
        user = user / clipped_by
        metrics.update(clip_coefficient=clipped_by, user_norm_before_clipping=float(user.norm()))
        max_grad_norm = 0.0
    scale, residual = _fit(user, correct)
    error = float((user - correct).norm() / max(float(correct.norm()), 1e-30))
    metrics.update(scale=scale, residual=residual, relative_error=error)
    counted = (f"{k} micro-batch{'es' if k > 1 else ''}" + (f" of {world} ranks" if world > 1 else "")
               + f" supervising {', '.join(map(str, counts))} tokens")
    passed, explanation = _judged(model, user, correct, reference, names, parameters, step, counted,
                                  scale, residual, error, tol, max_grad_norm, clipped_by)
    return Result(name=name, passed=passed, metrics=metrics, threshold=tol,
                  headroom=headroom_below(residual if passed and abs(scale - 1) > tol else error, tol),
                  explanation=explanation)


def _judged(model: torch.nn.Module, user: torch.Tensor, correct: torch.Tensor, reference: _Reference,
            names: Sequence[str], parameters: Sequence[torch.Tensor], step: OptimizerStep, counted: str,
            scale: float, residual: float, error: float, tol: float, max_grad_norm: float | None,
            clipped_by: float | None) -> tuple[bool, str]:
    """(passed, explanation) of the user's update against the mean-loss gradient ``correct``."""
    k, counts = len(reference.counts), reference.counts
    unequal = len(set(counts)) > 1
    # max_grad_norm: None = not said (the step may clip), 0 = the step does not clip
    clipping = max_grad_norm is None or max_grad_norm > 0
    clip = min(1.0, max_grad_norm / max(float(correct.norm()), 1e-30)) if max_grad_norm else None
    if residual <= tol and abs(scale - 1) <= tol:
        return True, (f"the user's update over {counted} equals the gradient of the mean loss over "
                      f"all their tokens (relative error {error:.1e}, allowed {tol:g})"
                      + ("" if unequal or k == 1 else "; the counts are equal, so a per-micro-batch "
                         "mean could not be told apart: give batches of unequal length")
                      + (f"; compared before clip_grad_norm_, which clipped it by {clipped_by:.3g} to "
                         f"norm {step.clip[1]:g}" if clipped_by is not None and step.clip else ""))
    if residual <= tol:
        causes = []
        if k > 1 and abs(scale - k) <= 10 * tol * k:
            causes.append(f"the loss is not divided by the {k} accumulation steps")
        ratio = sum(counts) / max(1, sum(reference.unshifted))
        if abs(scale - ratio) <= tol and ratio != 1:
            causes.append(f"the loss is divided by the labels counted before the shift ({sum(reference.unshifted)}), "
                          f"not after it ({sum(counts)}) (transformers #46204)" + _loss_type_fix(model))
        if clip is not None and scale < clip * (1 - tol):
            causes.append(f"it is smaller than clipping to max_grad_norm={max_grad_norm} makes it: the "
                          f"gradients were clipped while still scaled by the AMP loss scaler, before "
                          f"unscale_ (Lightning #9330)")
        if not causes and scale < 1 and clipping and (clip is None or abs(scale - clip) <= tol):
            return True, (f"the user's update over {counted} is the mean-loss gradient clipped by "
                          f"{scale:.3g} to norm {float(user.norm()):.3g}"
                          + ("" if clip is not None else " (pass max_grad_norm to check the norm)"))
        explanation = (f"the user's update over {counted} points the right way but is {scale:.4g} times the "
                       f"gradient of the mean loss" + (f": {'; '.join(causes)}" if causes else
                                                       " (and the step does not clip)" if not clipping else ""))
    else:
        explanation = _not_the_mean_loss(user, correct, reference, names, parameters, counted, error, tol, unequal)
    if clipped_by is not None and step.clip:
        explanation += (f" (seen through the clipping: the step's clip_grad_norm_ measured {step.clip[0]:.4g} and "
                        f"clipped to {step.clip[1]:g})")
    return False, explanation


def _not_the_mean_loss(user: torch.Tensor, correct: torch.Tensor, reference: _Reference, names: Sequence[str],
                       parameters: Sequence[torch.Tensor], counted: str, error: float, tol: float,
                       unequal: bool) -> str:
    """Why an update that points elsewhere than the mean-loss gradient does: a per-micro-batch
    mean where the counts differ, else the parameter where it differs most."""
    k = len(reference.counts)
    micro_scale, micro_residual = _fit(user, reference.per_micro)
    if micro_residual <= tol and unequal:
        # the sum of the means itself (scale 1, not 1/k): the k micro-batches' losses are not
        # divided by k either (clipping that shrinks the update by exactly 1/k is unlikely)
        undivided = k > 1 and abs(micro_scale - 1) <= 10 * tol
        return (f"the user's update over {counted} is "
                + ("the" if undivided else f"{micro_scale:.3g} times the")
                + " sum of the micro-batches' mean losses, not the mean over all their tokens: each micro-batch "
                "is normalised by its own token count, so short ones weigh as much as long ones "
                "(transformers #34191, torchtune #1875)"
                + (f", and the sum is not divided by the {k} accumulation steps either" if undivided else "")
                + "; divide the summed loss by the step's total token count")
    worst = _worst_parameter(user, correct, names, parameters)
    return (f"the user's update over {counted} differs from the gradient of the mean loss by "
            f"{error:.3g} (relative, allowed {tol:g}); it differs most at {worst}. The loss "
            f"the step minimises is not shifted cross-entropy over the supervised tokens")


def _clipped_by(clip: tuple[float, float] | None, user_norm: float, tol: float) -> float | None:
    """The factor clip_grad_norm_ scaled the update by, where it clipped and the clipped norm is
    the one that reached the step (clipping of still-scaled AMP gradients, Lightning #9330, is
    not: its norm was measured on other values); None otherwise."""
    if clip is None:
        return None
    total, max_norm = clip
    if not (math.isfinite(total) and total > max_norm > 0):
        return None
    coefficient = max_norm / (total + 1e-6)  # as torch.nn.utils.clip_grad_norm_ computes it
    if abs(user_norm - max_norm) > max(tol, 1e-4) * max_norm:
        return None
    return coefficient


def _loss_type_fix(model: torch.nn.Module) -> str:
    """The fix for a Hugging Face model whose Trainer loss counts the labels before the shift:
    transformers 5.24 picks the loss from the class name, and GPT2LMHeadModel's matches none."""
    if kind(model) != "transformers":
        return ""
    loss_type = getattr(model, "loss_type", None)
    return ("; the model's loss_type is " + repr(loss_type) + ", so transformers uses its default loss: set "
            "model.loss_type = \"ForCausalLM\" before building the Trainer" if loss_type != "ForCausalLM" else "")


def _worst_parameter(user: torch.Tensor, reference: torch.Tensor, names: Sequence[str],
                     parameters: Sequence[torch.Tensor]) -> str:
    offset, worst, where = 0, -1.0, ""
    for name, parameter in zip(names, parameters, strict=True):
        size = parameter.numel()
        a, b = user[offset: offset + size], reference[offset: offset + size]
        error = float((a - b).norm() / max(float(b.norm()), 1e-30))
        if error > worst:
            worst, where = error, f"{name} (relative error {error:.3g})"
        offset += size
    return where
