"""What low precision silently loses: the loss, the updates, the ops under autocast, fp16's
range and the RoPE tables.

bfloat16 keeps 8 significant bits (a step of 0.0078 at 1.0, of 0.25 at 36); float16 keeps 11
and tops out at 65504. Each probe finds one place where a training setup leaves a number in one
of them where it needs float32, and names the documented bug it causes:

- :func:`loss_precision`: the loss computed on bf16 logits is off by up to a bf16 grid step,
  0.25 at a loss near 36 (Modalities PR #464);
- :func:`lost_updates`: an update smaller than half a bf16 step rounds away, so weights stored
  in bf16 without fp32 master weights never move: norm weights stuck at exactly 1.0
  (vllm-project/speculators PR #765), 0 of 768 weights moved in 100 steps
  (workofart/ml-by-hand PR #85); bf16 Adam moments lose their own updates the same way;
- :func:`autocast_ops`: softmax, log-softmax, the norms or the loss computed in bf16 under
  autocast (a custom autocast region, or a cast before the op);
- :func:`fp16_headroom`: activations past 65504 become inf in fp16 (T5's FFN, transformers
  #5651), and ``finfo.min`` plus a negative score becomes -inf on a fully masked row, whose
  softmax is NaN (transformers PR #17306);
- :func:`rope_precision`: RoPE cos/sin computed in bf16 drift with the position (transformers
  PR #29285).

:class:`UpdateReplay` is :func:`lost_updates` on a run of the user's own, with memory of the size
of a sample: the setup checks wrap their first run in it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode

from lmcheck._finite import locate, non_finite_result, probe, require_finite, require_finite_number
from lmcheck._model import (
    IGNORE_INDEX,
    eval_mode,
    has_own_loss,
    hf_model,
    model_device,
    model_forward,
    own_loss,
    parameter_dtype,
    reference_loss,
)
from lmcheck._ranks import local
from lmcheck._recording import once_gradients_exist
from lmcheck._validate import (
    as_ids,
    as_mask,
    check_bool,
    check_callable,
    check_int,
    check_model,
    check_number,
    describe,
)
from lmcheck.errors import InputError, LmcheckError, ModelError, NonFiniteError, NotApplicableError
from lmcheck.results import Result, headroom_below

__all__ = ["UpdateReplay", "autocast_ops", "fp16_headroom", "loss_precision", "lost_updates", "rope_precision"]

HALF = (torch.bfloat16, torch.float16)
FP16_MAX = torch.finfo(torch.float16).max  # 65504
# The loss and the fp32 cross-entropy of its logits agree within this, relative to the loss (at
# least 1). Measured on random logits over vocabularies of 300 to 128k: an fp32 loss written
# another way (a sum over the tokens divided by their count, log_softmax and gather, logsumexp)
# differs by at most 6e-7 of the loss; the cross-entropy taken in bf16 by 5e-4 to 2e-2 of it (one
# bf16 step of a loss near 36 is 0.25, 7e-3 of it).
LOSS_RTOL = 1e-5
# RoPE tables: a correct fp32 table is off from the fp64 one by about position * 2**-26 (the angle
# position * inv_freq rounded to fp32), measured 1.4e-4 at 8,192 positions and 2.2e-3 at 131,072;
# the tolerance, the larger of 1e-3 and positions * fp32's eps (2**-23), leaves 7x room. bf16
# positions or frequencies are off by 2e-2 at 128 positions and by 1 or more at 8,192.
ROPE_ATOL = 1e-3
ROPE_CHUNK = 8192  # positions per call of the rotary module: bounds the fp64 reference's memory
# the optimizers whose step lost_updates replays: torch.optim's element-wise ones, whose update of
# each element reads that element's weight, gradient and state and per-parameter scalars only (the
# step count, NAdam's mu_product, ASGD's eta and mu: their single-tensor steps in torch 2.13; no
# norm over a tensor), so a sample of a weight's elements, stepped alone, moves as it does inside
# the whole weight. Not Adafactor (factored moments), Muon (an orthogonalized update), LBFGS (a line
# search) or SparseAdam. A subclass may change the step, so the class must match exactly.
REPLAYABLE: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
    torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.ASGD, torch.optim.Rprop)
# their per-parameter scalars: 0-dim tensors, as a 0-dim weight's moments are, told apart by name
SCALAR_STATE = frozenset({"step", "mu_product", "eta", "mu"})
SAMPLE = 4096  # the elements of each weight UpdateReplay follows
SAMPLE_SEED = 0  # of the generator that draws them: the same elements in every run
CALLS_PER_STEP = 16  # calls of the user's step allowed per optimizer step (gradient accumulation)
# ops that autocast keeps in float32 on CUDA, by the words in their aten names
FP32_OP_WORDS = ("softmax", "norm", "nll_loss", "cross_entropy", "logsumexp")
# a hand-written norm's statistics: checked inside a module whose class name says "norm"
NORM_STATISTICS = frozenset({"mean", "var", "var_mean", "std", "rsqrt", "sqrt", "pow", "sum"})
FUSED_ATTENTION_WORDS = ("scaled_dot_product", "flash_attention", "efficient_attention")
LOSS_OP_WORDS = ("softmax", "nll_loss", "cross_entropy", "logsumexp")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _half_ulp(value: float, dtype: torch.dtype) -> float:
    """Half the spacing of ``dtype``'s numbers at ``value``: a smaller change of a stored
    ``value`` rounds back to it (0.0039 at 1.0 in bfloat16)."""
    info = torch.finfo(dtype)
    return 0.5 * info.eps * 2.0 ** math.floor(math.log2(max(abs(value), info.tiny)))


def _batch(batch: object, argument: str, device: torch.device, *, labels: bool) -> dict[str, Any]:
    """``batch`` with its tensors on ``device``; InputError unless it holds ``input_ids`` (and
    ``labels`` of the same shape, where needed) and any ``attention_mask`` is a 0/1 mask."""
    needed = ("input_ids", "labels") if labels else ("input_ids",)
    if not isinstance(batch, Mapping) or any(key not in batch for key in needed):
        got = f"a mapping with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else describe(batch)
        what = "'input_ids' and 'labels' (unshifted, -100 ignored)" if labels else "'input_ids'"
        raise InputError(f"'{argument}' must be a mapping of tensors with {what}, as a collator returns (got {got})")
    ids = as_ids(batch["input_ids"], f"{argument}['input_ids']")
    if labels:
        targets = as_ids(batch["labels"], f"{argument}['labels']")
        if targets.shape != ids.shape:
            raise InputError(f"'{argument}['labels']' must have the shape of input_ids {tuple(ids.shape)} "
                             f"(got {tuple(targets.shape)})")
    if batch.get("attention_mask") is not None:
        as_mask(batch["attention_mask"], ids, f"{argument}['attention_mask']")
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _first_float(output: Any) -> torch.Tensor | None:
    """The first floating tensor in an op's or a module's output (a tensor, tuple, list or mapping)."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    items = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for item in items:
        found = _first_float(item)
        if found is not None:
            return found
    return None


def _floats(output: Any) -> Iterator[torch.Tensor]:
    """Every floating tensor in a module's output, nested tuples, lists and mappings included."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield output
    elif isinstance(output, Mapping):
        for item in output.values():
            yield from _floats(item)
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _floats(item)


# ---------------------------------------------------------------- recording ops and modules


class _ModuleStack:
    """The qualified name of the module running now, kept by forward hooks on every module."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.names: list[tuple[str, str]] = []  # (qualified name, class name), innermost last
        self.handles: list[Any] = []

    def __enter__(self) -> _ModuleStack:
        for name, module in self.model.named_modules():
            label = (name or type(module).__name__, type(module).__name__)
            self.handles.append(module.register_forward_pre_hook(lambda *_, label=label: self.names.append(label)))
            self.handles.append(module.register_forward_hook(lambda *_: self._leave(), always_call=True))
        return self

    def _leave(self) -> None:
        if self.names:
            self.names.pop()

    def __exit__(self, *_: object) -> None:
        for handle in self.handles:
            handle.remove()

    def current(self) -> tuple[str, str]:
        return self.names[-1] if self.names else ("(outside the model)", "")


@dataclass(frozen=True)
class _Op:
    name: str  # the aten op's name: "_softmax", "nll_loss_forward"
    dtype: torch.dtype  # of its first floating output
    module: str  # the qualified name of the module that ran it


class _OpRecorder(TorchDispatchMode):
    """Records each aten op that ``wanted(op name, module class)`` picks, with the dtype of its
    output and the module running it; only while ``armed``. It sees the ops as autocast has cast
    them (the Python dispatch mode sits below autocast)."""

    def __init__(self, wanted: Callable[[str, str], bool], modules: _ModuleStack | None = None) -> None:
        super().__init__()
        self.wanted = wanted
        self.modules = modules
        self.armed = True
        self.ops: list[_Op] = []
        self.fused_attention = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        output = func(*args, **(kwargs or {}))
        if self.armed:
            name = func.overloadpacket.__name__
            module, module_class = self.modules.current() if self.modules is not None else ("", "")
            if any(word in name for word in FUSED_ATTENTION_WORDS):
                self.fused_attention += 1
            elif self.wanted(name, module_class):
                tensor = _first_float(output)
                if tensor is not None:
                    self.ops.append(_Op(name, tensor.dtype, module))
        return output


# ---------------------------------------------------------------- loss_precision


def _output_head(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The module that computes the logits: ``get_output_embeddings()`` where the model has it,
    else its last ``nn.Linear``; NotApplicableError where it has neither."""
    names = {module: name for name, module in model.named_modules()}
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if isinstance(head, torch.nn.Module):
        return names.get(head, type(head).__name__), head
    linear = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if not linear:
        raise NotApplicableError(f"the {type(model).__name__} has no output head to read the logits from "
                                 f"(no get_output_embeddings() and no nn.Linear)")
    return linear[-1]


@probe("loss_precision")
def loss_precision(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], *,
                   loss: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
                   ) -> Result:
    """The loss the model trains on equals the fp32 cross-entropy of the same logits, within
    1e-5 of the loss: no bf16 logits or bf16 cross-entropy in between (Modalities PR #464: the
    loss computed on bf16 logits, off by a bf16 grid step, 0.25 at a loss near 36).

    The loss is computed once, with a forward hook on the output head (``get_output_embeddings()``,
    else the model's last ``nn.Linear``) that keeps the logits as the loss saw them, and a
    dispatch mode that records the dtype in which each log-softmax, softmax, logsumexp and NLL op
    after the head ran. The reference is the fp32 cross-entropy of those logits: shifted (position
    t predicts ``labels[t + 1]``), -100 ignored, the mean over the supervised tokens. The probe
    fails where the loss differs from it by more than the tolerance, or where one of those ops
    ran in bfloat16 or float16; the explanation names the op and its dtype, and the half-precision
    cross-entropy the loss equals.

    Args:
        model: the model; run once, without gradients, in its own mode.
        batch: ``input_ids``, ``labels`` (unshifted, -100 ignored), optional ``attention_mask``.
        loss: ``loss(model, batch) -> scalar tensor``, the loss the user trains on, given the batch
            on the model's device; by default the model's own (``model(**batch).loss`` for a
            Hugging Face model, or the one given to :func:`lmcheck.adapt`). It must be the mean
            token cross-entropy: a loss with more terms (a z-loss, label smoothing) differs from
            the reference by them.

    Not applicable where the output head is not called during the loss (a fused linear
    cross-entropy computes the loss without logits), or the model has no loss of its own and
    none is given.
    """
    check_model(model)
    data = _batch(batch, "batch", model_device(model), labels=True)
    if loss is not None:
        check_callable(loss, "loss", "a function loss(model, batch) -> the scalar loss tensor")
    head_name, head = _output_head(model)
    captured: list[torch.Tensor] = []
    recorder = _OpRecorder(lambda name, _: any(word in name for word in LOSS_OP_WORDS))
    recorder.armed = False  # the attention's softmax is not the loss's: record from the head on

    def keep_logits(module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            captured.append(output.detach())
            recorder.ops.clear()
            recorder.armed = True

    handle = head.register_forward_hook(keep_logits)
    try:
        with torch.no_grad(), recorder:
            value = loss(model, data) if loss is not None else own_loss(model, data)[0]
    finally:
        handle.remove()
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ModelError(f"the loss must be a scalar tensor (got {describe(value)})")
    if not captured:
        raise NotApplicableError(f"the output head ({head_name}) was not called during the loss, so its logits "
                                 f"cannot be compared (a fused linear cross-entropy computes the loss without them)")
    logits, ids = captured[-1], data["input_ids"]  # (B, T, V)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise NotApplicableError(f"the output head ({head_name}) gave {describe(logits)}, not one row of logits "
                                 f"per token of the {tuple(ids.shape)} batch")
    mask = data.get("attention_mask")
    require_finite(logits, "the logits the loss saw", ("row", "position", "token id"),
                   valid=None if mask is None else mask.bool())
    got = require_finite_number(float(value.detach().float()), "the loss")
    reference = float(reference_loss(logits, data["labels"]))
    difference = abs(got - reference)
    bound = LOSS_RTOL * max(1.0, abs(reference))
    half_ops = sorted({(op.name, _name(op.dtype)) for op in recorder.ops if op.dtype in HALF})
    ran = ", ".join(sorted({f"{op.name} in {_name(op.dtype)}" for op in recorder.ops})) or "none recorded"
    metrics = {"loss": got, "reference_loss": reference, "difference": difference, "tolerance": bound,
               "logits_dtype": _name(logits.dtype), "output_head": head_name,
               "loss_ops": sorted({(op.name, _name(op.dtype)) for op in recorder.ops})}
    passed = difference <= bound and not half_ops
    headroom = headroom_below(difference, bound)
    if passed:
        explanation = (f"the loss, {got:.6g}, equals the fp32 cross-entropy of the same {_name(logits.dtype)} "
                       f"logits (from {head_name}): difference {difference:.1g}, tolerance {bound:.1g}; the loss's "
                       f"ops ran in float32 ({ran})")
    else:
        explanation = _loss_problem(got, reference, difference, bound, logits, data["labels"], half_ops)
    return Result(name="loss_precision", passed=passed, metrics=metrics, threshold=bound,
                  headroom=min(headroom, 0.0) if half_ops else headroom, explanation=explanation)


def _loss_problem(got: float, reference: float, difference: float, bound: float, logits: torch.Tensor,
                  labels: torch.Tensor, half_ops: list[tuple[str, str]]) -> str:
    """Why the loss is not the fp32 cross-entropy of its logits: the half-precision cross-entropy
    it equals, and the ops that ran in half precision."""
    parts = []
    if difference > bound:
        shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
        targets = labels[:, 1:].reshape(-1).to(logits.device)
        same = [(dtype, abs(got - float(F.cross_entropy(shifted.to(dtype), targets, ignore_index=IGNORE_INDEX))))
                for dtype in HALF]
        dtype, gap = min(same, key=lambda pair: pair[1])
        if gap <= bound:
            within = f"{max(gap, 1e-6):.0e}".replace("e-0", "e-")  # 1e-6, as people write it
            parts.append(f"the loss, {got:.6g}, is the cross-entropy of the logits in {_name(dtype)} (equal to it "
                         f"within {within}); the fp32 cross-entropy of the same logits is {reference:.6g}")
        else:
            parts.append(f"the loss, {got:.6g}, differs from the fp32 cross-entropy of the same logits, "
                         f"{reference:.6g}, by {difference:.3g} (tolerance {bound:.1g})")
    if half_ops:
        ops = ", ".join(f"{name} ran in {dtype}" for name, dtype in half_ops)
        lead = "" if parts else f"the loss equals the fp32 cross-entropy of its logits within {difference:.1g}, but "
        parts.append(f"{lead}during the loss {ops}")
    return "; ".join(parts) + ": cast the logits to float32 before the loss (Modalities PR #464)"


# ---------------------------------------------------------------- lost_updates


@dataclass
class _Tally:
    """What one parameter (or one optimizer state key) was meant to do and kept."""

    name: str
    dtype: torch.dtype
    norm: bool = False
    intended: int = 0  # elements whose fp64 replay changed them, over the steps
    lost: int = 0  # of those, the elements whose stored value did not change
    # the same with each followed element counted for the elements of its weight it stands for
    # (numel / sample): a model's share of lost updates estimated from samples weighs each weight
    # by its size, as the share over every element does
    weighted_intended: float = 0.0
    weighted_lost: float = 0.0
    sizes: list[float] = field(default_factory=list)  # the median |intended update| of each step
    stored_sizes: list[float] = field(default_factory=list)  # the median |stored change| of each step
    magnitude: float = 0.0  # the median |value| of the stored tensor (of its followed elements)
    replay_error: float = 0.0  # the largest |stored - replayed weight|, in steps (ulps) of the stored dtype

    def count(self, intended: float, lost: float, scale: float) -> None:
        self.intended += int(intended)
        self.lost += int(lost)
        self.weighted_intended += intended * scale
        self.weighted_lost += lost * scale

    @property
    def fraction(self) -> float:
        return self.weighted_lost / self.weighted_intended if self.weighted_intended else 0.0

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": _name(self.dtype), "intended": self.intended, "lost": self.lost,
                "lost_fraction": self.fraction, "median_intended_update": _median(self.sizes),
                "median_stored_update": _median(self.stored_sizes), "median_value": self.magnitude,
                "half_ulp": _half_ulp(self.magnitude, self.dtype), "replay_error_ulps": self.replay_error}


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


@dataclass(frozen=True)
class _Followed:
    """A weight the replay follows, and which of its elements."""

    name: str
    where: tuple[torch.Tensor, ...] | None  # the sampled elements' indices, one tensor per dimension, on the
    # weight's device; None: every element
    size: int  # the elements followed
    scale: float  # the weight's elements per followed element: numel / size


def _pick(tensor: torch.Tensor, where: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    """The followed elements of a weight, of its gradient or of a state tensor of its shape, (n,):
    all of them (a view where the tensor is contiguous), else a gather of the sample. This rank's
    shard of a DTensor."""
    values = local(tensor.detach())
    return values.reshape(-1) if where is None else values[where]


def _followed(name: str, weight: torch.Tensor, sample: int | None, generator: torch.Generator) -> _Followed:
    """Every element of ``weight``, or up to ``sample`` distinct ones drawn at random by ``generator``
    (on the CPU, then kept on the weight's device)."""
    values = local(weight.detach())
    if sample is None or values.numel() <= sample:
        return _Followed(name, None, values.numel(), 1.0)
    flat = torch.randint(values.numel(), (sample,), generator=generator).unique()  # sorted, repeats dropped
    where = tuple(i.to(values.device) for i in torch.unravel_index(flat, values.shape))
    return _Followed(name, where, flat.numel(), values.numel() / flat.numel())


def _per_element(key: str, value: Any, like: torch.Tensor) -> bool:
    """Whether an optimizer state value holds one number per element of ``like`` (Adam's moments,
    SGD's momentum), not a scalar of the parameter (its step count)."""
    return (isinstance(value, torch.Tensor) and value.is_floating_point() and key not in SCALAR_STATE
            and value.shape == like.shape)


@dataclass
class _Pending:
    """One weight's step as the fp64 replay made it, waiting for the real step to compare."""

    before: torch.Tensor  # the followed elements of the stored weight before the step, (n,)
    target: torch.Tensor  # the same after the replayed step, in fp64
    grad_problem: torch.Tensor  # _non_finite of the gradient the step read
    state_before: dict[str, torch.Tensor | None]  # the stored state (None: created by this step)
    state_moves: dict[str, torch.Tensor]  # bool, by state key: the replay changed the element


@dataclass
class _Step:
    """One optimizer step's replay, and the loss scaler's verdict on it."""

    index: int  # 1-based, over the steps the watch saw
    found_inf: torch.Tensor | None  # set by a GradScaler: non-zero where the step is skipped
    pending: dict[torch.Tensor, _Pending]


@dataclass
class _Row:
    """One weight at one step, compared: the numbers of ROW, then (intended, lost) of each state key,
    in one vector on the weight's device, read back after the run."""

    step: int
    weight: torch.Tensor
    keys: list[tuple[str, torch.dtype]]  # the state keys compared, with their stored dtype
    values: torch.Tensor


# a _Row's numbers: the step skipped by the loss scaler (0 or 1); the elements the replay moved and,
# of those, the ones whose stored value did not change; the median |intended update| and |stored
# change|; the median |stored value|; the replay error in ulps; and for the gradient the step read
# and the weight it stored, how many values are not finite, the first one's position and value
ROW = ("skipped", "intended", "lost", "intended_size", "stored_size", "magnitude", "replay_error",
       "grad_bad", "grad_at", "grad_value", "weight_bad", "weight_at", "weight_value")


def _non_finite(values: torch.Tensor, wide: torch.dtype) -> torch.Tensor:
    """(how many of ``values`` are not finite, the first one's position, its value), (3,) on their
    device: read after the run, so no step waits on it."""
    bad = ~torch.isfinite(values)
    at = bad.to(torch.uint8).argmax()  # the first True; 0 where there is none
    return torch.stack([bad.sum().to(wide), at.to(wide), values[at].to(wide)])


def _step_unhooked(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` past the step hooks: the replay's step is not one of the user's, for
    lmcheck's recorder and step counts as for the user's own hooks (torch's hooked ``step`` keeps
    the plain one as ``__wrapped__``)."""
    step = type(optimizer).step
    getattr(step, "__wrapped__", step)(optimizer)


def _replay_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _replay(optimizer: torch.optim.Optimizer, followed: Mapping[torch.Tensor, _Followed],
            scale: torch.Tensor | None) -> dict[torch.Tensor, _Pending]:
    """Each followed weight's update as ``optimizer``'s next step would make it, on fp64 copies of
    its followed elements and of those of its gradient and of each state tensor of its shape: a
    fresh optimizer of the same class and hyperparameters (the single-tensor path: no foreach,
    fused or capturable kernels), stepped once. The optimizers of :data:`REPLAYABLE` update each
    element from that element alone, so a sample of the elements steps as it would inside the
    whole weight. ``scale``: the loss scale a GradScaler leaves in the gradients of an optimizer
    that unscales them itself (fused Adam, AdamW, SGD), divided out of the copies."""
    pending: dict[torch.Tensor, _Pending] = {}
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p in followed and p.grad is not None and not p.grad.is_sparse]
        if not params:
            continue
        wide = _replay_dtype(params[0].device)
        settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        for key, plain in (("foreach", False), ("fused", None), ("capturable", False), ("differentiable", False)):
            if key in settings:
                settings[key] = plain
        copies, problems = [], []
        for p in params:
            grad = _pick(p.grad, followed[p].where)
            problems.append(_non_finite(grad, wide))
            copy_ = torch.nn.Parameter(_pick(p, followed[p].where).to(wide, copy=True))
            copy_.grad = grad.to(wide, copy=True) if scale is None else grad.to(wide) / scale.to(grad.device, wide)
            copies.append(copy_)
        kind: Any = type(optimizer)
        replay = kind([{"params": copies, **settings}])
        starts = []
        for copy_, p in zip(copies, params, strict=True):
            where = followed[p].where
            stored = optimizer.state.get(p, {})
            if stored:
                replay.state[copy_] = {k: _pick(v, where).to(wide, copy=True) if _per_element(k, v, p) else _clone(v)
                                       for k, v in stored.items()}
            starts.append({k: _clone(v) for k, v in replay.state.get(copy_, {}).items()})
        _step_unhooked(replay)
        for copy_, p, start, problem in zip(copies, params, starts, problems, strict=True):
            where = followed[p].where
            stored = optimizer.state.get(p, {})
            state_moves, state_before = {}, {}
            for key, new in replay.state[copy_].items():
                if not _per_element(key, new, copy_):
                    continue
                old = start.get(key)
                state_moves[key] = new != (old if isinstance(old, torch.Tensor) else torch.zeros_like(new))
                kept = stored.get(key)
                state_before[key] = _pick(kept, where).clone() if isinstance(kept, torch.Tensor) else None
            pending[p] = _Pending(_pick(p, where).clone(), copy_.detach(), problem, state_before, state_moves)
    return pending


def _ulps_apart(before: torch.Tensor, stored: torch.Tensor, replayed: torch.Tensor) -> torch.Tensor:
    """The largest |stored - replayed|, in steps of ``stored``'s dtype at the larger of the weight
    before and after (an update that cancels the weight is computed at the weight's scale): 0.5
    where the stored weight is the replay rounded to its dtype, a little more where the
    optimizer's own arithmetic rounds its moments too."""
    info = torch.finfo(stored.dtype)
    scale = torch.maximum(before.abs(), stored.abs()).to(replayed.dtype).clamp(min=info.tiny)
    step = info.eps * torch.exp2(torch.floor(torch.log2(scale)))
    return ((stored.to(replayed.dtype) - replayed) / step).abs().max()


def _compared(step: int, weight: torch.Tensor, planned: _Pending, where: tuple[torch.Tensor, ...] | None,
              state: Mapping[str, Any], found_inf: torch.Tensor | None) -> _Row:
    """The real step against the replay, for one weight's followed elements: a :class:`_Row`."""
    stored = _pick(weight, where)
    wide, before = planned.target.dtype, planned.before.to(planned.target.dtype)
    nan = planned.target.new_full((), math.nan)
    intended, change = (planned.target - before).abs(), (stored.to(wide) - before).abs()
    moves, kept = intended != 0, change == 0
    skipped = nan.new_zeros(()) if found_inf is None else (found_inf != 0).to(nan.device, wide).reshape(())
    numbers = [skipped, moves.sum().to(wide), (moves & kept).sum().to(wide),
               torch.where(moves, intended, nan).nanmedian(), torch.where(kept, nan, change).nanmedian(),
               stored.abs().to(wide).median(), _ulps_apart(planned.before, stored, planned.target),
               *planned.grad_problem.to(stored.device), *_non_finite(stored, wide)]
    keys = []
    for key, state_moves in planned.state_moves.items():
        now, old = state.get(key), planned.state_before[key]
        if not isinstance(now, torch.Tensor):
            continue
        now = _pick(now, where)
        lost = state_moves & (now == (old if old is not None else torch.zeros_like(now)))
        keys.append((key, now.dtype))
        numbers += [state_moves.sum().to(wide), lost.sum().to(wide)]
    return _Row(step, weight, keys, torch.stack(numbers))


def _read_back(tensors: list[torch.Tensor]) -> list[list[float]]:
    """Each 1-D tensor's values, with one transfer per device: the run waited on none of them."""
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    out: list[list[float]] = [[] for _ in tensors]
    for indices in by_device.values():
        flat = torch.cat([tensors[i] for i in indices]).cpu().double().tolist()
        start = 0
        for i in indices:
            out[i] = flat[start: start + tensors[i].numel()]
            start += tensors[i].numel()
    return out


class _Watch:
    """Optimizer step hooks: before each step, the fp64 replay of the followed elements of each
    weight; after it, their comparison with what the step stored. Nothing waits on the device until
    :meth:`read`. ``sample``: follow at most that many elements of each weight (None: all);
    ``dtypes``: follow only the weights stored in these; ``tolerant``: keep an exception of the
    replay in ``failure`` instead of raising it into the step."""

    def __init__(self, model: torch.nn.Module, *, sample: int | None = None,
                 dtypes: tuple[torch.dtype, ...] | None = None, tolerant: bool = False) -> None:
        self.model_names = {id(p): n for n, p in model.named_parameters()}
        self.sample, self.dtypes, self.tolerant = sample, dtypes, tolerant
        self.failure: str | None = None  # why the replay stopped, where tolerant
        self.generator = torch.Generator().manual_seed(SAMPLE_SEED)
        self.followed: dict[torch.Tensor, _Followed] = {}
        self.steps = 0
        self.pending: dict[int, _Step] = {}  # by id(optimizer): the replay of its step under way
        self.rows: list[_Row] = []
        self.params: dict[torch.Tensor, _Tally] = {}
        self.state: dict[str, _Tally] = {}
        self.skipped: set[int] = set()  # the steps the loss scaler skipped
        self.problem: str | None = None  # the first gradient or weight read that is not finite

    def _follow(self, optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, _Followed]:
        for g, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if p not in self.followed and p.numel() and (self.dtypes is None or p.dtype in self.dtypes):
                    name = self.model_names.get(id(p), f"param_groups[{g}]['params'][{i}]")
                    self.followed[p] = _followed(name, p, self.sample, self.generator)
        return self.followed

    def before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        return once_gradients_exist(args, kwargs, lambda loss: self._replay(optimizer))

    def _replay(self, optimizer: torch.optim.Optimizer) -> None:
        # a GradScaler hands an optimizer that unscales by itself (fused Adam, AdamW, SGD: its
        # _step_supports_amp_scaling) the scale and the overflow flag as attributes for the step,
        # torch 2.13's contract; the step's keyword arguments stay empty
        scale, found_inf = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
        if self.failure is not None:
            return
        with self._tolerated():
            self.pending[id(optimizer)] = _Step(
                self.steps + 1, found_inf if isinstance(found_inf, torch.Tensor) else None,
                _replay(optimizer, self._follow(optimizer), scale if isinstance(scale, torch.Tensor) else None))

    def after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        step = self.pending.pop(id(optimizer), None)
        if step is None or self.failure is not None:
            return
        with self._tolerated():
            for p, planned in step.pending.items():
                self.rows.append(_compared(step.index, p, planned, self.followed[p].where,
                                           optimizer.state.get(p, {}), step.found_inf))

    @contextmanager
    def _tolerated(self) -> Iterator[None]:
        """Where ``tolerant`` (the hooks run inside the user's own run, which must go on), an
        exception of the replay is kept in ``failure`` and the replay stops; else it is raised."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 -- said by the result, and the user's run goes on
            if not self.tolerant:
                raise
            self.failure = f"the replay raised {type(error).__name__}: {error}"
            self.pending.clear()

    def read(self) -> None:
        """The rows compared since the last read into the tallies; NonFiniteError naming the first
        gradient or stored weight, in the order of the run, that is not finite at a step the loss
        scaler did not skip (again at every later read)."""
        rows, self.rows = self.rows, []
        problems = []
        for row, numbers in zip(rows, _read_back([row.values for row in rows]), strict=True):
            value = dict(zip(ROW, numbers, strict=False))
            if value["skipped"]:
                self.skipped.add(row.step)
                continue
            followed = self.followed[row.weight]
            for order, part, what in ((0, "grad", f"the gradient of {followed.name} at optimizer step {row.step}"),
                                      (1, "weight", f"{followed.name} after optimizer step {row.step}")):
                if value[f"{part}_bad"]:
                    problems.append(((row.step, order), f"{what}: {_non_finite_said(value, part, followed, row.weight)}"))
            tally = self.params.setdefault(row.weight, _Tally(followed.name, row.weight.dtype, norm="norm" in
                                                              followed.name.lower() or row.weight.dim() == 1))
            tally.count(value["intended"], value["lost"], followed.scale)
            tally.sizes.append(_number_or_zero(value["intended_size"]))
            tally.stored_sizes.append(_number_or_zero(value["stored_size"]))
            tally.magnitude = value["magnitude"]
            tally.replay_error = max(tally.replay_error, value["replay_error"])
            for k, (key, dtype) in enumerate(row.keys):
                state = self.state.setdefault(key, _Tally(key, dtype))
                state.count(numbers[len(ROW) + 2 * k], numbers[len(ROW) + 2 * k + 1], followed.scale)
        if problems and self.problem is None:
            self.problem = min(problems, key=lambda problem: problem[0])[1]  # the first of the earliest
        if self.problem is not None:
            raise NonFiniteError(self.problem)


def _number_or_zero(value: float) -> float:
    """A median read back: NaN where it had no element to take (no update meant, none stored)."""
    return value if math.isfinite(value) else 0.0


def _non_finite_said(value: Mapping[str, float], part: str, followed: _Followed, weight: torch.Tensor) -> str:
    """Where the first non-finite value of a row's gradient or weight (``part``) is: ``nan at index
    (4,) (1 of 64 values are not finite)``."""
    count, at = int(value[f"{part}_bad"]), int(value[f"{part}_at"])
    if followed.where is None:
        shape = local(weight.detach()).shape
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(at), shape))
        among = f"{count:,} of {followed.size:,} values are not finite"
    else:
        index = tuple(int(w[at]) for w in followed.where)
        among = f"{count:,} of the {followed.size:,} sampled values are not finite"
    return f"{value[f'{part}_value']} at index {index} ({among})"


class _Snapshot:
    """The weights, buffers, gradients, optimizer state and hyperparameters and the modules'
    modes as they are now, put back by :meth:`restore`. The state is cloned tensor by tensor
    (a deep copy of ``optimizer.state_dict()`` would do, but ``load_state_dict`` casts the state
    to each parameter's dtype, which would change a setup that keeps it in another)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        tensors: dict[int, torch.Tensor] = {}
        for tensor in [*model.parameters(), *model.buffers(), *_parameters(optimizer)]:
            tensors.setdefault(id(tensor), tensor)
        self.values = [(t, t.detach().clone()) for t in tensors.values()]
        self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in _parameters(optimizer)]
        self.state = {p: {k: _clone(v) for k, v in s.items()} for p, s in optimizer.state.items()}
        self.groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self.modes = [(m, m.training) for m in model.modules()]
        self.optimizer = optimizer

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, value in self.values:
                tensor.copy_(value)
        for parameter, grad in self.grads:
            parameter.grad = grad
        self.optimizer.state.clear()
        self.optimizer.state.update(self.state)
        for group, saved in zip(self.optimizer.param_groups, self.groups, strict=True):
            group.update(saved)
        for module, training in self.modes:
            module.training = training


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _floating_state(optimizer: torch.optim.Optimizer) -> dict[str, set[torch.dtype]]:
    """The dtypes of the optimizer's floating state tensors, by key (``exp_avg``, ``step``)."""
    found: dict[str, set[torch.dtype]] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                found.setdefault(key, set()).add(value.dtype)
    return found


@probe("lost_updates")
def lost_updates(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], Any], *,
                 steps: int = 3, max_lost_fraction: float = 0.01, force: bool = False,
                 sample: int | None = None) -> Result:
    """The optimizer's updates reach the stored weights and state: none rounds away.

    An update smaller than half a step of the weight's dtype leaves it unchanged, so weights
    stored in bf16 without fp32 master weights never move at a small learning rate: norm weights
    stuck at exactly 1.0, where half a bf16 step is 0.0039 (vllm-project/speculators PR #765),
    0 of 768 weights moved in 100 steps (workofart/ml-by-hand PR #85). Adam's moments stored in
    bf16 lose their own updates the same way (the second moment's decay by beta2 = 0.999 is below
    half a bf16 step, so it stops following the gradients).

    ``step`` is called until the optimizer has stepped ``steps`` times. Before each optimizer step
    (``register_step_pre_hook``; where the step is given a closure, once the closure has run) the
    probe replays it on fp64 copies of the weights, gradients and state (a fresh optimizer of the
    same class and hyperparameters); after it (``register_step_post_hook``) an element's update is
    *lost* where the replay changed it and the stored value did not change at all. The probe
    fails where more than ``max_lost_fraction`` of the intended updates of the weights, or of any
    state tensor shaped like its weight (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``), were
    lost, naming the parameters with the largest lost share, norm weights (names with "norm", and
    1-D weights) first; or where a gradient or an updated weight is NaN or Inf, naming it and the
    step.

    Under a ``torch.amp.GradScaler``, an optimizer that unscales its gradients itself (``fused=True``
    Adam, AdamW and SGD) is stepped with the gradients still scaled: the replay divides them by the
    scaler's ``grad_scale``, and a step the scaler skips (its ``found_inf`` set: inf or NaN
    gradients) is not compared. Other optimizers are stepped by the scaler unscaled, or not at all.

    ``replay_error_ulps`` (in the metrics) says how far the stored weights came from the replay, in
    steps of their dtype: a few where the replay is the optimizer's own step (in fp32 at most 6
    measured over the optimizers below at lr 1e-3, 13 for AdamW at lr 1e-2, 20 for fused AdamW
    under a GradScaler at lr 1e-2); far more means something else changed the update, and the
    counts do not hold.

    Everything is put back afterwards: the weights and buffers, the gradients, the optimizer's
    state and hyperparameters, and the modules' modes are cloned before the first step (a second
    copy of the model and its state in memory, with or without ``sample``: meant for small
    models; the setup checks replay the user's own run on a sample and put back nothing of
    theirs). What ``step`` changes outside them (a learning-rate scheduler's count, a data
    iterator's position, the random generators) is not put back.

    Args:
        model: the model the optimizer trains (for the parameters' names).
        optimizer: a ``torch.optim`` SGD, Adam, AdamW, Adamax, NAdam, RAdam, RMSprop, Adagrad,
            Adadelta, ASGD or Rprop, or a wrapper that keeps one in ``.optimizer`` (accelerate's,
            the Trainer's).
        step: a function of no arguments that does one training step (forward, backward,
            ``optimizer.step()``, ``zero_grad``), or one micro-batch of one (at most 16 calls per
            optimizer step).
        steps: the optimizer steps to watch.
        max_lost_fraction: the largest share of intended updates that may be lost.
        force: run even where every weight and state tensor is fp32 or wider (then only updates
            below half an fp32 step, 6e-8 at 1.0, can be lost).
        sample: replay and compare a fixed random sample of at most this many elements of each
            weight (drawn once, seeded) instead of all of them. The optimizers above update each
            element from that element alone, so the sample moves exactly as inside the whole
            weight; the fp64 copies shrink to its size. None: every element.

    Not applicable for another optimizer class (its update is not replayed), or, unless
    ``force``, where the weights and the state are all fp32 or wider.
    """
    check_model(model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InputError(f"'optimizer' must be a torch.optim.Optimizer (got {describe(optimizer)})")
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # type: ignore[attr-defined]  # accelerate's wrapper steps the one inside
    check_callable(step, "step", "a function of no arguments that does one training step")
    check_int(steps, "steps", 1)
    max_lost_fraction = check_number(max_lost_fraction, "max_lost_fraction", low=0, high=1)
    check_bool(force, "force")
    if sample is not None:
        check_int(sample, "sample", 1)
    if type(optimizer) not in REPLAYABLE:
        known = ", ".join(kind.__name__ for kind in REPLAYABLE)
        raise NotApplicableError(f"lost_updates replays torch.optim's element-wise {known} on fp64 copies; a "
                                 f"{type(optimizer).__name__}'s step cannot be replayed")
    narrow = {p.dtype for p in _parameters(optimizer)} | {
        dtype for dtypes in _floating_state(optimizer).values() for dtype in dtypes}
    if not force and all(torch.finfo(dtype).bits >= 32 for dtype in narrow):
        raise NotApplicableError("fp32 weights and optimizer state: nothing rounds away (force=True measures "
                                 "the updates below half an fp32 step)")
    watch = _Watch(model, sample=sample)
    snapshot = _Snapshot(model, optimizer)
    handles = [optimizer.register_step_pre_hook(watch.before), optimizer.register_step_post_hook(watch.after)]
    calls = 0
    try:
        while watch.steps < steps:
            if calls >= steps * CALLS_PER_STEP:
                raise InputError(f"'step' must call optimizer.step() (it stepped {watch.steps} times in {calls} "
                                 f"calls)")
            step()
            calls += 1
        state_dtypes = {k: sorted(map(_name, v)) for k, v in sorted(_floating_state(optimizer).items())}
    finally:
        for handle in handles:
            handle.remove()
        snapshot.restore()
    watch.read()
    return _lost_result(watch, max_lost_fraction, state_dtypes)


class UpdateReplay:
    """:func:`lost_updates` on a training run of the user's own, with no copy of the model: while
    active, each step of an optimizer that trains ``model``'s bf16 or fp16 weights is replayed in
    fp64 on a fixed random sample of at most ``sample`` elements of each (their weights,
    gradients and state gathered before the step), and compared with what the step stored.
    Nothing is put back: the run is the user's. The setup checks wrap their first run in it.

    The hooks are torch's global optimizer-step hooks, armed only where the model has a trainable
    half-precision weight; an optimizer none of whose parameters is one is left alone. The
    replay is exact for :data:`REPLAYABLE`'s element-wise optimizers only: a step of any other
    class is not replayed, and :meth:`result` says so. Memory: the sample's indices, and per step
    fp64 copies of the sample and a few numbers per weight, read back from the device once, by
    :meth:`result`.

    Example:
        >>> with UpdateReplay(model) as replay:  # doctest: +SKIP
        ...     train(model, optimizer, steps=3)
        >>> replay.result().passed  # doctest: +SKIP
        True
    """

    def __init__(self, model: torch.nn.Module, *, sample: int = SAMPLE) -> None:
        check_model(model)
        check_int(sample, "sample", 1)
        self.half = {id(p) for p in model.parameters() if p.requires_grad and p.dtype in HALF}
        self.watch = _Watch(model, sample=sample, dtypes=HALF, tolerant=True)
        self.not_replayed: set[str] = set()  # the classes of the optimizers whose steps were not replayed
        self.verdicts: dict[int, bool] = {}  # by id(optimizer): its steps are replayed
        self.state_dtypes: dict[str, set[torch.dtype]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> UpdateReplay:
        if self.half:
            self.handles = [register_optimizer_step_pre_hook(self._before),
                            register_optimizer_step_post_hook(self._after)]
        return self

    def __exit__(self, *_: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _replayed(self, optimizer: torch.optim.Optimizer) -> bool:
        if id(optimizer) not in self.verdicts:
            trains = any(id(p) in self.half for group in optimizer.param_groups for p in group["params"])
            # not: an optimizer of something else, or of the fp32 weights only
            self.verdicts[id(optimizer)] = trains and type(optimizer) in REPLAYABLE
            if trains and type(optimizer) not in REPLAYABLE:
                self.not_replayed.add(type(optimizer).__name__)
        return self.verdicts[id(optimizer)]

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        return self.watch.before(optimizer, args, kwargs) if self._replayed(optimizer) else None

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._replayed(optimizer):
            self.watch.after(optimizer, args, kwargs)
            for key, dtypes in _floating_state(optimizer).items():
                self.state_dtypes.setdefault(key, set()).update(dtypes)

    @property
    def unreplayed(self) -> str | None:
        """Why the steps of the half-precision weights that were seen were not replayed (an
        optimizer of another class, or a replay that raised), else None."""
        if self.watch.failure is not None:
            return self.watch.failure
        if self.not_replayed and not self.watch.steps:
            known = ", ".join(kind.__name__ for kind in REPLAYABLE)
            return (f"the half-precision weights are trained by a {' and a '.join(sorted(self.not_replayed))}, not one "
                    f"of torch.optim's element-wise optimizers ({known}), whose update of each element reads that "
                    f"element alone, so that a sample of the elements replays it exactly")
        return None

    def result(self, *, max_lost_fraction: float = 0.01) -> Result:
        """The lost updates of the steps replayed so far, as :func:`lost_updates` reports them (the
        run's own steps); not applicable, with the reason, where none was replayed."""
        name = "lost_updates"
        max_lost_fraction = check_number(max_lost_fraction, "max_lost_fraction", low=0, high=1)
        if not self.half:
            return Result.not_applicable(name, "no trainable weight is stored in half precision")
        if self.unreplayed is not None:
            return Result.not_applicable(name, self.unreplayed)
        if not self.watch.steps:
            return Result.not_applicable(name, "no optimizer step of the half-precision weights was seen")
        try:
            self.watch.read()
        except NonFiniteError as error:
            return non_finite_result(name, str(error))
        return _lost_result(self.watch, max_lost_fraction,
                            {k: sorted(map(_name, v)) for k, v in sorted(self.state_dtypes.items())},
                            run=" of the run", unreplayed=sorted(self.not_replayed))


def _lost_result(watch: _Watch, bound: float, state_dtypes: dict[str, list[str]], *, run: str = "",
                 unreplayed: list[str] | None = None) -> Result:
    tallies = list(watch.params.values())
    intended = sum(t.intended for t in tallies)
    lost = sum(t.lost for t in tallies)
    weighted = sum(t.weighted_intended for t in tallies)
    fraction = sum(t.weighted_lost for t in tallies) / weighted if weighted else 0.0  # lost / intended without a sample
    states = sorted(watch.state.values(), key=lambda t: -t.fraction)
    worst_state = states[0].fraction if states else 0.0
    steps = watch.steps - len(watch.skipped)
    dtypes: dict[str, int] = {}
    for tally in tallies:
        dtypes[_name(tally.dtype)] = dtypes.get(_name(tally.dtype), 0) + 1
    metrics = {"lost_fraction": fraction, "intended_updates": intended, "lost_updates": lost, "steps": steps,
               "skipped_steps": len(watch.skipped), "sample": watch.sample,
               "followed_elements": sum(watch.followed[p].size for p in watch.params),
               "replay_error_ulps": max((t.replay_error for t in tallies), default=0.0),
               "parameter_dtypes": dtypes, "state_dtypes": state_dtypes,
               "state_lost_fraction": {t.name: t.fraction for t in states},
               "lost_fraction_by_parameter": {t.name: t.fraction for t in tallies}}
    how = (f" (replayed in float64 on a fixed sample of at most {watch.sample:,} elements of each weight; the shares "
           f"count each sampled element for the elements of its weight it stands for)") if watch.sample is not None else ""
    if watch.skipped:
        how += f"; {len(watch.skipped)} step(s) the loss scaler skipped (inf or NaN gradients) are not compared"
    if unreplayed:
        how += f"; the steps of a {' and a '.join(unreplayed)} were not replayed (not an element-wise torch.optim class)"
    problems = []
    if not fraction <= bound:
        ranked = sorted((t for t in tallies if t.fraction > bound), key=lambda t: (not t.norm, -t.fraction))
        named = ", ".join([_describe_lost(ranked[0])] + [f"{t.name} ({t.fraction:.0%})" for t in ranked[1:3]])
        more = f" and {len(ranked) - 3} more" if len(ranked) > 3 else ""
        problems.append(f"{fraction:.1%} of the intended updates were rounded away in {steps} steps{run}: "
                        f"{named}{more}; keep fp32 master weights (autocast, or the optimizer on fp32 copies) "
                        f"(vllm-project/speculators PR #765, workofart/ml-by-hand PR #85)")
    for state in states:
        if state.fraction > bound:
            problems.append(f"{state.name} stored in {_name(state.dtype)}: {state.fraction:.1%} of its intended "
                            f"updates were rounded away, so it stops following the gradients; keep the "
                            f"optimizer state in float32")
    worst = max(fraction, worst_state)
    if problems:
        explanation = "; also ".join(problems) + how
    else:
        counted = f"of the {intended:,} intended updates" if watch.sample is None else \
            f"of the intended updates ({intended:,} replayed)"
        explanation = (f"{fraction:.2%} {counted} were rounded away in {steps} steps{run} "
                       f"(at most {bound:.0%}), and at most {worst_state:.2%} of any optimizer state's; weights "
                       f"in {', '.join(sorted(dtypes))}, optimizer state in "
                       f"{', '.join(sorted({d for ds in state_dtypes.values() for d in ds})) or 'no tensor'}{how}")
    return Result(name="lost_updates", passed=not problems, metrics=metrics, threshold=bound,
                  headroom=headroom_below(worst, bound), explanation=explanation,
                  details=tuple(t.row() for t in tallies))


def _describe_lost(tally: _Tally) -> str:
    row = tally.row()
    return (f"{tally.name} ({tally.fraction:.0%} lost, stored in {_name(tally.dtype)}: updates below half its "
            f"ulp, {row['half_ulp']:.2g} at {_number(tally.magnitude)}, vanish; its median intended update is "
            f"{row['median_intended_update']:.1g})")


def _number(value: float) -> str:
    """``value`` in two significant digits, a whole number with its ``.0`` (``1.0``, ``0.013``)."""
    text = f"{value:.2g}"
    return text if any(c in text for c in ".en") else f"{text}.0"


# ---------------------------------------------------------------- autocast_ops


def _needs_fp32(name: str, module_class: str) -> bool:
    """Whether an aten op must produce float32: softmax, norms, the loss, and a hand-written norm's
    statistics (a mean, a power, a root inside a module whose class name says norm)."""
    return any(word in name for word in FP32_OP_WORDS) or (
        "norm" in module_class.lower() and name in NORM_STATISTICS)


@probe("autocast_ops")
def autocast_ops(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], *, dtype: torch.dtype = torch.bfloat16,
                 loss: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
                 ) -> Result:
    """Under ``torch.autocast``, softmax, log-softmax, the norms and the loss still run in float32.

    Autocast runs matmuls in ``dtype`` and keeps these ops in float32 on CUDA; a custom autocast
    region, or a cast before the op (``softmax(scores.to(torch.bfloat16))``), takes one out of it.
    One forward and loss run under ``torch.autocast(<the model's device type>, dtype)``, without
    gradients, inside a dispatch mode that records each aten op's output dtype and, through forward
    hooks on every module, the module that ran it. Every op named ``*softmax*``, ``*norm*``,
    ``nll_loss*``, ``cross_entropy*`` or ``logsumexp``, and the means, powers and roots inside a
    module whose class name says norm (a hand-written RMSNorm), must produce float32. The probe
    fails naming each op, its dtype and its module.

    Attention through ``scaled_dot_product_attention`` (transformers' default ``sdpa``) is one
    fused op whose softmax the probe cannot see (the kernels accumulate it in float32); the
    result counts those calls. Load a Hugging Face model with ``attn_implementation="eager"`` to
    check its softmax too.

    Args:
        model: the model; run once in eval mode.
        batch: ``input_ids``, ``labels`` (unshifted, -100 ignored), optional ``attention_mask``.
        dtype: the autocast dtype, ``torch.bfloat16`` or ``torch.float16``.
        loss: ``loss(model, batch) -> scalar tensor``, the loss the user trains on; by default the
            model's own, or, for a plain module, the reference cross-entropy of its logits.
    """
    check_model(model)
    device = model_device(model)
    data = _batch(batch, "batch", device, labels=True)
    if dtype not in HALF:
        raise InputError(f"'dtype' must be torch.bfloat16 or torch.float16 (got {describe(dtype)})")
    if loss is not None:
        check_callable(loss, "loss", "a function loss(model, batch) -> the scalar loss tensor")
    with _ModuleStack(model) as modules, eval_mode(model), torch.no_grad():
        recorder = _OpRecorder(_needs_fp32, modules)
        with torch.autocast(device.type, dtype=dtype), recorder:
            value = loss(model, data) if loss is not None else _default_loss(model, data)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ModelError(f"the loss must be a scalar tensor (got {describe(value)})")
    require_finite(value.detach(), f"the loss under torch.autocast({device.type!r}, {_name(dtype)})", ())
    wrong: dict[tuple[str, str], dict[str, int]] = {}  # (module, dtype) -> op -> calls
    for op in recorder.ops:
        if op.dtype in HALF:
            calls = wrong.setdefault((op.module, _name(op.dtype)), {})
            calls[op.name] = calls.get(op.name, 0) + 1
    half_ops = sum(sum(calls.values()) for calls in wrong.values())
    counts: dict[str, int] = {}
    for op in recorder.ops:
        counts[f"{op.name} {_name(op.dtype)}"] = counts.get(f"{op.name} {_name(op.dtype)}", 0) + 1
    region = f"under torch.autocast({device.type!r}, {_name(dtype)})"
    fused = (f"; {recorder.fused_attention} attention call(s) went through fused scaled_dot_product_attention, "
             f"whose softmax the probe cannot see (a Hugging Face model loaded with attn_implementation='eager' shows "
             f"it)"
             if recorder.fused_attention else "")
    metrics = {"checked_ops": len(recorder.ops), "half_precision_ops": half_ops, "op_dtypes": counts,
               "fused_attention_calls": recorder.fused_attention, "dtype": _name(dtype)}
    if wrong:
        named = "; ".join(", ".join(name + (f" x{n}" if n > 1 else "") for name, n in calls.items())
                          + f" ran in {kind} in {module}" for (module, kind), calls in list(wrong.items())[:3])
        more = f"; and in {len(wrong) - 3} more modules" if len(wrong) > 3 else ""
        explanation = (f"{region}, {half_ops} of {len(recorder.ops)} softmax, norm and loss ops ran in half "
                       f"precision: {named}{more}; autocast keeps these ops in float32 on CUDA, and a custom "
                       f"region or a cast before the op takes them out: upcast the input (or softmax(x, dim, "
                       f"dtype=torch.float32)){fused}")
    else:
        explanation = (f"{region}, all {len(recorder.ops)} softmax, norm and loss ops ran in float32 "
                       f"({', '.join(sorted({op.name for op in recorder.ops})) or 'none found'}){fused}")
    return Result(name="autocast_ops", passed=not wrong, metrics=metrics, threshold=None, headroom=None,
                  explanation=explanation)


def _default_loss(model: torch.nn.Module, data: Mapping[str, Any]) -> torch.Tensor:
    """The model's own loss; for a plain module, the fp32 cross-entropy of its logits."""
    if has_own_loss(model):
        return own_loss(model, data)[0]
    logits, _ = model_forward(model, data["input_ids"], data.get("attention_mask"), None, use_cache=False,
                              what="the logits under autocast")
    return reference_loss(logits, data["labels"])


# ---------------------------------------------------------------- fp16_headroom


class _Peaks:
    """Forward hooks on every module: the largest finite |value| of its output, and where a
    non-finite one first appears, in the order the modules finish (the innermost first). With
    ``row``, only that row of outputs whose first dimension is the batch's ``rows``."""

    def __init__(self, model: torch.nn.Module, *, row: int | None = None, rows: int = 0) -> None:
        self.model, self.row, self.rows = model, row, rows
        self.peaks: dict[str, float] = {}
        self.broken: list[tuple[str, str]] = []  # (module, where its output is not finite)
        self.handles: list[Any] = []

    def __enter__(self) -> _Peaks:
        for name, module in self.model.named_modules():
            label = name or type(module).__name__
            self.handles.append(module.register_forward_hook(lambda m, a, out, label=label: self._see(label, out)))
        return self

    def __exit__(self, *_: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _see(self, label: str, output: Any) -> None:
        for tensor in _floats(output):
            values = tensor.detach()
            if self.row is not None and values.dim() and values.shape[0] == self.rows:
                values = values[self.row]
            if values.numel():
                finite = torch.where(torch.isfinite(values), values.abs(), 0)
                self.peaks[label] = max(self.peaks.get(label, 0.0), float(finite.max()))
            found = locate(values, ())
            if found is not None and not any(label == seen for seen, _ in self.broken):
                self.broken.append((label, found))


@probe("fp16_headroom")
def fp16_headroom(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], *, fraction: float = 0.5) -> Result:
    """The model's activations stay well inside float16's range, and in float16 a fully masked
    row gives no NaN.

    Two checks:

    - forward hooks on every module record the largest |value| of its output on ``batch``, run in
      the model's own dtype; the probe fails where any exceeds ``fraction`` of 65504, float16's
      largest value (T5's FFN activations overflow it: transformers #5651), naming the first
      module (the innermost) over the bound and the largest;
    - a two-row batch, the first row of ``batch`` beside a copy of it whose attention mask is all
      0, runs through the model in float16: as it is where its weights are float16, else under
      ``torch.autocast(<its device type>, float16)``, as mixed-precision training runs it (no
      copy of the model). The real row's logits must be finite,
      and the masked row must not be NaN: an additive mask of ``finfo.min`` plus another negative
      term (a second mask, a negative score) overflows to -inf, and a row of -inf gives NaN in
      the softmax (transformers PR #17306), which the backward carries into every gradient. A
      model that takes no attention mask skips this check, and the explanation says so.

    Args:
        model: the model; run in eval mode, without gradients.
        batch: ``input_ids`` and optional ``attention_mask`` (``labels`` are not read).
        fraction: the share of 65504 the largest activation may reach, above 0 and at most 1.
    """
    check_model(model)
    data = _batch(batch, "batch", model_device(model), labels=False)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise InputError(f"'fraction' must be a number above 0 and at most 1, the share of float16's 65504 the "
                         f"activations may reach (got {describe(fraction)})")
    limit = fraction * FP16_MAX
    ids, mask = data["input_ids"], data.get("attention_mask")
    problems: list[str] = []
    with _Peaks(model) as peaks, eval_mode(model), torch.no_grad():
        try:
            model_forward(model, ids, mask, None, use_cache=False, what="the logits")
        except NonFiniteError as error:
            problems.append(str(error))
    if peaks.broken:
        module, where = peaks.broken[0]
        problems.insert(0, f"{module}'s output is not finite in {_name(parameter_dtype(model))}: {where}"
                        + (" (an fp16 overflow: transformers #5651)" if parameter_dtype(model) == torch.float16 else ""))
    peak_module, peak = max(peaks.peaks.items(), key=lambda item: item[1], default=("", 0.0))
    over = [name for name, value in peaks.peaks.items() if value > limit]
    if over:
        first = over[0]
        problems.insert(0, f"{first}'s output reaches {peaks.peaks[first]:,.0f}, {peaks.peaks[first] / FP16_MAX:.0%} of "
                        f"float16's 65504 (bound {fraction:.0%}, {limit:,.0f})"
                        + (f"; the largest, {peak:,.0f}, is {peak_module}'s" if peak_module != first else "")
                        + f"; {len(over)} module(s) over the bound: in float16 they overflow to inf (T5's FFN: "
                        f"transformers #5651); keep them in float32, or train in bfloat16")
    masked = _masked_row(model, ids, mask)
    if masked.problem:
        problems.append(masked.problem)
    ratio = peak / FP16_MAX
    metrics = {"max_activation": peak, "max_module": peak_module, "max_ratio": ratio, "limit": limit,
               "modules_over_limit": len(over), "masked_row": masked.summary,
               "float16_by": "weights" if parameter_dtype(model) == torch.float16 else "autocast"}
    if problems:
        explanation = "; ".join(problems)
    else:
        explanation = (f"the largest activation, {peak:.3g} in {peak_module}, is {ratio:.2g} of float16's 65504 "
                       f"(bound {fraction:g}); {masked.summary}")
    return Result(name="fp16_headroom", passed=not problems, metrics=metrics, threshold=fraction,
                  headroom=headroom_below(ratio, fraction), explanation=explanation)


@dataclass
class _Masked:
    summary: str
    problem: str = ""


def _masked_row(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> _Masked:
    """The fully masked row's check: the first row beside itself with an all-0 mask, in float16."""
    row = ids[:1]  # (1, T)
    real = torch.ones_like(row) if mask is None else mask[:1].long()
    pair_ids, pair_mask = torch.cat([row, row]), torch.cat([real, torch.zeros_like(real)])  # (2, T)
    weights = parameter_dtype(model) == torch.float16
    cast = nullcontext() if weights else torch.autocast(model_device(model).type, dtype=torch.float16)
    try:
        with _Peaks(model, row=0, rows=2) as peaks, eval_mode(model), torch.no_grad(), cast:
            logits, _ = model_forward(model, pair_ids, pair_mask, None, use_cache=False,
                                      what="in float16, the real row beside a fully masked one")
    except NotApplicableError as error:
        return _Masked(f"the fully masked row was not run: {error}")
    except NonFiniteError as error:
        first = f"; the first module whose output is not finite there: {peaks.broken[0][0]}" if peaks.broken else ""
        return _Masked("in float16 the real row is not finite",
                       f"{error}{first} (an fp16 overflow: transformers #5651)")
    except ModelError as error:
        if weights:
            raise
        return _Masked(f"the fully masked row was not run: the model does not run under float16 autocast ({error})")
    found = locate(logits[1], ("position", "token id"))
    if found is not None:
        return _Masked("in float16 a fully masked row is not finite",
                       f"a fully masked row gives NaN in float16 ({found}): an additive mask of finfo.min plus another "
                       f"negative term (a second mask, a negative score) overflows to -inf, and a row of -inf has no "
                       f"softmax (transformers PR #17306); the backward carries the NaN into every gradient: clamp "
                       f"the summed mask at finfo.min")
    return _Masked("in float16 a fully masked row and the real row beside it give finite logits")


# ---------------------------------------------------------------- rope_precision


def _rotary(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The model's first rotary embedding module: a ``*RotaryEmbedding`` or one holding ``inv_freq``."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor) or type(module).__name__.endswith(
                "RotaryEmbedding"):
            return name or type(module).__name__, module
    raise NotApplicableError(f"the {type(model).__name__} has no rotary embedding module (none is a "
                             f"*RotaryEmbedding or holds inv_freq)")


@dataclass
class _Reference:
    """The frequencies the RoPE table is compared with."""

    at: Callable[[int], torch.Tensor]  # the positions' end -> inv_freq in float64, (D/2,)
    source: str  # where they come from, in words
    own_dtype: torch.dtype  # the dtype the module keeps its own inv_freq in
    own: bool = False  # the module's own inv_freq: a half-precision one fails by its dtype alone
    float32: bool = False  # computed in float32 (transformers' functions): exact to a few fp32 steps


def _reference_frequencies(module: torch.nn.Module, config: Any) -> _Reference:
    """``inv_freq`` in float64 for the rotary module: for the default rope type recomputed in
    float64 from the config (``1 / theta ** (2i / dim)``); for another type (linear, dynamic,
    llama3, yarn, longrope...) transformers' own ``ROPE_INIT_FUNCTIONS[rope_type](config, device)``
    on a copy of the config, which computes in float32; the module's own cast to float64 only
    where neither can be had, saying why."""
    own = getattr(module, "inv_freq", None)
    if not isinstance(own, torch.Tensor):
        raise NotApplicableError(f"the rotary module {type(module).__name__} holds no inv_freq tensor")
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    parameters = parameters if isinstance(parameters, Mapping) else {}
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    theta = parameters.get("rope_theta") or getattr(config, "rope_theta", None)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (
        getattr(config, "hidden_size", 0) // heads if isinstance(heads, int) and heads else None)
    share = parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    why = f"rope type {kind!r} is not recomputed"
    if kind == "default" and isinstance(theta, (int, float)) and isinstance(head_dim, int):
        dim = int(head_dim * share)
        if dim // 2 == own.numel():
            inv = 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            return _Reference(lambda end: inv, f"recomputed in float64 from the config (theta {theta:g}, dim {dim})",
                              own.dtype)
        why = f"the config's head dim {dim} does not give its {own.numel()} frequencies"
    elif kind != "default" and config is not None:
        made = _transformers_frequencies(kind, config, own)
        if isinstance(made, _Reference):
            return made
        why = made
    inv = own.detach().cpu().double()
    return _Reference(lambda end: inv, f"the module's own inv_freq in float64 ({why}), whose {_name(own.dtype)} "
                      f"rounding it shares", own.dtype, own=True)


def _transformers_frequencies(kind: str, config: Any, own: torch.Tensor) -> _Reference | str:
    """The reference of a rope type other than the default from transformers' own function of the
    config, or why there is none. ``dynamic`` and ``longrope`` recompute the frequencies from the
    length a call reaches (transformers' ``dynamic_rope_update``), so the reference of each chunk of
    positions is computed for its end, as the module's is."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    function = ROPE_INIT_FUNCTIONS.get(kind)
    if function is None:
        return f"rope type {kind!r} is not in transformers' ROPE_INIT_FUNCTIONS"
    copied = copy.deepcopy(config)  # the functions standardize the config's rope parameters in place
    grows = "dynamic" in kind or kind == "longrope"
    made: dict[int | None, torch.Tensor] = {}

    def at(end: int) -> torch.Tensor:
        key = end if grows else None
        if key not in made:
            inv, _ = function(copied, torch.device("cpu"), **({"seq_len": end} if grows else {}))
            made[key] = inv.detach().double()
        return made[key]

    try:
        first = at(1)
    except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError, RuntimeError) as problem:
        return f"transformers' ROPE_INIT_FUNCTIONS[{kind!r}] raised {type(problem).__name__}: {problem}"
    if first.numel() != own.numel():
        return f"transformers' ROPE_INIT_FUNCTIONS[{kind!r}] gives {first.numel()} frequencies, the module holds {own.numel()}"
    return _Reference(at, f"transformers' ROPE_INIT_FUNCTIONS[{kind!r}] of the config, computed in float32", own.dtype,
                      float32=True)


@dataclass
class _Drift:
    error: float = 0.0  # the largest |cos or sin - the fp64 reference|
    position: int = 0  # where
    first: int | None = None  # the first position above the bound
    dtype: torch.dtype = torch.float32  # the table's dtype
    bound: float = 0.0  # the tolerance, plus half a step of the table's dtype where it is half precision


def _table_drift(module: torch.nn.Module, reference: _Reference, scaling: float, length: int, tolerance: float,
                 x: torch.Tensor, region: AbstractContextManager[Any]) -> _Drift:
    """The rotary module's cos/sin at positions 0..length-1 against the fp64 reference, in chunks."""
    drift, layout = _Drift(bound=tolerance), ""
    for start in range(0, length, ROPE_CHUNK):
        positions = torch.arange(start, min(length, start + ROPE_CHUNK), device=x.device)  # (n,)
        n = positions.numel()
        inv = reference.at(start + n)  # (D/2,)
        cos, sin = _call_rotary(module, x, positions, region)
        cos, sin = cos.detach().reshape(-1, n, cos.shape[-1])[0], sin.detach().reshape(-1, n, sin.shape[-1])[0]
        require_finite(cos, "the rotary cos table", ("position", "dimension"), offsets=(start,))
        require_finite(sin, "the rotary sin table", ("position", "dimension"), offsets=(start,))
        if start == 0 and cos.dtype in HALF:  # cos/sin rounded at the end: at most half a step, at any position
            drift.dtype, drift.bound = cos.dtype, tolerance + _half_ulp(max(scaling, 1.0), cos.dtype)
        angle = positions.cpu().double()[:, None] * inv[None]  # (n, D/2)
        layouts = {"concatenated": lambda a: torch.cat([a, a], -1), "interleaved": lambda a: a.repeat_interleave(2, -1),
                   "plain": lambda a: a}
        table = (cos.cpu().double(), sin.cpu().double())  # (n, D) each
        errors = {k: _table_error(table, spread(angle), scaling) for k, spread in layouts.items()
                  if k == layout or (not layout and spread(angle[:1]).shape[-1] == cos.shape[-1])}
        if not errors:
            raise NotApplicableError(f"the rotary table has {cos.shape[-1]} columns for {inv.numel()} frequencies")
        layout = layout or min(errors, key=lambda k: float(errors[k].max()))  # read off the first chunk
        error = errors[layout]  # (n,)
        at = int(error.argmax())
        if float(error[at]) > drift.error:
            drift.error, drift.position = float(error[at]), start + at
        above = (error > drift.bound).nonzero()
        if drift.first is None and len(above):
            drift.first = start + int(above[0])
    return drift


def _call_rotary(module: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor,
                 region: AbstractContextManager[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``module(x, positions[None])`` as a Llama calls its rotary embedding: (cos, sin), each
    (..., n, D); NotApplicableError where the module is called another way."""
    how = f"the rotary module {type(module).__name__} cannot be called as a Llama's is, rotary(x, position_ids) -> (cos, sin)"
    try:
        with region, torch.no_grad():
            tables = module(x, positions[None])
    except LmcheckError:
        raise
    except (TypeError, ValueError, RuntimeError, IndexError) as problem:
        raise NotApplicableError(f"{how}: it raised {type(problem).__name__}: {problem}") from problem
    n = positions.numel()
    if not (isinstance(tables, (tuple, list)) and len(tables) == 2 and all(
            isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-2] == n for t in tables)):
        raise NotApplicableError(f"{how}: it returned {describe(tables)}")
    return tables[0], tables[1]


def _table_error(table: tuple[torch.Tensor, torch.Tensor], angle: torch.Tensor, scaling: float) -> torch.Tensor:
    """The largest |cos or sin - its fp64 value| at each position, (n,), for angles (n, D)."""
    return torch.maximum((table[0] - scaling * angle.cos()).abs().amax(-1),
                         (table[1] - scaling * angle.sin()).abs().amax(-1))


@contextmanager
def _kept(module: torch.nn.Module) -> Iterator[None]:
    """The module's buffers and plain attributes put back afterwards (a dynamic RoPE rewrites its
    inv_freq when called past its cached length)."""
    buffers = {name: (buffer, buffer.detach().clone()) for name, buffer in module.named_buffers(recurse=False)}
    plain = {k: v for k, v in vars(module).items() if isinstance(v, (int, float, bool))}
    try:
        yield
    finally:
        for name, (buffer, value) in buffers.items():
            setattr(module, name, buffer)
            with torch.no_grad():
                buffer.copy_(value)
        vars(module).update(plain)


@probe("rope_precision")
def rope_precision(model: torch.nn.Module, *, context_length: int | None = None, autocast: bool = True) -> Result:
    """The model's RoPE cos/sin tables match their float64 values at every position up to the
    context length: no bf16 positions, frequencies or angles (transformers PR #29285: under
    autocast the RoPE matmul ran in bf16, and the tables drifted with the position).

    The rotary module (a ``*RotaryEmbedding``, holding ``inv_freq``) is called as the model calls
    it, ``rotary(x, position_ids) -> (cos, sin)`` with ``x`` in the model's dtype, at positions 0
    to ``context_length - 1``, and, with ``autocast``, again under ``torch.autocast(<device type>,
    torch.bfloat16)``, as a training step under autocast calls it. The reference is
    ``cos(position * inv_freq)`` (and sin) in float64, with ``inv_freq`` from the config, not from
    the module's buffer (``model.to(torch.bfloat16)`` casts that buffer to bf16): for the default
    rope type recomputed in float64 (``rope_theta``, the head dim); for the others (linear,
    dynamic, llama3, yarn, longrope...) transformers' own
    ``ROPE_INIT_FUNCTIONS[rope_type](config, device)`` on a copy of the config, which computes in
    float32 (for dynamic and longrope at the length each chunk of positions reaches, as the module
    recomputes them). Only where neither can be had (a custom rope type, a config that does not
    give the module's frequencies) is it the module's own, the explanation says why, and a
    half-precision ``inv_freq`` then fails by its dtype alone. The probe fails where the largest
    error exceeds the tolerance, naming the position where it first does.

    The tolerance is the larger of 1e-3 and ``context_length`` times fp32's eps (a correct fp32
    table is off by about position * 2**-26: 1.4e-4 at 8k positions, 2.2e-3 at 128k), plus
    ``2 * context_length`` fp32 eps where the reference comes from transformers' float32
    functions (its frequencies are exact to a few fp32 steps, up to position * 2**-22 in the
    angle; a bf16 ``inv_freq`` is off by up to 2**-9 of each frequency, 0.016 by position 127 in
    a tiny llama3-type Llama), plus half a step of the table's own dtype where it is half
    precision (cos/sin cast to bf16 at the end are off by at most 0.0039 at any position, which
    does not grow).

    Args:
        model: the model; its rotary module is put back as it was.
        context_length: the positions to check; by default ``config.max_position_embeddings``.
        autocast: also check the table computed under bf16 autocast.

    Not applicable for a model without a rotary embedding module, or one that cannot be called
    as a Llama's is.
    """
    check_model(model)
    name, module = _rotary(model)
    config = getattr(hf_model(model) or model, "config", None) or getattr(module, "config", None)
    if context_length is None:
        context_length = getattr(config, "max_position_embeddings", None)
        if not isinstance(context_length, int):
            raise InputError(f"'context_length' must be given: the {type(model).__name__} has no "
                             f"config.max_position_embeddings to read it from (got {describe(context_length)})")
    check_int(context_length, "context_length", 1)
    check_bool(autocast, "autocast")
    reference = _reference_frequencies(module, config)
    scaling = float(getattr(module, "attention_scaling", 1.0) or 1.0)
    eps = torch.finfo(torch.float32).eps
    tolerance = max(ROPE_ATOL, context_length * eps)
    if reference.float32:  # its frequencies are off by a few fp32 steps: up to position * 2**-22 in the angle
        tolerance += 2 * context_length * eps
    device, dtype = model_device(model), parameter_dtype(model)
    x = torch.zeros(1, 1, dtype=dtype, device=device)
    regions: list[tuple[str, AbstractContextManager[Any]]] = [("as called", nullcontext())]
    if autocast:
        regions.append(("under torch.autocast(bfloat16)", torch.autocast(device.type, dtype=torch.bfloat16)))
    with _kept(module):
        drifts = {label: _table_drift(module, reference, scaling, context_length, tolerance, x, region)
                  for label, region in regions}
    return _rope_result(name, drifts, context_length, reference.source, reference.own_dtype, own_reference=reference.own)


def _rope_result(name: str, drifts: dict[str, _Drift], length: int, source: str, inv_dtype: torch.dtype, *,
                 own_reference: bool) -> Result:
    problems: dict[str, list[str]] = {}  # what drifted -> where (as called, under autocast)
    for label, drift in drifts.items():
        if drift.error > drift.bound:
            problem = (f"the RoPE table of {name} ({_name(drift.dtype)}) drifts from its float64 values: off by "
                       f"{drift.error:.3g} at position {drift.position:,}, first above {drift.bound:.2g} at "
                       f"position {drift.first or 0:,}")
            problems.setdefault(problem, []).append(label)
    found = [f"{' and '.join(labels)}, {problem}" for problem, labels in problems.items()]
    if inv_dtype in HALF and (found or own_reference):
        found.append(f"{name}.inv_freq is stored in {_name(inv_dtype)} (model.to({_name(inv_dtype)}) casts the "
                     f"buffer), so every angle position * inv_freq drifts with the position")
    worst = max(drifts.values(), key=lambda drift: drift.error / drift.bound)
    bound = worst.bound
    metrics = {"max_error": worst.error, "position": worst.position, "tolerance": bound, "context_length": length,
               "table_dtype": _name(worst.dtype), "inv_freq_dtype": _name(inv_dtype), "reference": source,
               "errors": {label: drift.error for label, drift in drifts.items()}}
    if found:
        explanation = ("; ".join(found) + f" (reference: {source}); compute inv_freq, the positions and the "
                       f"angle in float32, outside autocast, and cast only cos/sin (transformers PR #29285)")
    else:
        explanation = (f"the RoPE table of {name} at {length:,} positions is within {worst.error:.2g} of its "
                       f"float64 values ({' and '.join(drifts)}; tolerance {bound:.2g}; reference: {source})")
    headroom = headroom_below(worst.error, bound)
    return Result(name="rope_precision", passed=not found, metrics=metrics, threshold=bound,
                  headroom=min(headroom, 0.0) if found else headroom, explanation=explanation)
