"""Probes of a training setup that take the model and a batch: is the loss sane at init, do
gradients reach every parameter, does one optimizer step change them, is a batch fit for causal-LM
training, can the model continue the chunks it was trained on verbatim.

The practice behind them (Karpathy, "A Recipe for Training Neural Networks"): before paying for a
full run, convince yourself that the setup works by overfitting a few chunks. Probes that judge a
run from its recorded loss alone live in ``lmcheck.curves``. The loops in ``lmcheck.loops.pretraining``
use :func:`memorized_fraction` to stop early. None of them prints, asserts or raises on a failed
check.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from lmcheck._finite import in_context, locate, non_finite_result, probe, require_finite
from lmcheck._model import (
    IGNORE_INDEX,
    check_causal_lm,
    eval_mode,
    has_own_loss,
    hf_model,
    input_vocabulary,
    mean_loss,
    model_device,
    model_forward,
    output_size,
    own_loss,
    reference_loss,
    training_loss,
)
from lmcheck._recording import GradientSeen, Snapshot
from lmcheck._validate import (
    as_ids,
    check_callable,
    check_fraction,
    check_int,
    check_model,
    check_names,
    check_number,
    check_tensor_data,
    check_tokenizer,
    describe,
)
from lmcheck.decoding import greedy_decode
from lmcheck.errors import InputError, NotApplicableError
from lmcheck.results import Result, headroom_above, headroom_below

__all__ = [
    "causal_batch",
    "check_memorization_lengths",
    "gradient_flow",
    "loss_at_init",
    "loss_matches_reference",
    "memorized_fraction",
    "verbatim_rows",
    "memorizes",
    "params_update",
]

Batch = Mapping[str, torch.Tensor] | torch.Tensor
Rows = Sequence[Sequence[int]] | Sequence[str] | torch.Tensor | Any  # Any: a datasets.Dataset
LATER_STEPS = 3  # optimizer steps in which a gated parameter's gradient may arrive (doge, gemma3n, xLSTM: 1)
_ROUTED_BATCH = (8, 64)  # the random batch an unreached expert gets (a sweep saw PhiMoE's router reached at 8 x 64, not 2 x 16)


# ---------------------------------------------------------------- probes that take a model


@probe("loss_at_init")
def loss_at_init(
    model: torch.nn.Module, input_ids: Rows, *, tolerance: float = 0.5, batch_size: int = 16,
) -> Result:
    """A freshly initialised model's loss is close to ln(V): it predicts every token equally.

    A logit standard deviation s adds about s**2/2 nats, so the default ``tolerance=0.5`` allows
    logits up to about unit scale. Far above means a badly scaled initialisation; far below
    means the model is not at initialisation or sees the answers.
    """
    check_int(batch_size, "batch_size", 1)
    check_number(tolerance, "tolerance", low=0)
    check_model(model)
    vocab = output_size(model)
    ids = _as_ids(input_ids, "input_ids", vocab=min(vocab, input_vocabulary(model) or vocab))
    expected = math.log(vocab)
    rows = ({"input_ids": part, "labels": part} for part in ids.split(batch_size))
    loss = mean_loss(model, rows)  # NonFiniteError names the rows
    difference = loss - expected
    passed = abs(difference) <= tolerance
    explanation = f"loss {loss:.3f} at init, ln({vocab:,}) = {expected:.3f}: off by {difference:+.3f} (allowed ±{tolerance})"
    if not passed:
        explanation += (": the initial logits are far from uniform; check the initialisation scale "
                        "and the output layer" if difference > 0 else
                        ": lower than chance; the model is not at init or sees the tokens it predicts")
    return Result(name="loss_at_init", passed=passed,
                  metrics={"loss": loss, "ln_vocab": expected, "difference": difference},
                  threshold=tolerance, headroom=headroom_below(abs(difference), tolerance),
                  explanation=explanation)


@probe("memorizes")
def memorizes(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, chunks: Rows, *,
    prefix_length: int = 32, continuation_length: int = 32, min_verbatim_rate: float = 1.0,
    batch_size: int = 64, name: str = "memorizes",
) -> Result:
    """Given the first ``prefix_length`` tokens of each chunk, greedy decoding continues it verbatim.

    Pythia's memorization test (32-token prefix, 32 greedy tokens); ``chunks`` may be token-id
    rows, a dataset with ``input_ids``, or texts (the tutorial's form: the start of a training
    article). Reports the verbatim rate (share of chunks whose whole continuation matches) and
    the per-token match rate; passes when the verbatim rate reaches ``min_verbatim_rate``.
    """
    check_causal_lm(model)
    if tokenizer is not None:
        check_tokenizer(tokenizer)
    check_int(prefix_length, "prefix_length", 1)
    check_int(continuation_length, "continuation_length", 1)
    check_int(batch_size, "batch_size", 1)
    check_fraction(min_verbatim_rate, "min_verbatim_rate")
    ids = _as_ids(chunks, "chunks", tokenizer=tokenizer, min_length=1, vocab=input_vocabulary(model),
                  text_length=prefix_length + continuation_length)
    check_memorization_lengths(prefix_length, continuation_length, ids.shape[1], chunks="chunks")
    ids = ids[:, : prefix_length + continuation_length].to(model_device(model))
    prefix, expected = ids[:, :prefix_length], ids[:, prefix_length:]
    parts = []
    for start in range(0, prefix.shape[0], batch_size):
        with in_context(f"chunks {start} to {min(start + batch_size, prefix.shape[0]) - 1} (row 0 = chunk {start})"):
            parts.append(_greedy(model, prefix[start:start + batch_size], continuation_length))
    got = torch.cat(parts)  # (N, n)
    matches = got == expected  # (N, n)
    verbatim = matches.all(dim=1)
    rate, token_rate = verbatim.float().mean().item(), matches.float().mean().item()
    rows: list[dict[str, Any]] = []
    for index in range(ids.shape[0]):
        row: dict[str, Any] = {"chunk": index, "verbatim": bool(verbatim[index]),
                               "matched_tokens": int(matches[index].sum())}
        if not verbatim[index]:
            row["first_mismatch"] = int((~matches[index]).nonzero()[0])
        if tokenizer is not None and (index == 0 or (not verbatim[index] and len(rows) < 200)):
            row.update(prompt=tokenizer.decode(prefix[index]), expected=tokenizer.decode(expected[index]),
                       got=tokenizer.decode(got[index]))
        rows.append(row)
    passed = rate >= min_verbatim_rate
    explanation = (f"{int(verbatim.sum())} of {len(rows)} chunks continue verbatim "
                   f"({prefix_length}-token prefix, {continuation_length} greedy tokens); "
                   f"per-token match {token_rate:.1%}")
    failure = next((r for r in rows if not r["verbatim"]), None)
    if failure is not None:
        where = f"; chunk {failure['chunk']} first differs at continuation token {failure['first_mismatch']}"
        if "expected" in failure:
            at = failure["first_mismatch"]
            where += (f": expected {tokenizer.decode(expected[failure['chunk'], at]) if tokenizer else ''!r}, "
                      f"got {tokenizer.decode(got[failure['chunk'], at]) if tokenizer else ''!r}")
        explanation += where
    return Result(name=name, passed=passed,
                  metrics={"verbatim_rate": rate, "token_match_rate": token_rate, "chunks": len(rows),
                   "prefix_length": prefix_length, "continuation_length": continuation_length},
                  threshold=min_verbatim_rate, headroom=headroom_above(rate, min_verbatim_rate),
                  explanation=explanation, details=tuple(rows))


@probe("gradient_flow")
def gradient_flow(model: torch.nn.Module, batch: Batch, *, expect_frozen: Collection[str] = (),
                  steps: int = LATER_STEPS) -> Result:
    """Every trainable parameter gets a finite, non-zero gradient: at the first backward pass,
    or, behind a zero-initialised gate, within ``steps`` optimizer steps.

    Parameters named in ``expect_frozen`` must have ``requires_grad=False`` (so they get none);
    any other frozen parameter fails the check, since pretraining trains everything. The
    model's ``.grad`` fields are left untouched (gradients come from ``torch.autograd.grad``).

    A gradient that is exactly zero (or absent) at the first pass is judged over time, as
    training would meet it (:func:`_later_gradients`): a parameter behind a gate initialised to
    zero (doge's ``dt_proj``, LoRA's ``lora_A`` behind ``lora_B``) gets one once the gate has
    moved, after an SGD step on the same batch (run on the model, put back afterwards); an
    expert or router of a mixture of experts that this batch does not reach gets one from a
    larger batch of random ids. Each case passes and is named; a parameter that gets none in
    every case (detached, outside the loss's graph) fails.
    """
    names = _parameters(model)
    batch = _batch(batch, model)
    check_int(steps, "steps", 0, 100)
    problems = _frozen_problems(names, check_names(expect_frozen, "expect_frozen"), model)
    trainable = [(n, p) for n, p in names.items() if p.requires_grad]
    grads: dict[str, torch.Tensor | None] = {}
    if trainable:
        loss = _loss(model, batch)  # NonFiniteError if the loss is NaN or Inf
        found = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
        grads = dict(zip([n for n, _ in trainable], found, strict=True))
    seen = {n: GradientSeen.of(g) for n, g in grads.items()}
    silent = [n for n, s in seen.items() if not s.nonzero]
    later = _later_gradients(model, batch, silent, steps) if silent else Later()
    return gradient_flow_result(model, seen, later, problems=problems, frozen=len(names) - len(trainable))


def gradient_flow_result(model: torch.nn.Module, grads: Mapping[str, GradientSeen], later: Later, *,
                         problems: Sequence[str] = (), frozen: int = 0, within: str = "",
                         **metrics: Any) -> Result:
    """The judgement of ``gradient_flow``, the probe's and the setup checks' alike.

    Args:
        model: the model (for the checkpointing hint).
        grads: what each trainable parameter's gradient was at the first backward pass.
        later: when the gradients that were zero or absent there arrived, and the gates that held them.
        problems: mistakes found before the pass (parameters frozen that should train).
        frozen: how many parameters are frozen as expected.
        within: where the gradients were seen (``"within the first 8 optimizer steps"``).
        metrics: more metrics for the result.
    """
    non_finite = [f"{n} has a non-finite gradient: {s.non_finite}" for n, s in grads.items() if s.non_finite]
    silent = [n for n, s in grads.items() if not s.nonzero]
    missing = [f"{n} gets no gradient (it is not in the loss's graph)" if not grads[n].present
               else f"{n} has an all-zero gradient" for n in silent if n not in later.found]
    problems = [*non_finite, *problems, *missing]
    rows = [{"parameter": n, "grad_norm": s.norm, **({"first_gradient": later.found[n]} if n in later.found else {})}
            for n, s in grads.items()]
    metrics = {"trainable": len(grads), "problems": len(problems), "zero_at_first_step": len(silent),
               "gradient_later": len(later.found), **metrics}
    where = f" {within}" if within else ""
    if not problems:
        explanation = (f"all {len(grads)} trainable parameters get finite, non-zero gradients{where}"
                       + (f"; {frozen} frozen as expected" if frozen else "") + later.said())
        return Result(name="gradient_flow", passed=True, metrics=metrics, explanation=explanation, details=tuple(rows))
    explanation = (f"{len(problems)} problem(s){where}: " + "; ".join(problems[:5])
                   + (f"; {len(problems) - 5} more" if len(problems) > 5 else ""))
    if non_finite:
        explanation += ". A NaN or Inf gradient comes from a non-finite loss or weight, or an overflow in half precision"
    if missing and _checkpointed(model):
        explanation += (". Reentrant gradient checkpointing with frozen embeddings leaves the checkpointed blocks "
                        "without gradients (transformers #21381): use use_reentrant=False or "
                        "model.enable_input_require_grads()")
    elif missing:
        explanation += (". The parameter is not used by the forward, or its path to the loss is cut (a detach(), "
                        "a torch.no_grad() block, an output that is not used)")
    explanation += later.said()
    if non_finite:
        return non_finite_result("gradient_flow", explanation, details=rows, **metrics)
    return Result(name="gradient_flow", passed=False, metrics=metrics, explanation=explanation, details=tuple(rows))


def _checkpointed(model: torch.nn.Module) -> bool:
    """Whether gradient checkpointing is on anywhere in the model (transformers' flag)."""
    if bool(getattr(model, "is_gradient_checkpointing", False)):
        return True
    return any(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules())


def zero_weights(parameters: Mapping[str, torch.Tensor], trainable: Collection[str]) -> list[str]:
    """The likely gates: trainable weights that are all zero (zero biases are everywhere and gate nothing)."""
    return [n for n, p in parameters.items() if n in trainable and p.numel() > 1
            and not n.endswith("bias") and not bool(p.detach().any())]


@probe("params_update")
def params_update(
    model: torch.nn.Module, batch: Batch, *,
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None,
    lr: float = 1e-3, expect_frozen: Collection[str] = (), steps: int = LATER_STEPS,
) -> Result:
    """One optimizer step changes every trainable parameter (and no frozen one); a parameter
    whose gradient is zero at that step (behind a zero-initialised gate, or an expert this batch
    does not reach) must change within ``steps`` more, or on a larger batch of random ids.

    The steps run on ``model`` itself, and its parameters, buffers and ``.grad`` fields are put
    back afterwards, so ``model`` is left as it was. (A deep copy would not do: the functions of
    a model wrapped by :func:`lmcheck.adapt` may call the original module.) ``optimizer`` builds
    the optimizer from the model (default ``AdamW(trainable parameters, lr=lr,
    weight_decay=0)``), so a user can pass their own:
    ``optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1)``. A parameter that had a
    gradient and still did not change fails at once: the optimizer does not hold it, or its
    learning rate is 0.
    """
    _parameters(model)
    batch = _batch(batch, model)
    check_number(lr, "lr", low=0, high=1e6)
    check_int(steps, "steps", 0, 100)
    expect_frozen = check_names(expect_frozen, "expect_frozen")
    if optimizer is not None:
        check_callable(optimizer, "optimizer", "a function from the model to a torch.optim.Optimizer")
    names = _parameters(model)
    problems = _frozen_problems(names, expect_frozen, model)
    trainable = [p for p in names.values() if p.requires_grad]
    snapshot = Snapshot(model)  # the step runs on the model itself: put back whatever happens
    try:
        before = {n: snapshot.state[n] for n in names}
        build = optimizer or (lambda _: torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0))
        step = build(model)
        if not isinstance(step, torch.optim.Optimizer):
            raise InputError(f"'optimizer' must return a torch.optim.Optimizer (got {describe(step)})")
        step.zero_grad(set_to_none=True)
        _loss(model, batch).backward()  # NonFiniteError if the loss is NaN or Inf
        had_gradient = set()
        for parameter_name, parameter in names.items():
            if parameter.grad is not None:
                require_finite(parameter.grad, f"the gradients of {parameter_name}", ("index",) * parameter.dim())
                if bool(parameter.grad.any()):
                    had_gradient.add(parameter_name)
        step.step()
        changed = {}
        for parameter_name, parameter in names.items():  # compared in place: no copy of the model
            # NaN differs from every number, so a parameter that became NaN "changed": refuse it first
            require_finite(parameter.detach(), f"after one optimizer step, the values of {parameter_name}",
                           ("index",) * parameter.dim())
            changed[parameter_name] = not torch.equal(before[parameter_name].to(parameter.device), parameter.detach())
    finally:
        snapshot.restore()
    trainable_names = [n for n, p in names.items() if p.requires_grad]
    # a parameter whose gradient was zero at the step is judged over time, as gradient_flow does
    waiting = [n for n in trainable_names if not changed[n] and n not in had_gradient]
    later = _later_gradients(model, batch, waiting, steps) if waiting else Later()
    return params_update_result(changed, trainable_names, later, after_text="after one optimizer step",
                                had_gradient=had_gradient, problems=problems)


def params_update_result(changed: Mapping[str, bool], trainable: Sequence[str], later: Later, *, after_text: str,
                         had_gradient: Collection[str] | None = None, problems: Sequence[str] = (),
                         non_finite: Sequence[str] = ()) -> Result:
    """The judgement of ``params_update``, the probe's and the setup checks' alike.

    Args:
        changed: whether each parameter changed.
        trainable: the parameters that require a gradient.
        later: when the gradients of the ones that had none at the step arrived.
        after_text: what the parameters went through (``"after one optimizer step"``).
        had_gradient: the parameters that had a non-zero gradient at the step, where known.
        problems: mistakes found before the step (parameters frozen that should train).
        non_finite: parameters that hold NaN or Inf afterwards, said where.
    """
    unchanged = [n for n in trainable if not changed[n]]
    stuck = [n for n in unchanged if n not in later.found]
    problems = [f"{n} is frozen (requires_grad=False) but changed: weight decay or an optimizer step reaches it"
                for n, moved in changed.items() if moved and n not in trainable] + list(problems)
    if stuck:
        why = ("learning rate 0, or a parameter missing from the optimizer: it had a gradient"
               if had_gradient is not None and all(n in had_gradient for n in stuck) else
               "learning rate 0, a parameter missing from the optimizer, or no gradient")
        problems.insert(0, f"{len(stuck)} of {len(trainable)} trainable parameters did not change {after_text}: "
                        + ", ".join(stuck[:5]) + (" ..." if len(stuck) > 5 else "") + f" ({why})")
    metrics = {"trainable": len(trainable), "unchanged": len(stuck), "unchanged_at_first_step": len(unchanged),
               "gradient_later": len(later.found)}
    rows = [{"parameter": n, "trainable": n in trainable, "changed": moved,
             **({"gradient_from": later.found[n]} if n in later.found else {})} for n, moved in changed.items()]
    if non_finite:
        return non_finite_result("params_update", "; ".join(non_finite[:4]), details=rows, **metrics)
    frozen = len(changed) - len(trainable)
    explanation = (f"all {len(trainable)} trainable parameters changed {after_text}"
                   + (f" ({len(later.found)} of them once their gradient arrives:{later.said()[1:]})"
                      if later.found else "") + (f", and none of the {frozen} frozen ones" if frozen else "")
                   if not problems else "; ".join(problems[:5]))
    return Result(name="params_update", passed=not problems, metrics=metrics, explanation=explanation,
                  details=tuple(rows))


@dataclass
class Later:
    """What :func:`_later_gradients` found: parameter -> when its gradient arrived (``"step 2"``,
    ``"a random 8 x 64 batch"``), and the gates that held them (parameters that are all zero)."""

    found: dict[str, str] = field(default_factory=dict)
    gates: list[str] = field(default_factory=list)

    def said(self) -> str:
        """A clause naming them; empty when there are none."""
        if not self.found:
            return ""
        stepped = [n for n, when in self.found.items() if when.startswith("step")]
        batch = [n for n, when in self.found.items() if not when.startswith("step")]
        parts = []
        if stepped:
            behind = (f"behind zero-initialised weights ({_listed(self.gates, 3)}) that training moves first"
                      if self.gates else
                      "no weight starts at zero: a router or branch that is off at the first step")
            parts.append(f"{len(stepped)} have an exactly zero gradient at the first step and a non-zero "
                         f"one by {self.found[stepped[0]]} ({_listed(stepped, 3)}): {behind}")
        if batch:
            parts.append(f"{len(batch)} get none from this batch and do from {self.found[batch[0]]} "
                         f"(experts or a router of a mixture of experts that this batch does not reach; "
                         f"the batch's shape, not the model: {_listed(batch, 3)})")
        return "; " + "; ".join(parts)


def _listed(names: Sequence[str], most: int) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _later_gradients(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], names: Sequence[str],
                     steps: int) -> Later:
    """When the parameters ``names``, whose gradient was zero or absent at the first pass, get a
    non-zero one: after each of ``steps`` SGD steps on ``batch`` (a gate initialised to zero
    opens at the first), else from a larger batch of random ids at the original weights (an
    expert the batch does not reach). Runs on the model; everything is put back."""
    later = Later()
    parameters = dict(model.named_parameters())
    wanted = [n for n in names if n in parameters]
    # the likely gates: weights that start all zero (zero biases are everywhere and gate nothing)
    later.gates = zero_weights(parameters, {n for n, p in parameters.items() if p.requires_grad})
    snapshot = Snapshot(model)
    try:
        # plain SGD: any step moves a gate whose gradient is non-zero, and it holds no state. AdamW's
        # two moments cost two more models' worth: on GPT-2 124M (2-core EPYC) this probe peaked at
        # +3.0 GiB with AdamW, +2.1 GiB with SGD, against +2.0 GiB for one AdamW step of the user's
        optimizer = torch.optim.SGD([p for p in parameters.values() if p.requires_grad], lr=1e-3)
        # one backward pass per step: step 1's gradient is the first pass's (known zero for these);
        # each later one is read before the step it feeds is taken
        for step in range(1, steps + 2):
            optimizer.zero_grad(set_to_none=True)
            _loss(model, batch).backward()
            if step > 1:
                for name in wanted:
                    grad = parameters[name].grad
                    if name not in later.found and grad is not None and bool(grad.any()):
                        later.found[name] = f"step {step}"
                if len(later.found) == len(wanted):
                    break
            if step <= steps:
                optimizer.step()
        snapshot.restore()
        waiting = [n for n in wanted if n not in later.found]
        if waiting:
            vocab = input_vocabulary(model) or output_size(model)
            rows, length = _ROUTED_BATCH
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(vocab, (rows, length), generator=generator).to(model_device(model))
            loss = _loss(model, {"input_ids": ids, "labels": ids})
            grads = torch.autograd.grad(loss, [parameters[n] for n in waiting], allow_unused=True)
            for name, grad in zip(waiting, grads, strict=True):
                if grad is not None and bool(grad.any()):
                    later.found[name] = f"a random {rows} x {length} batch"
    finally:
        snapshot.restore()
    return later


@probe("loss_matches_reference")
def loss_matches_reference(
    model: torch.nn.Module, batch: Batch, *, rtol: float = 1e-3, atol: float = 1e-4,
) -> Result:
    """The model's own loss equals shifted cross-entropy over its own logits.

    The reference: position t predicts ``labels[t + 1]``, labels -100 are ignored, the mean is
    over the supervised tokens. The explanation names the likely cause of a mismatch by also
    computing the loss without the shift (transformers #27517), with the labels shifted twice
    (#47395), and summed over the supervised tokens but divided by another count (#46204). Runs
    in eval mode (dropout off), so the two sides see the same network. Not applicable to a model
    with no loss of its own.
    """
    check_model(model)
    check_number(rtol, "rtol", low=0)
    check_number(atol, "atol", low=0)
    batch = _batch(batch, model)
    if not has_own_loss(model):
        raise NotApplicableError(f"the {type(model).__name__} computes no loss of its own to compare (the "
                                 f"training probes use the reference loss for it)")
    device = model_device(model)
    batch = {k: v.to(device) for k, v in batch.items()}
    with eval_mode(model), torch.no_grad():
        loss, logits = own_loss(model, batch)
        if logits is None:
            logits, _ = model_forward(model, batch["input_ids"], batch.get("attention_mask"), None,
                                      use_cache=False, what="the logits of the batch")
        require_finite(loss, "the model's own loss", ())
        require_finite(logits, "the logits of the batch", ("row", "position", "token id"))
        labels = batch["labels"]
        reference = float(reference_loss(logits, labels))
        own = float(loss)
        variants = _loss_variants(logits, labels, reference)
    difference = abs(own - reference)
    tol = atol + rtol * abs(reference)
    passed = difference <= tol
    metrics: dict[str, Any] = {"own_loss": own, "reference_loss": reference, "difference": difference,
                               "supervised_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum())}
    metrics.update({f"loss_{k}": v for k, v in variants.items()})
    if passed:
        explanation = (f"the model's own loss {own:.5f} equals shifted cross-entropy over its logits "
                       f"({reference:.5f}; difference {difference:.2g}, allowed {tol:.2g})")
    else:
        closest = min(variants, key=lambda k: abs(variants[k] - own))
        causes = {
            "unshifted": "the loss compares position t with label t, without the shift (transformers #27517)",
            "shifted_twice": "the labels are shifted twice, once by the collator and once by the model "
                             "(transformers #47395)",
            "all_tokens_count": "the sum is divided by every label position, -100s included, not by the "
                                "supervised tokens (transformers #46204)",
            "unshifted_count": "the sum is divided by the supervised labels before the shift, not after "
                               "it (transformers #46204)",
        }
        match = abs(variants[closest] - own) <= atol + rtol * abs(variants[closest])
        explanation = (f"the model's own loss {own:.5f} differs from shifted cross-entropy over its "
                       f"logits ({reference:.5f}) by {difference:.3g}, above {tol:.2g}"
                       + (f"; it equals the loss when {causes[closest]}" if match else
                          "; it matches none of the usual mistakes (no shift, a double shift, a wrong "
                          "token count)"))
    return Result(name="loss_matches_reference", passed=passed, metrics=metrics, threshold=tol,
                  headroom=headroom_below(difference, tol), explanation=explanation)


def _loss_variants(logits: torch.Tensor, labels: torch.Tensor, reference: float) -> dict[str, float]:
    """The loss as the documented bugs compute it, to name the one a wrong loss matches.
    ``reference`` is the right loss: the miscounted variants rescale it, only the misshifted
    ones need a cross-entropy of their own."""
    flat = logits.float()
    labels = labels.to(flat.device)

    def mean_over(scores: torch.Tensor, targets: torch.Tensor) -> float:
        count = int((targets != IGNORE_INDEX).sum())
        total = F.cross_entropy(scores.reshape(-1, flat.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return float(total) / count if count else float("inf")

    shifted_sum = reference * int((labels[:, 1:] != IGNORE_INDEX).sum())
    variants = {
        "unshifted": mean_over(flat, labels),
        "all_tokens_count": shifted_sum / labels[:, 1:].numel(),
        "unshifted_count": shifted_sum / max(1, int((labels != IGNORE_INDEX).sum())),
    }
    if labels.shape[1] > 2:
        variants["shifted_twice"] = mean_over(flat[:, :-2], labels[:, 2:])
    return variants


@probe("causal_batch")
def causal_batch(
    batch: Mapping[str, torch.Tensor], *, ignore_index: int = -100, max_ignored_fraction: float = 0.1,
) -> Result:
    """A batch is fit for causal-LM pretraining: labels are the inputs, the mask hides the future.

    A Hugging Face causal LM shifts labels itself, so ``labels`` must equal ``input_ids`` except
    at padding (``ignore_index``). A masked-LM collator fails this (most labels ignored, inputs
    replaced by a mask token), as do labels shuffled against their inputs. A 4-D
    ``attention_mask`` (B, 1, T, T) must not let any position attend to a later one: a floating
    mask is additive (0 = attend, a large negative number = blocked), a bool or integer mask
    marks the allowed links with nonzero values (1 = attend, 0 = blocked).
    """
    if not isinstance(batch, Mapping):
        raise InputError(f"'batch' must be a mapping of tensors with 'input_ids' and 'labels', as a "
                         f"collator returns (got {describe(batch)})")
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise InputError(f"'batch' must have {key!r} (got keys {sorted(map(str, batch))})")
    check_int(ignore_index, "ignore_index", -(2**63))
    check_fraction(max_ignored_fraction, "max_ignored_fraction")
    inputs = as_ids(batch["input_ids"], "batch['input_ids']")  # (B, T)
    labels = as_ids(batch["labels"], "batch['labels']")  # (B, T)
    if labels.shape != inputs.shape:
        raise InputError(f"'batch['labels']' must have the shape of input_ids {tuple(inputs.shape)} "
                         f"(got {tuple(labels.shape)})")
    mask = batch.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4) \
                or tuple(mask.shape[:1]) != tuple(inputs.shape[:1]) or mask.shape[-1] != inputs.shape[1]:
            raise InputError(f"'batch['attention_mask']' must be a (B, T) or (B, 1, T, T) tensor for "
                             f"input_ids of shape {tuple(inputs.shape)} (got {describe(mask)})")
        check_tensor_data(mask, "batch['attention_mask']")
    problems: list[str] = []
    real = torch.ones_like(inputs, dtype=torch.bool) if mask is None or mask.dim() != 2 else mask.bool()
    ignored = (labels == ignore_index) & real
    ignored_fraction = ignored.sum().item() / max(1, real.sum().item())
    differ = (labels != inputs) & (labels != ignore_index)
    if differ.any():
        row, column = (int(i) for i in differ.nonzero()[0])
        problems.append(f"{differ.float().mean().item():.1%} of labels differ from input_ids "
                        f"(first at row {row}, position {column}: input {int(inputs[row, column])}, "
                        f"label {int(labels[row, column])}); labels must be the inputs, unshifted")
    if ignored_fraction > max_ignored_fraction:
        problems.append(f"{ignored_fraction:.1%} of real tokens have label {ignore_index} (allowed "
                        f"{max_ignored_fraction:.0%}): this looks like a masked-LM batch "
                        f"(DataCollatorForLanguageModeling needs mlm=False for a causal LM)")
    if mask is not None and mask.is_floating_point() and bool((torch.isnan(mask) | (mask == math.inf)).any()):
        dims = ("row", "head", "query position", "key position") if mask.dim() == 4 else ("row", "position")
        found = locate(mask.masked_fill(mask == -math.inf, 0.0), dims)
        problems.append(f"the attention_mask holds NaN or +inf ({found}); an additive mask may hold "
                        f"only finite numbers and -inf, or every attention score it touches is NaN")
    if mask is not None and mask.dim() == 4:
        allowed = mask == 0 if mask.is_floating_point() else mask.bool()  # float: additive; else nonzero = attend
        future = torch.triu(torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device), diagonal=1)
        leaks = allowed & future  # (B, 1, T, T)
        if leaks.any():
            b, _, query, later = (int(i) for i in leaks.nonzero()[0])
            problems.append(f"the 4-D attention_mask lets row {b}, position {query} attend to later "
                            f"position {later} ({leaks.sum().item()} future links): the model can read "
                            f"the tokens it must predict")
    passed = not problems
    return Result(name="causal_batch", passed=passed,
                  metrics={"ignored_fraction": ignored_fraction, "label_mismatch_fraction": differ.float().mean().item()},
                  threshold=max_ignored_fraction, headroom=None,
                  explanation="labels equal input_ids and no position sees the future" if passed else "; ".join(problems))


# ---------------------------------------------------------------- helpers shared with the loops


def memorized_fraction(
    model: torch.nn.Module, input_ids: torch.Tensor, *, prefix_length: int = 32,
    continuation_length: int = 32, batch_size: int = 64,
) -> float:
    """The verbatim rate of :func:`memorizes`, from one teacher-forced forward pass.

    Greedy decoding reproduces a continuation exactly when the argmax at each of its positions,
    given the true tokens before it, is the true next token; so one forward pass gives the same
    verbatim rate (ties aside) far faster than decoding. The training loops use it to stop early.

    Raises:
        InputError: ``input_ids`` is not a (N, T) tensor, or ``prefix_length +
            continuation_length`` is more than the chunk length T.
    """
    rows = verbatim_rows(model, input_ids, prefix_length=prefix_length,
                         continuation_length=continuation_length, batch_size=batch_size)
    return float(rows.float().mean()) if len(rows) else 0.0


@torch.no_grad()
def verbatim_rows(
    model: torch.nn.Module, input_ids: torch.Tensor, *, prefix_length: int = 32,
    continuation_length: int = 32, batch_size: int = 64,
) -> torch.Tensor:
    """Per row of ``input_ids`` (N, T), whether its continuation is the teacher-forced argmax at
    every position: (N,) bools on the CPU (see :func:`memorized_fraction`)."""
    check_causal_lm(model)
    input_ids = as_ids(input_ids, "input_ids", vocab=input_vocabulary(model))
    check_memorization_lengths(prefix_length, continuation_length, input_ids.shape[1], chunks="input_ids")
    check_int(batch_size, "batch_size", 1)
    end = prefix_length + continuation_length
    hits = []
    device = model_device(model)
    with eval_mode(model):
        for part in input_ids[:, :end].split(batch_size):
            part = part.to(device)
            # the last token predicts nothing compared; only the n positions that predict the
            # continuation get logits (B, n, V), which spares the output layer the prefix
            logits, _ = model_forward(model, part[:, :-1], None, None, use_cache=False, last=continuation_length)
            predicted = logits.argmax(dim=-1)  # (B, n)
            hits.append((predicted == part[:, prefix_length:end]).all(dim=1).cpu())
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def check_memorization_lengths(prefix_length: object, continuation_length: object, chunk_length: int,
                               *, chunks: str = "") -> None:
    """Raise InputError unless a ``prefix_length``-token prefix and a ``continuation_length``-token
    continuation (ints >= 1) fit in a chunk of ``chunk_length`` tokens (``chunks`` names the
    argument that holds the chunks, for the message).

    Without this, a prefix as long as the chunk would leave nothing to compare, and an untrained
    model would count as having memorized every chunk.
    """
    check_int(prefix_length, "prefix_length", 1)
    check_int(continuation_length, "continuation_length", 1)
    check_int(chunk_length, "chunk_length", 1)
    total = cast(int, prefix_length) + cast(int, continuation_length)
    if total > chunk_length:
        raise InputError(
            f"'prefix_length' {prefix_length} + 'continuation_length' {continuation_length} must be "
            f"at most the chunk length{f' of {chunks!r}' if chunks else ''}, {chunk_length} tokens "
            f"(got {total}); use a shorter prefix or continuation, or longer chunks")


def _greedy(model: torch.nn.Module, prefix: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation (B, new_tokens) of equal-length prefixes (B, k): the causal chapter's loop."""
    return greedy_decode(model, prefix, max_new_tokens=new_tokens).new_tokens.to(prefix.device)


def _batch(batch: object, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``batch`` (a (B, T) tensor of ids, or a collator's mapping with ``input_ids``) as a mapping
    of tensors: ids checked against the model's vocabulary, ``labels`` = ``input_ids`` if absent."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if not isinstance(ids, torch.Tensor):
        raise InputError(f"'batch' must be a (B, T) tensor of token ids or a mapping of tensors with "
                         f"'input_ids', as a collator returns (got {describe(batch)})")
    argument = "batch['input_ids']" if isinstance(batch, Mapping) else "batch"
    inputs = {"input_ids": as_ids(ids, argument, vocab=input_vocabulary(model), min_length=2)}
    if isinstance(batch, Mapping):
        for key, value in batch.items():
            if key != "input_ids" and isinstance(value, torch.Tensor):
                inputs[str(key)] = check_tensor_data(value, f"batch[{key!r}]")
    labels = inputs.setdefault("labels", inputs["input_ids"])
    if labels.shape != inputs["input_ids"].shape or labels.dtype.is_floating_point:
        raise InputError(f"'batch['labels']' must be integer ids of the shape of input_ids "
                         f"{tuple(inputs['input_ids'].shape)} (got {describe(labels)})")
    inputs["labels"] = labels.long()
    return inputs


def _loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The loss the model trains with (its own, else the reference) on a batch from
    :func:`_batch`; NonFiniteError if it is NaN or Inf."""
    return training_loss(model, batch)


def _parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    check_model(model)
    return dict(model.named_parameters())  # tied weights appear once, under their first name


def _frozen_problems(names: Mapping[str, torch.nn.Parameter], expect_frozen: Collection[str],
                     model: torch.nn.Module | None = None) -> list[str]:
    unknown = sorted(set(expect_frozen) - set(names))
    if unknown:
        raise InputError(f"'expect_frozen' must name parameters of the model (got unknown {unknown[:3]})")
    frozen = [n for n, p in names.items() if not p.requires_grad and n not in expect_frozen]
    designed = _frozen_by_design(model) if model is not None and frozen else set()
    return [f"{n} is frozen (requires_grad=False) but pretraining trains every parameter; "
            f"name it in expect_frozen if that is intended"
            for n in frozen if n not in designed] + [
            f"{n} should be frozen but has requires_grad=True"
            for n in expect_frozen if names[n].requires_grad]


def _frozen_by_design(model: torch.nn.Module) -> set[str]:
    """The parameters a Hugging Face model's own class makes frozen: those with
    ``requires_grad=False`` in a fresh instance of the class built from the same config (on the
    meta device: no memory, no initialisation). DeepSeek-V3-style routers keep their
    load-balancing bias so (afmoe's ``expert_bias``, ERNIE-4.5's ``e_score_correction_bias``):
    it is updated outside the gradient, and is no mistake of the user's."""
    base = hf_model(model)
    if base is None:
        return set()
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = type(base)(base.config)
    except Exception:  # noqa: BLE001 -- a class that cannot be rebuilt so: nothing known by design
        return set()
    prefix = "" if base is model else _prefix_of(model, base)
    return {prefix + n for n, p in fresh.named_parameters() if not p.requires_grad}


def _prefix_of(model: torch.nn.Module, inner: torch.nn.Module) -> str:
    """The name prefix of ``inner``'s parameters inside ``model`` (a PEFT wrapper's)."""
    for name, module in model.named_modules():
        if module is inner:
            return f"{name}." if name else ""
    return ""


def _as_ids(
    rows: Rows, argument: str, *, tokenizer: PreTrainedTokenizerBase | None = None, min_length: int = 2,
    vocab: int | None = None, text_length: int | None = None,
) -> torch.Tensor:
    """Rows of token ids as a (N, T) tensor: from a tensor, lists of ids, texts or a dataset.

    Texts are tokenized to at most ``text_length`` tokens (default ``min_length``). Rows of
    different lengths are cut to the shortest (at least ``min_length``); with ``vocab``, every
    id must lie in [0, vocab).
    """
    if hasattr(rows, "column_names"):  # a datasets.Dataset of chunks
        rows = cast(Any, rows)["input_ids"]
    if not isinstance(rows, torch.Tensor) and isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)):
        if not rows:
            raise InputError(f"'{argument}' must be a non-empty list of token-id rows or texts (got {describe(rows)})")
        if all(isinstance(r, str) for r in rows):
            if tokenizer is None:
                raise InputError(f"'{argument}' holds texts, so 'tokenizer' must be given (got None)")
            rows = [tokenizer(r, truncation=True, max_length=text_length or min_length)["input_ids"]
                    for r in rows]
        if all(isinstance(r, Sequence) and not isinstance(r, (str, bytes)) for r in rows):
            lengths = {len(r) for r in rows}
            if len(lengths) != 1:
                shortest = min(lengths)
                if shortest < min_length:
                    raise InputError(f"every row of '{argument}' must have at least {min_length} tokens "
                                     f"(shortest has {shortest})")
                rows = [list(r)[:shortest] for r in rows]
    return as_ids(rows, argument, vocab=vocab, min_length=min_length)
