"""The preference trainers' step 0: before any update the policy is its own reference.

A DPO-style loss compares the policy's log-probability of each chosen and rejected completion
with the reference model's. At step 0 the two models are the same, so every log-ratio is 0 and
the sigmoid loss is exactly ln 2; where they are not, the first updates chase noise or a
different model, and the loss still falls. The record: policy and reference log-probabilities
differed at iteration 0 (NeMo-Aligner #227); dropout left on in one of the two forwards gave a
0.86-nat gap at step 1 (Human-Agent-Society/reef PR #536).

:func:`preference_at_init` judges one batch of the user's trainer, as its own collator made it
(TRL's ``DataCollatorForPreference``: chosen rows, then rejected rows, a ``completion_mask``):

- the masks: every row supervises a completion, no prompt token and no pad, and each chosen
  row and its rejected row share their prompt;
- the policy's and the reference's summed log-probability of every completion are equal, each
  computed as the trainer computes it (the separate reference model, the PEFT model with its
  adapter off, or the precomputed ``ref_chosen_logps``), in the modes training runs them in;
- each forward is deterministic: two calls give the same log-probabilities (dropout off);
- the trainer's own loss on the batch is ln 2 (the sigmoid loss without label smoothing).

A failure names the row, the two values and the cause it found: dropout on in a forward, the
reference's weights not the policy's (the first parameter that differs), or precomputed
reference log-probabilities of another model.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from lmcheck._finite import locate
from lmcheck._model import model_device
from lmcheck._recording import rng_state, set_rng_state
from lmcheck._validate import describe
from lmcheck.errors import InputError
from lmcheck.results import Result

__all__ = ["PREFERENCE_NOT_APPLICABLE", "Preference", "is_preference_trainer", "preference_at_init"]

NAME = "preference_at_init"
# Summed log-probabilities of one completion, policy against reference, by the dtype the forwards
# compute in (autocast's, else the parameters'). In float32 the same weights and ops give the
# same sums to about 1e-6 on a CPU (7.6e-6 against TRL's precomputed values); dropout or other
# weights move them by 0.1 nat or more. Half precision rounds each token's log-probability to
# about 1e-3, and shapes that differ (another batch's padding) change the rounding.
LOGP_ATOL = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 5e-2}
LN2 = math.log(2)

# the battery's checks that judge a next-token cross-entropy, which a preference loss is not
PREFERENCE_NOT_APPLICABLE = {
    "loss_at_init": "a preference loss is ln 2 at step 0, not ln V: preference_at_init checks it",
    "loss_matches_reference": "the trained loss is the preference loss, not the model's own cross-entropy",
    "overfits": "memorizing a few batches is a next-token criterion; a preference loss has no such target",
}


def is_preference_trainer(trainer: object) -> bool:
    """TRL's ``DPOTrainer`` or a subclass, told by its classes' names (nothing is imported)."""
    return any(c.__name__ == "DPOTrainer" and c.__module__.startswith("trl") for c in type(trainer).__mro__)


class Preference:
    """A preference trainer's step-0 check on its first batch, as the battery calls it: ``judge()``."""

    def __init__(self, trainer: Any, batch: Mapping[str, Any]) -> None:
        self.trainer, self.batch = trainer, batch

    def judge(self) -> Result:
        return preference_at_init(self.trainer, self.batch)

    def accumulation(self, micro_batches: Sequence[Mapping[str, torch.Tensor]], rtol: float | None) -> Result:
        """At the first optimizer step, before it is taken: the user's update against the gradient
        of the trainer's own preference loss over every pair of the step's micro-batches, merged
        into one batch (chosen rows, then rejected rows). The user's gradients are set aside and
        put back, with the random generators and the trainer's logged metrics."""
        return preference_accumulation(self.trainer, micro_batches, rtol)


def preference_at_init(trainer: Any, batch: Mapping[str, Any]) -> Result:
    """Before any update, on ``batch`` (one batch of the trainer's own collator): the masks
    supervise completions only, the policy's log-probabilities equal the reference's, both
    forwards are deterministic, and the trainer's own loss is ln 2. See the module's docstring.
    Nothing is changed: the models' modes, the random generators and the trainer's logged
    metrics are put back."""
    if not is_preference_trainer(trainer):
        raise InputError(f"'trainer' must be TRL's DPOTrainer or a subclass (got {describe(trainer)})")
    if not isinstance(batch, Mapping) or not all(isinstance(batch.get(k), torch.Tensor)
                                                 for k in ("input_ids", "attention_mask", "completion_mask")):
        raise InputError(f"'batch' must be a preference batch with tensors 'input_ids', 'attention_mask' and "
                         f"'completion_mask', as TRL's DataCollatorForPreference makes (got {describe(batch)})")
    problem = _mask_problem(batch)
    if problem is not None:
        return Result(name=NAME, passed=False, metrics={}, explanation=problem)
    model = trainer.model
    device = model_device(model)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    state, metrics = rng_state(), copy.deepcopy(getattr(trainer, "_metrics", None))
    modes = {m: m.training for m in (model, getattr(trainer, "ref_model", None)) if isinstance(m, torch.nn.Module)}
    # the trainer's mixed precision: accelerate runs the prepared policy (and the reference, prepared
    # at construction) under autocast; the policy is not prepared before train(), so it is put there
    autocast = getattr(getattr(trainer, "accelerator", None), "autocast", None)
    try:
        model.train()  # the mode the trainer's training step runs the policy in
        with autocast() if callable(autocast) else contextlib.nullcontext():
            return _judged(trainer, batch)
    finally:
        for module, training in modes.items():
            module.train(training)
        set_rng_state(state)
        if metrics is not None:
            trainer._metrics = metrics


def _judged(trainer: Any, batch: dict[str, Any]) -> Result:
    model = trainer.model
    policy = _logps(model, batch)
    reference, how = _reference(trainer, batch)
    if isinstance(reference, str):
        return Result.not_applicable(NAME, reference)
    tol = LOGP_ATOL.get(_compute_dtype(trainer), LOGP_ATOL[torch.float32])
    # the loss moves from ln 2 by at most beta times the largest log-ratio gap
    loss_tol = max(1e-5, float(getattr(trainer, "beta", 1.0)) * tol)
    pairs = policy.shape[0] // 2
    for values, what in ((policy, "the policy's log-probabilities"), (reference, "the reference's log-probabilities")):
        found = locate(values, ("row",))
        if found is not None:
            return Result(name=NAME, passed=False, metrics={}, explanation=f"{what} at step 0 are not finite: {found}")
    gap = (policy - reference).abs()
    worst = int(gap.argmax())
    with torch.no_grad(), _quiet_warnings():
        loss = float(trainer.compute_loss(model, batch))
    sigmoid = list(getattr(trainer, "loss_types", ["sigmoid"])) == ["sigmoid"] and \
        not getattr(trainer, "label_smoothing", 0.0)
    metrics: dict[str, Any] = {"pairs": pairs, "max_logp_gap": float(gap.max()), "loss": loss, "reference": how,
                               "tolerance": tol}
    problems = []
    if float(gap.max()) > tol:
        side = "chosen" if worst < pairs else "rejected"
        problems.append(f"the policy's and the reference's log-probabilities differ before any update: "
                        f"{float(gap.max()):.4g} nats at pair {worst % pairs} ({side}: policy "
                        f"{float(policy[worst]):.4f}, reference {float(reference[worst]):.4f}; tolerance {tol:g}); "
                        f"{_cause(trainer, batch, policy, reference)}")
    if not math.isfinite(loss):
        problems.append(f"the trainer's loss at step 0 is {loss}")
    elif sigmoid and abs(loss - LN2) > loss_tol:
        problems.append(f"the trainer's loss at step 0 is {loss:.6f}, not ln 2 = {LN2:.6f} (tolerance {loss_tol:.2g}): "
                        f"with the reference equal to the policy every log-ratio is 0")
    if problems:
        return Result(name=NAME, passed=False, metrics=metrics, threshold=tol,
                      explanation="; ".join(problems) + " (NeMo-Aligner #227, reef PR #536)")
    said = f"loss {loss:.6f} = ln 2" if sigmoid else f"loss {loss:.6f} (not the sigmoid loss: not compared with ln 2)"
    return Result(name=NAME, passed=True, metrics=metrics, threshold=tol,
                  headroom=None if gap.max() == 0 else float(1 - gap.max() / tol),
                  explanation=f"at step 0 the policy's and the reference's ({how}) log-probabilities of "
                              f"{pairs} chosen and rejected completions agree within {float(gap.max()):.2g} nats "
                              f"(tolerance {tol:g}), both forwards deterministic, {said}; the masks supervise "
                              f"completions only and each pair shares its prompt")


def _compute_dtype(trainer: Any) -> torch.dtype:
    """The dtype the trainer's forwards compute in: its autocast's, else its parameters'."""
    arguments = getattr(trainer, "args", None)
    if getattr(arguments, "bf16", False):
        return torch.bfloat16
    if getattr(arguments, "fp16", False):
        return torch.float16
    return next((p.dtype for p in trainer.model.parameters() if p.is_floating_point()), torch.float32)


def _logps(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each row's summed log-probability of its completion tokens, in float32, as the model runs now."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tokens = batch["input_ids"][:, 1:]
    per_token = logp.gather(-1, tokens[..., None]).squeeze(-1)
    return (per_token * batch["completion_mask"][:, 1:].float()).sum(dim=1)


def _reference(trainer: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor | str, str]:
    """The reference's log-probabilities as the trainer gets them, and from where; or why not."""
    if getattr(trainer, "precompute_ref_logps", False):
        if not all(isinstance(batch.get(k), torch.Tensor) for k in ("ref_chosen_logps", "ref_rejected_logps")):
            return "the trainer precomputes the reference's log-probabilities but the batch holds none", ""
        return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float(), "precomputed"
    reference = getattr(trainer, "ref_model", None)
    if isinstance(reference, torch.nn.Module):
        return _logps(reference, batch), "a separate reference model"
    model = trainer.model
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        with _adapter_off(model):
            return _logps(model, batch), "the PEFT model with its adapter off"
    return "the trainer has no reference model, no PEFT adapter to turn off and no precomputed log-probabilities", ""


@contextlib.contextmanager
def _adapter_off(model: Any) -> Iterator[None]:
    """The PEFT model as TRL's reference: the adapter named ``ref`` where there is one, else none."""
    from trl.trainer.utils import use_adapter

    with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
        yield


def _cause(trainer: Any, batch: Mapping[str, torch.Tensor], policy: torch.Tensor, reference: torch.Tensor) -> str:
    """What makes the two differ: a random forward (dropout), other weights, or precomputed values."""
    model = trainer.model
    ref_model = getattr(trainer, "ref_model", None)
    random = []
    if float((_logps(model, batch) - policy).abs().max()) > 0:
        random.append(f"the policy's forward ({_dropout(model)})")
    if isinstance(ref_model, torch.nn.Module) and not getattr(trainer, "precompute_ref_logps", False) and \
            float((_logps(ref_model, batch) - reference).abs().max()) > 0:
        mode = "in train mode" if ref_model.training else "in eval mode"
        random.append(f"the reference's forward ({mode}; {_dropout(ref_model)})")
    if random:
        return (f"the cause: {' and '.join(random)} gives other values each call: dropout is on; set "
                f"disable_dropout=True, put the reference in eval mode, and set the config's attention dropout to 0")
    if getattr(trainer, "precompute_ref_logps", False):
        return ("the cause: the precomputed reference log-probabilities are not the policy's at step 0: they "
                "were computed by another model, or on other tokens")
    if isinstance(ref_model, torch.nn.Module):
        differs = _first_difference(model, ref_model)
        if differs:
            return f"the cause: the reference's weights are not the policy's ({differs}); load both from one checkpoint"
    return "no cause found: both forwards are deterministic and the weights are the same"


def _dropout(model: torch.nn.Module) -> str:
    """The dropout a forward in the model's present modes applies: active ``nn.Dropout`` modules,
    and modules whose float ``*dropout*`` attribute is above 0 (transformers' attention dropout,
    which TRL's ``disable_dropout`` leaves as it is)."""
    active = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            active.append(f"{name} (p={module.p})")
        else:
            rates = [f"{k}={v}" for k, v in vars(module).items() if "dropout" in k and isinstance(v, float) and v > 0]
            if rates:
                active.append(f"{name} ({', '.join(rates)})")
    return f"{len(active)} module(s) apply dropout, first {active[0]}" if active else "no dropout module found"


def _first_difference(model: torch.nn.Module, other: torch.nn.Module) -> str:
    mine = dict(model.named_parameters())
    for name, parameter in other.named_parameters():
        own = mine.get(name)
        if own is None or own.shape != parameter.shape:
            return f"{name} has no counterpart of its shape in the policy"
        if not torch.equal(own.detach().to(parameter.device), parameter.detach()):
            gap = float((own.detach().float().to(parameter.device) - parameter.detach().float()).abs().max())
            return f"first {name}, by up to {gap:.3g}"
    return ""


def _mask_problem(batch: Mapping[str, torch.Tensor]) -> str | None:
    """The first row whose completion mask supervises a prompt token, a pad or nothing, or whose
    pair does not share its prompt; None where every row is right."""
    ids, real, completion = batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"].bool()
    if ids.dim() != 2 or ids.shape[0] % 2 or real.shape != ids.shape or completion.shape != ids.shape:
        return (f"the batch is not chosen rows then rejected rows of one width: input_ids {tuple(ids.shape)}, "
                f"attention_mask {tuple(real.shape)}, completion_mask {tuple(completion.shape)}")
    pairs = ids.shape[0] // 2
    padded = completion & ~real
    if padded.any():
        row = int(padded.nonzero()[0, 0])
        return f"row {row} supervises padding: its completion_mask is 1 where attention_mask is 0"
    prompts = []
    for row in range(ids.shape[0]):
        marked = completion[row].nonzero().flatten()
        first_real = int(real[row].float().argmax())
        if len(marked) == 0:
            return f"row {row} supervises no completion token: its completion_mask is all 0"
        start = int(marked[0])
        if start <= first_real:
            return (f"row {row} supervises its prompt: its completion_mask starts at its first token (position "
                    f"{start}), so the prompt is trained as a completion; mask the prompt out")
        if int(marked[-1]) - start + 1 != len(marked):
            return f"row {row}'s completion_mask is not one span: it has gaps between positions {start} and {int(marked[-1])}"
        prompts.append(ids[row, first_real:start].tolist())
    for pair in range(pairs):
        if prompts[pair] != prompts[pair + pairs]:
            return (f"pair {pair}: the chosen row's prompt (tokens before its completion_mask) is not the rejected "
                    f"row's ({len(prompts[pair])} against {len(prompts[pair + pairs])} tokens): the mask starts at "
                    f"another place in one of them, or the rows are not paired")
    return None


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield



# the relative L2 error allowed between the update and the merged batch's gradient: as the
# cross-entropy accumulation check's (lmcheck.setup.gradients.GRADIENT_RTOL)
PAIR_RTOL = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def preference_accumulation(trainer: Any, micro_batches: Sequence[Mapping[str, torch.Tensor]],
                            rtol: float | None) -> Result:
    """The update over k micro-batches of pairs equals the gradient of the preference loss's
    mean over all their pairs (the trainer's own ``compute_loss`` on the merged batch): a loss
    not divided by k, or divided by it twice, moves the update by a factor of k."""
    name = "accumulation"
    batches = [b for b in micro_batches if isinstance(b.get("completion_mask"), torch.Tensor)]
    if not batches:
        return Result.not_applicable(name, "no micro-batch of the first step holds a completion_mask")
    model = trainer.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    parameters = [p for n, p in model.named_parameters() if p.requires_grad]
    user = [p.grad for p in parameters]
    state, metrics = rng_state(), copy.deepcopy(getattr(trainer, "_metrics", None))
    merged = _merged(batches, model_device(model))
    autocast = getattr(getattr(trainer, "accelerator", None), "autocast", None)
    training = model.training
    try:
        for parameter in parameters:
            parameter.grad = None
        model.train()
        with autocast() if callable(autocast) else contextlib.nullcontext(), _quiet_warnings():
            loss = trainer.compute_loss(model, merged)
        if not bool(torch.isfinite(loss)):
            return Result(name=name, passed=False, metrics={},
                          explanation=f"the preference loss of the first step's merged micro-batches is {float(loss)}")
        loss.backward()
        reference = [p.grad for p in parameters]
        uu = uc = cc = 0.0
        for parameter_name, mine, theirs in zip(names, user, reference, strict=True):
            u = mine.detach().double() if mine is not None else None
            c = theirs.detach().double() if theirs is not None else None
            if u is not None:
                found = locate(u, ("index",) * u.dim())
                if found is not None:
                    return Result(name=name, passed=False, metrics={},
                                  explanation=f"the gradient at the user's first optimizer step is not finite: "
                                              f"{parameter_name} {found}")
                uu += float((u * u).sum())
            if c is not None:
                cc += float((c * c).sum())
            if u is not None and c is not None:
                uc += float((u * c).sum())
    finally:
        for parameter, grad in zip(parameters, user, strict=True):
            parameter.grad = grad
        model.train(training)
        set_rng_state(state)
        if metrics is not None:
            trainer._metrics = metrics
    if cc == 0:
        return Result.not_applicable(name, "the gradient of the preference loss over the first step's pairs is "
                                     "exactly zero, so there is no update to compare the user's with")
    tol = rtol if rtol is not None else PAIR_RTOL.get(_compute_dtype(trainer), PAIR_RTOL[torch.float32])
    error = math.sqrt(max(uu - 2 * uc + cc, 0.0) / cc)
    scale = uc / cc
    k, pairs = len(batches), int(merged["input_ids"].shape[0] // 2)
    measured = {"micro_batches": k, "pairs": pairs, "relative_error": error, "scale": scale,
                "reference_loss": float(loss), "reference_norm": math.sqrt(cc), "user_norm": math.sqrt(uu)}
    counted = f"{k} micro-batch{'es' if k > 1 else ''} of {pairs} pairs in all"
    if error <= tol:
        return Result(name=name, passed=True, metrics=measured, threshold=tol, headroom=1 - error / tol,
                      explanation=f"the update over {counted} equals the gradient of the mean preference loss over "
                                  f"all of them (the trainer's own compute_loss on the merged batch): relative error "
                                  f"{error:.2e}, within {tol:g}")
    if k > 1 and abs(scale - k) < 0.1 * k:
        cause = f"the update is {scale:.3g} times it: the loss is not divided by the {k} micro-batches"
    elif k > 1 and abs(scale - 1 / k) < 0.1 / k:
        cause = f"the update is {scale:.3g} times it: the loss is divided by the {k} micro-batches twice"
    else:
        cause = (f"the update is {scale:.3g} times it with a residual beyond a scale: the micro-batches are weighted "
                 f"unequally, or the loss the update used is not the trainer's compute_loss")
    return Result(name=name, passed=False, metrics=measured, threshold=tol,
                  explanation=f"the update over {counted} is not the gradient of the mean preference loss over all of "
                              f"them: relative error {error:.3g}, above {tol:g}; {cause}")


def _merged(batches: Sequence[Mapping[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """Micro-batches of pairs as one batch: every chosen row, then every rejected row, right-padded
    to one width (pads: attention and completion mask 0)."""
    width = max(int(b["input_ids"].shape[1]) for b in batches)
    keys = ("input_ids", "attention_mask", "completion_mask")
    halves: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for part in (0, 1):
        for batch in batches:
            for key in keys:
                value = batch[key]
                rows = value.chunk(2, dim=0)[part]
                halves[key].append(torch.nn.functional.pad(rows, (0, width - value.shape[1]), value=0))
    merged = {k: torch.cat(v).to(device) for k, v in halves.items()}
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if all(isinstance(b.get(key), torch.Tensor) for b in batches):
            merged[key] = torch.cat([b[key] for b in batches]).to(device)
    return merged
