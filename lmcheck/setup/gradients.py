"""The gradient family of the setup checks, judged at the user's recorded optimizer steps:
``gradient_flow`` (every trainable parameter reached), ``params_update`` (every one changed,
no frozen one) and ``accumulation`` (the update equals the gradient of the mean loss over every
supervised token of the step's micro-batches)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
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
from lmcheck._recording import GradientSeen, OptimizerStep, Snapshot, rng_state, set_rng_state
from lmcheck.results import Result, headroom_below
from lmcheck.setup.batches import supervised_count
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
    seen = steps[0].seen or {}
    flagged = [s for s in steps if s.nonzero is not None]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    later = Later(gates=zero_weights(snapshot.parameters(), set(trainable)))
    nothing = GradientSeen.of(None)
    for name in trainable:
        if not seen.get(name, nothing).nonzero:
            at = next((s.index for s in flagged[1:] if name in (s.nonzero or ())), None)
            if at is not None:
                later.found[name] = f"step {at}"
    within = (f"within the first {len(flagged)} optimizer steps" if len(flagged) > 1
              else "at the first optimizer step")
    return gradient_flow_result(model, {n: seen.get(n, nothing) for n in trainable}, later, within=within,
                                steps_seen=len(flagged) or 1)


def params_update(model: torch.nn.Module, snapshot: Snapshot, after: Mapping[str, torch.Tensor],
                  steps: int) -> Result:
    """The probe's judgement (:func:`lmcheck.training.params_update`) of the parameters as the
    user's ``steps`` optimizer steps left them (``after``) against the saved ones."""
    before = snapshot.parameters()
    non_finite = [f"{name} holds a non-finite value after the steps: {found}" for name, value in after.items()
                  if (found := locate(value, ("index",) * value.dim())) is not None]
    changed = {name: not torch.equal(before[name].to(after[name].device), after[name])
               for name, _ in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return params_update_result(changed, trainable, Later(), after_text=f"in {steps} optimizer steps of the user's "
                                "loop", non_finite=non_finite)


_CHUNK = 1 << 22  # elements compared at a time: a few MB of temporaries, however large a parameter


@dataclass
class _Reference:
    """The reference side of ``accumulation``: the summed gradient of every micro-batch's summed
    loss, left in each parameter's ``.grad``, and where asked the sum of their mean-loss
    gradients (one float32 tensor per parameter)."""

    counts: list[int]  # supervised tokens per micro-batch, after the shift
    unshifted: list[int]  # the same counted before the shift (transformers #46204)
    loss: float  # the mean loss over every supervised token
    per_micro: list[torch.Tensor] | None = None


def _reference(model: torch.nn.Module, parameters: Sequence[torch.Tensor],
               micro_batches: Sequence[Mapping[str, torch.Tensor]], *, per_micro: bool = False) -> _Reference | Result:
    """Each micro-batch's summed loss backpropagated into ``.grad`` with dropout off, as the user's
    step computes its own (torch.autograd.grad returns None for the parameters inside reentrant
    checkpointed blocks); a non-finite result where a loss is NaN or Inf.

    The sum of the mean-loss gradients, sum_i g_i / n_i, is accumulated from the running sums
    S_i = g_1 + ... + g_i that ``.grad`` holds: sum_i S_i (1/n_i - 1/n_(i+1)), so that no gradient
    of a single micro-batch is ever copied."""
    device = model_device(model)
    counts = [max(supervised_count(b), 0) for b in micro_batches]
    unshifted, losses = [], []
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in parameters] if per_micro else None
    for parameter in parameters:
        parameter.grad = None
    with no_dropout(model):  # the modules in the modes the user's step left them
        for index, batch in enumerate(micro_batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits, _ = model_forward(model, batch["input_ids"], batch.get("attention_mask"), None,
                                      use_cache=False, what="the logits of a micro-batch",
                                      positions=batch.get("position_ids"))
            total, count, before_shift = token_loss_sum(logits, batch)
            del logits
            if not bool(torch.isfinite(total)):
                return non_finite_result("accumulation", f"the reference loss of a micro-batch of the first step "
                                                         f"is {float(total)}")
            total.backward()
            losses.append(float(total.detach()))
            unshifted.append(before_shift)
            if sums is not None:
                following = 1 / max(counts[index + 1], 1) if index + 1 < len(counts) else 0.0
                weight = 1 / max(count, 1) - following
                for buffer, parameter in zip(sums, parameters, strict=True):
                    if parameter.grad is not None:
                        buffer.add_(parameter.grad.detach().float(), alpha=weight)
    if sum(counts) == 0:
        return Result.not_applicable("accumulation", "the first step's micro-batches supervise no token")
    return _Reference(counts, unshifted, sum(losses) / sum(counts), sums)


@dataclass
class _Compared:
    """The user's update u against the mean-loss gradient c, summed over every trainable
    parameter in float64 (float32 chunks, never a flat copy of either side)."""

    uu: float = 0.0  # |u|^2
    uc: float = 0.0  # u . c
    cc: float = 0.0  # |c|^2
    ee: float = 0.0  # |u - c|^2
    worst: tuple[float, str] = (-1.0, "")  # (relative error, parameter) where they differ most

    @property
    def scale(self) -> float:
        return self.uc / self.cc if self.cc else 0.0

    @property
    def error(self) -> float:
        return math.sqrt(self.ee) / max(math.sqrt(self.cc), 1e-30)


class _Sides:
    """The three gradients of each trainable parameter, in float32 chunks on its device: the
    user's (recorded on the CPU; divided by what clipping scaled it by), the mean-loss gradient
    (``.grad`` divided by the step's token count) and, where computed, the per-micro-batch sum."""

    def __init__(self, names: Sequence[str], parameters: Sequence[torch.Tensor],
                 user: Mapping[str, torch.Tensor | None], tokens: int, divisor: float = 1.0) -> None:
        self.names, self.parameters, self.user = names, parameters, user
        self.tokens, self.divisor = tokens, divisor
        self.per_micro: list[torch.Tensor] | None = None

    def chunks(self, index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        parameter, user = self.parameters[index], self.user.get(self.names[index])
        size = parameter.numel()
        for start in range(0, size, _CHUNK):
            end = min(size, start + _CHUNK)
            u = (torch.zeros(end - start, device=parameter.device) if user is None
                 else user.reshape(-1)[start:end].to(parameter.device).float() / self.divisor)
            c = (torch.zeros(end - start, device=parameter.device) if parameter.grad is None
                 else parameter.grad.detach().reshape(-1)[start:end].float() / self.tokens)
            m = self.per_micro[index].reshape(-1)[start:end] if self.per_micro is not None else None
            yield u, c, m

    def compared(self) -> _Compared:
        out = _Compared()
        for index, name in enumerate(self.names):
            ee = cc = 0.0
            for u, c, _ in self.chunks(index):
                out.uu += float(torch.dot(u, u))
                out.uc += float(torch.dot(u, c))
                cc += float(torch.dot(c, c))
                ee += float((u - c).square().sum())
            out.cc, out.ee = out.cc + cc, out.ee + ee
            error = math.sqrt(ee) / max(math.sqrt(cc), 1e-30)
            if error > out.worst[0]:
                out.worst = (error, f"{name} (relative error {error:.3g})")
        return out

    def fit(self, *, micro: bool = False, known: _Compared | None = None) -> tuple[float, float]:
        """(scale s, residual) of the user's update as s times the mean-loss gradient (or, with
        ``micro``, the per-micro-batch sum): |u - s d| / |u|, computed directly, not from the
        dot products, so that a small residual is not lost to cancellation. ``known``: the
        mean-loss gradient's dot products, already summed by :meth:`compared`."""
        if known is not None and not micro:
            uu, ud, dd = known.uu, known.uc, known.cc
        else:
            uu = ud = dd = 0.0
            for index in range(len(self.names)):
                for u, c, m in self.chunks(index):
                    d = m if micro and m is not None else c
                    uu, ud, dd = uu + float(torch.dot(u, u)), ud + float(torch.dot(u, d)), dd + float(torch.dot(d, d))
        if dd == 0:
            return 0.0, float("inf")
        scale = ud / dd
        left = 0.0
        for index in range(len(self.names)):
            for u, c, m in self.chunks(index):
                d = m if micro and m is not None else c
                left += float((u - scale * d).square().sum())
        return scale, math.sqrt(left) / max(math.sqrt(uu), 1e-30)


def _user_norm(names: Sequence[str], user: Mapping[str, torch.Tensor | None]) -> float:
    total = 0.0
    for name in names:
        grad = user.get(name)
        if grad is not None:
            flat = grad.reshape(-1).float()
            total += float(torch.dot(flat, flat))
    return math.sqrt(total)


def accumulation(model: torch.nn.Module, micro_batches: Sequence[Mapping[str, torch.Tensor]],
                 clip: tuple[float, float] | None, max_grad_norm: float | None, rtol: float | None = None) -> Result:
    """At the user's first optimizer step, before it is taken: their update (each parameter's
    ``.grad`` as the step is about to apply it) against the gradient of the mean loss over every
    supervised token of the step's micro-batches, computed then, from the same weights, parameter
    by parameter. The user's gradients are set aside meanwhile (no copy) and put back unchanged,
    with the random generators. ``clip`` is the step's last ``clip_grad_norm_`` (total, max_norm)."""
    if not micro_batches:
        return Result.not_applicable("accumulation", "no micro-batch of the first step was seen")
    world = world_size()
    if world > 1:  # DDP averages the ranks' gradients: the reference covers every rank's tokens
        local = [{k: v.detach().cpu() for k, v in b.items()} for b in micro_batches]
        micro_batches = [b for rank_batches in gathered(local) for b in rank_batches]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    parameters = [p for n, p in model.named_parameters() if p.requires_grad]
    user = {n: p.grad for n, p in zip(names, parameters, strict=True)}
    state = rng_state()
    try:
        return _accumulation(model, names, parameters, micro_batches, user, clip, max_grad_norm, rtol, world)
    finally:
        for name, parameter in zip(names, parameters, strict=True):
            parameter.grad = user[name]  # the user's own tensors: the step applies what it was to apply
        set_rng_state(state)


def _accumulation(model: torch.nn.Module, names: Sequence[str], parameters: Sequence[torch.Tensor],
                  micro_batches: Sequence[Mapping[str, torch.Tensor]], user_grads: Mapping[str, torch.Tensor | None],
                  clip: tuple[float, float] | None, max_grad_norm: float | None, rtol: float | None,
                  world: int) -> Result:
    name = "accumulation"
    reference = _reference(model, parameters, micro_batches)
    if isinstance(reference, Result):
        return reference
    k, counts = len(micro_batches), reference.counts
    sides = _Sides(names, parameters, user_grads, sum(counts))
    if not any(p.grad is not None and bool(p.grad.any()) for p in parameters):
        return Result.not_applicable(name, f"the gradient of the mean loss over the first step's {k} micro-batches "
                                     f"is exactly zero, so there is no update to compare the user's with")
    tol = rtol if rtol is not None else GRADIENT_RTOL.get(parameter_dtype(model), GRADIENT_RTOL[torch.float32])
    for parameter_name in names:
        grad = user_grads.get(parameter_name)
        if grad is not None and (found := locate(grad, ("index",) * grad.dim())) is not None:
            return non_finite_result(name, f"the gradient at the user's first optimizer step is not finite: "
                                           f"{parameter_name} {found}")
    user_norm = _user_norm(names, user_grads)
    clipped_by = _clipped_by(clip, user_norm, tol)
    if clipped_by is not None:  # seen through the clipping: the update before it is compared
        sides.divisor = clipped_by
    compared = sides.compared()
    metrics: dict[str, Any] = {"micro_batches": k, "supervised_tokens": counts,
                               "reference_norm": math.sqrt(compared.cc), "user_norm": user_norm,
                               "reference_loss": reference.loss}
    if clipped_by is not None:
        metrics.update(clip_coefficient=clipped_by, user_norm_before_clipping=math.sqrt(compared.uu))
        max_grad_norm = 0.0
    scale, residual = sides.fit(known=compared)
    metrics.update(scale=scale, residual=residual, relative_error=compared.error)
    counted = (f"{k} micro-batch{'es' if k > 1 else ''}" + (f" of {world} ranks" if world > 1 else "")
               + f" supervising {', '.join(map(str, counts))} tokens")
    passed, explanation = _judged(model, sides, compared, reference, micro_batches, clip, counted,
                                  scale, residual, tol, max_grad_norm, clipped_by)
    return Result(name=name, passed=passed, metrics=metrics, threshold=tol,
                  headroom=headroom_below(residual if passed and abs(scale - 1) > tol else compared.error, tol),
                  explanation=explanation)


def _judged(model: torch.nn.Module, sides: _Sides, compared: _Compared, reference: _Reference,
            micro_batches: Sequence[Mapping[str, torch.Tensor]], clip_seen: tuple[float, float] | None, counted: str,
            scale: float, residual: float, tol: float, max_grad_norm: float | None,
            clipped_by: float | None) -> tuple[bool, str]:
    """(passed, explanation) of the user's update against the mean-loss gradient."""
    k, counts, error = len(reference.counts), reference.counts, compared.error
    unequal = len(set(counts)) > 1
    # max_grad_norm: None = not said (the step may clip), 0 = the step does not clip
    clipping = max_grad_norm is None or max_grad_norm > 0
    clip = min(1.0, max_grad_norm / max(math.sqrt(compared.cc), 1e-30)) if max_grad_norm else None
    if residual <= tol and abs(scale - 1) <= tol:
        return True, (f"the user's update over {counted} equals the gradient of the mean loss over "
                      f"all their tokens (relative error {error:.1e}, allowed {tol:g})"
                      + ("" if unequal or k == 1 else "; the counts are equal, so a per-micro-batch "
                         "mean could not be told apart: give batches of unequal length")
                      + (f"; compared before clip_grad_norm_, which clipped it by {clipped_by:.3g} to "
                         f"norm {clip_seen[1]:g}" if clipped_by is not None and clip_seen else ""))
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
                          f"{scale:.3g} to norm {math.sqrt(compared.uu):.3g}"
                          + ("" if clip is not None else " (pass max_grad_norm to check the norm)"))
        explanation = (f"the user's update over {counted} points the right way but is {scale:.4g} times the "
                       f"gradient of the mean loss" + (f": {'; '.join(causes)}" if causes else
                                                       " (and the step does not clip)" if not clipping else ""))
    else:
        explanation = _not_the_mean_loss(model, sides, compared, micro_batches, counted, tol, unequal)
    if clipped_by is not None and clip_seen:
        explanation += (f" (seen through the clipping: the step's clip_grad_norm_ measured {clip_seen[0]:.4g} and "
                        f"clipped to {clip_seen[1]:g})")
    return False, explanation


def _not_the_mean_loss(model: torch.nn.Module, sides: _Sides, compared: _Compared,
                       micro_batches: Sequence[Mapping[str, torch.Tensor]], counted: str, tol: float,
                       unequal: bool) -> str:
    """Why an update that points elsewhere than the mean-loss gradient does: a per-micro-batch
    mean where the counts differ (the reference run again, with the sum of the micro-batches'
    mean-loss gradients), else the parameter where it differs most."""
    k = len(micro_batches)
    if unequal:
        again = _reference(model, sides.parameters, micro_batches, per_micro=True)
        if isinstance(again, _Reference):
            sides.per_micro = again.per_micro
            micro_scale, micro_residual = sides.fit(micro=True)
            sides.per_micro = None
            if micro_residual <= tol:
                # the sum of the means itself (scale 1, not 1/k): the k micro-batches' losses are not
                # divided by k either (clipping that shrinks the update by exactly 1/k is unlikely)
                undivided = k > 1 and abs(micro_scale - 1) <= 10 * tol
                return (f"the user's update over {counted} is "
                        + ("the" if undivided else f"{micro_scale:.3g} times the")
                        + " sum of the micro-batches' mean losses, not the mean over all their tokens: each "
                        "micro-batch is normalised by its own token count, so short ones weigh as much as long "
                        "ones (transformers #34191, torchtune #1875)"
                        + (f", and the sum is not divided by the {k} accumulation steps either" if undivided else "")
                        + "; divide the summed loss by the step's total token count")
    return (f"the user's update over {counted} differs from the gradient of the mean loss by "
            f"{compared.error:.3g} (relative, allowed {tol:g}); it differs most at {compared.worst[1]}. The loss "
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


