"""The gradient family of the setup checks, judged at the user's recorded optimizer steps:
``gradient_flow`` (every trainable parameter reached), ``params_update`` (every one changed,
no frozen one) and ``accumulation`` (the update equals the gradient of the mean loss over every
supervised token of the step's micro-batches)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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

# Relative L2 error allowed between the user's gradient and the reference one, by parameter
# dtype. Both sides are computed by the same model on the same tokens; in float32 on a 2-core
# x86 CPU they differed by below 1e-6 (summation order). A normalisation bug moves the gradient
# by 10% or more (a factor of k, or micro-batches weighted 2:1).
GRADIENT_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def gradient_flow(model: torch.nn.Module, steps: Sequence[OptimizerStep],
                   snapshot: Snapshot | None = None) -> Result:
    """Every trainable parameter gets a finite gradient at the first step, and a non-zero one at
    the first step or soon after: a factor whose partner starts at zero (LoRA's ``lora_A``, PEFT
    starts ``lora_B`` at zero) or a branch behind a zero-initialised gate gets an exactly zero
    gradient at step 1 by design, and trains from step 2."""
    first = steps[0]
    missing: list[str] = []  # no gradient or an all-zero one at every flagged step
    late: list[tuple[str, int]] = []  # zero at step 1, non-zero at a later step
    non_finite: list[str] = []
    grads = first.grads or {}
    flagged = [s for s in steps if s.nonzero is not None]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, _ in trainable:
        grad = grads.get(name)
        if grad is not None and (found := locate(grad, ("index",) * grad.dim())) is not None:
            non_finite.append(f"{name} has a non-finite gradient: {found}")
        elif grad is None or not bool(grad.any()):
            later = next((s.index for s in flagged[1:] if name in (s.nonzero or ())), None)
            if later is not None:
                late.append((name, later))
            else:
                missing.append(f"{name} {'gets no gradient' if grad is None else 'has an all-zero gradient'}")
    problems = non_finite + missing
    passed = not problems
    seen = f"the first {len(flagged)} optimizer steps" if len(flagged) > 1 else "the first optimizer step"
    zero_init = _zero_initialised(model, snapshot) if late else []
    by_design = ""
    if late:
        by_design = (f"; {len(late)} ({', '.join(n for n, _ in late[:2])}{' ...' if len(late) > 2 else ''}) have an "
                     f"exactly zero gradient at step 1 and a non-zero one from step {min(i for _, i in late)}, as a "
                     f"factor whose partner starts at zero does"
                     + (f" ({', '.join(zero_init[:2])}{' ...' if len(zero_init) > 2 else ''} start at zero: "
                        f"{'LoRA, whose lora_B PEFT initialises to zero' if any('lora_B' in z for z in zero_init) else 'a zero-initialised gate'})"
                        if zero_init else ""))
    if passed:
        explanation = (f"within {seen} all {len(trainable)} trainable parameters have finite, non-zero "
                       f"gradients{by_design}")
    else:
        explanation = (f"within {seen} {len(problems)} of {len(trainable)} trainable parameters are not "
                       f"trained: " + "; ".join(problems[:4])
                       + (f"; {len(problems) - 4} more" if len(problems) > 4 else ""))
        if non_finite:
            explanation += (". A NaN or Inf gradient comes from a non-finite loss or weight, or an overflow in "
                            "half precision")
        if missing:
            if _checkpointed(model):
                explanation += (". Reentrant gradient checkpointing with frozen embeddings leaves the checkpointed "
                                "blocks without gradients (transformers #21381): use use_reentrant=False or "
                                "model.enable_input_require_grads()")
            else:
                explanation += (". The parameter is not used by the forward, or its path to the loss is cut (a "
                                "detach(), a torch.no_grad() block, an output that is not used)")
    metrics: dict[str, Any] = {"trainable": len(trainable), "problems": len(problems), "zero_at_first_step": len(late),
                               "steps_seen": len(flagged) or 1}
    if non_finite:
        return non_finite_result("gradient_flow", explanation, **metrics)
    return Result(name="gradient_flow", passed=passed, metrics=metrics, explanation=explanation)


def _zero_initialised(model: torch.nn.Module, snapshot: Snapshot | None) -> list[str]:
    """Trainable parameters that were all zero before the first step."""
    if snapshot is None:
        return []
    saved = snapshot.parameters()
    return [n for n, p in model.named_parameters() if p.requires_grad and n in saved
            and saved[n].numel() and not bool(saved[n].any())]


def _checkpointed(model: torch.nn.Module) -> bool:
    """Whether gradient checkpointing is on anywhere in the model (transformers' flag)."""
    if bool(getattr(model, "is_gradient_checkpointing", False)):
        return True
    return any(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules())


def params_update(model: torch.nn.Module, snapshot: Snapshot, after: Mapping[str, torch.Tensor],
                   steps: int) -> Result:
    before = snapshot.parameters()
    problems: list[str] = []
    unchanged = []
    trainable = 0
    for name, parameter in model.named_parameters():
        if (found := locate(after[name], ("index",) * after[name].dim())) is not None:
            problems.append(f"{name} holds a non-finite value after the steps: {found}")
            continue
        changed = not torch.equal(before[name], after[name])
        trainable += parameter.requires_grad
        if parameter.requires_grad and not changed:
            unchanged.append(name)
        elif not parameter.requires_grad and changed:
            problems.append(f"{name} is frozen (requires_grad=False) but changed: weight decay or an "
                            f"optimizer step reaches it")
    if unchanged:
        problems.insert(0, f"{len(unchanged)} of {trainable} trainable parameters did not change in {steps} "
                        f"optimizer steps: " + ", ".join(unchanged[:4]) + (" ..." if len(unchanged) > 4 else "")
                        + " (missing from the optimizer, no gradient, or a learning rate of 0)")
    passed = not problems
    return Result(name="params_update", passed=passed, metrics={"trainable": trainable, "unchanged": len(unchanged)},
                  explanation=(f"all {trainable} trainable parameters changed in {steps} optimizer steps of the "
                               f"user's loop, and no frozen one" if passed else "; ".join(problems[:4])))


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
    device = model_device(model)
    counts, unshifted = [], []
    losses: list[float] = []
    with no_dropout(model):
        model.train()
        summed: torch.Tensor | None = None  # the sum of the micro-batches' gradients of summed losses
        per_micro: torch.Tensor | None = None  # the sum of their gradients of mean losses
        for batch in micro_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits, _ = model_forward(model, batch["input_ids"], batch.get("attention_mask"), None,
                                      use_cache=False, what="the logits of a micro-batch")
            total, count, before_shift = token_loss_sum(logits, batch)
            if not bool(torch.isfinite(total)):
                return non_finite_result(name, f"the reference loss of a micro-batch of the first step is {float(total)}")
            # .backward() into .grad, as the user's step computes its own: torch.autograd.grad
            # returns None for the parameters inside reentrant checkpointed blocks
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
    snapshot.restore()
    k = len(micro_batches)
    if sum(counts) == 0:
        return Result.not_applicable(name, "the first step's micro-batches supervise no token")
    if summed is None or per_micro is None:
        return Result.not_applicable(name, "no micro-batch of the first step was seen")
    correct = summed / sum(counts)
    if not bool(correct.any()):
        return Result.not_applicable(name, f"the gradient of the mean loss over the first step's {k} micro-batches "
                                     f"is exactly zero, so there is no update to compare the user's with")
    user_grads = step.grads or {}

    def user_grad(name: str, parameter: torch.Tensor) -> torch.Tensor:
        grad = user_grads.get(name)
        return (grad if grad is not None else torch.zeros_like(parameter)).float().reshape(-1)

    user = torch.cat([user_grad(n, p) for n, p in zip(names, parameters, strict=True)])
    tol = rtol if rtol is not None else GRADIENT_RTOL.get(parameter_dtype(model), GRADIENT_RTOL[torch.float32])
    if (found := locate(user, ("index",))) is not None:
        return non_finite_result(name, f"the gradient at the user's first optimizer step is not finite: {found}")
    metrics: dict[str, Any] = {"micro_batches": k, "supervised_tokens": counts,
                               "reference_norm": float(correct.norm()), "user_norm": float(user.norm()),
                               "reference_loss": sum(losses) / sum(counts)}
    clipped_by = _clipped_by(step.clip, float(user.norm()), tol)
    if clipped_by is not None:  # seen through the clipping: the update before it is compared
        user = user / clipped_by
        metrics.update(clip_coefficient=clipped_by, user_norm_before_clipping=float(user.norm()))
        max_grad_norm = 0.0
    unequal = len(set(counts)) > 1
    counted = (f"{k} micro-batch{'es' if k > 1 else ''}" + (f" of {world} ranks" if world > 1 else "")
               + f" supervising {', '.join(map(str, counts))} tokens")

    def fit(direction: torch.Tensor) -> tuple[float, float]:
        """(scale c, residual) of the user's gradient as c * direction."""
        norm = float(direction.norm())
        if norm == 0:
            return 0.0, float("inf")
        scale = float(user @ direction) / norm**2
        return scale, float((user - scale * direction).norm()) / max(float(user.norm()), 1e-30)

    scale, residual = fit(correct)
    metrics.update(scale=scale, residual=residual)
    error = float((user - correct).norm() / max(float(correct.norm()), 1e-30))
    metrics["relative_error"] = error
    # max_grad_norm: None = not said (the step may clip), 0 = the step does not clip
    clipping = max_grad_norm is None or max_grad_norm > 0
    clip = min(1.0, max_grad_norm / max(float(correct.norm()), 1e-30)) if max_grad_norm else None
    if residual <= tol and abs(scale - 1) <= tol:
        return Result(name=name, passed=True, metrics=metrics, threshold=tol, headroom=headroom_below(error, tol),
                      explanation=f"the user's update over {counted} equals the gradient of the mean loss over "
                                  f"all their tokens (relative error {error:.1e}, allowed {tol:g})"
                                  + ("" if unequal or k == 1 else "; the counts are equal, so a per-micro-batch "
                                     "mean could not be told apart: give batches of unequal length")
                                  + (f"; compared before clip_grad_norm_, which clipped it by {clipped_by:.3g} to "
                                     f"norm {step.clip[1]:g}" if clipped_by is not None and step.clip else ""))
    if residual <= tol:
        causes = []
        if k > 1 and abs(scale - k) <= 10 * tol * k:
            causes.append(f"the loss is not divided by the {k} accumulation steps")
        ratio = sum(counts) / max(1, sum(unshifted))
        if abs(scale - ratio) <= tol and ratio != 1:
            causes.append(f"the loss is divided by the labels counted before the shift ({sum(unshifted)}), not "
                          f"after it ({sum(counts)}) (transformers #46204)" + _loss_type_fix(model))
        if clip is not None and scale < clip * (1 - tol):
            causes.append(f"it is smaller than clipping to max_grad_norm={max_grad_norm} makes it: the "
                          f"gradients were clipped while still scaled by the AMP loss scaler, before "
                          f"unscale_ (Lightning #9330)")
        if not causes and scale < 1 and clipping and (clip is None or abs(scale - clip) <= tol):
            return Result(name=name, passed=True, metrics=metrics, threshold=tol,
                          headroom=headroom_below(residual, tol),
                          explanation=f"the user's update over {counted} is the mean-loss gradient clipped by "
                                      f"{scale:.3g} to norm {float(user.norm()):.3g}"
                                      + ("" if clip is not None else " (pass max_grad_norm to check the norm)"))
        explanation = (f"the user's update over {counted} points the right way but is {scale:.4g} times the "
                       f"gradient of the mean loss" + (f": {'; '.join(causes)}" if causes else
                                                       " (and the step does not clip)" if not clipping else ""))
    else:
        micro_scale, micro_residual = fit(per_micro)
        if micro_residual <= tol and unequal:
            # the sum of the means itself (scale 1, not 1/k): the k micro-batches' losses are not
            # divided by k either (clipping that shrinks the update by exactly 1/k is unlikely)
            undivided = k > 1 and abs(micro_scale - 1) <= 10 * tol
            explanation = (f"the user's update over {counted} is "
                           + ("the" if undivided else f"{micro_scale:.3g} times the")
                           + " sum of the micro-batches' mean losses, not the mean over all their tokens: each micro-batch "
                           "is normalised by its own token count, so short ones weigh as much as long ones "
                           "(transformers #34191, torchtune #1875)"
                           + (f", and the sum is not divided by the {k} accumulation steps either" if undivided else "")
                           + "; divide the summed loss by the step's total token count")
        else:
            worst = _worst_parameter(user, correct, names, parameters)
            explanation = (f"the user's update over {counted} differs from the gradient of the mean loss by "
                           f"{error:.3g} (relative, allowed {tol:g}); it differs most at {worst}. The loss "
                           f"the step minimises is not shifted cross-entropy over the supervised tokens")
    if clipped_by is not None:
        explanation += (f" (seen through the clipping: the step's clip_grad_norm_ measured {step.clip[0]:.4g} and "
                        f"clipped to {step.clip[1]:g})" if step.clip else "")
    return Result(name=name, passed=False, metrics=metrics, threshold=tol, headroom=headroom_below(error, tol),
                  explanation=explanation)


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
