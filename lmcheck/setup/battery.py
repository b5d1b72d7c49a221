"""The setup battery: every setup check in one ordered table, the budget of the runs, and the
typed protocol through which the battery runs the user's code.

A driver (the plain loop, the Trainer, Lightning) knows how to run the user's own steps and
read their data; the battery decides what to run and when, and hands what the runs recorded to
the judges of each check family (``batches``, ``gradients``, ``schedule``, ``overfit``,
``order``, ``seeds``), none of which sees a driver. A new check is one judge and one row of
:data:`CHECKS`.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch

from lmcheck._finite import non_finite_result
from lmcheck._model import hf_model
from lmcheck._ranks import gathered, world_size
from lmcheck._recording import OptimizerStep, Snapshot, counted_steps
from lmcheck._validate import check_bool
from lmcheck.curves import LossCurve
from lmcheck.errors import InputError, NonFiniteError
from lmcheck.lora import is_peft_model, lora_adapters
from lmcheck.packing import document_starts, packing_equivalence
from lmcheck.precision import (
    UpdateReplay,
    autocast_ops,
    fp16_headroom,
    loss_precision,
    rope_precision,
)
from lmcheck.recipes import SetupBudget
from lmcheck.results import Result
from lmcheck.setup.batches import (
    READ_FROM_BATCHES,
    UNSUPERVISED,
    Collated,
    Supervision,
    batch_checks,
    inputs_unchanged,
    labels_form,
    special_ids,
    supervised_count,
)
from lmcheck.setup.gradients import accumulation, gradient_flow, params_update
from lmcheck.setup.order import Epochs, data_order
from lmcheck.setup.overfit import (
    MemorizationWatch,
    nothing_to_memorize,
    overfits,
    record_curve,
    sums_micro_batches,
)
from lmcheck.setup.preference import PREFERENCE_NOT_APPLICABLE
from lmcheck.setup.report import SetupReport
from lmcheck.setup.resume import Resumable, resume
from lmcheck.setup.schedule import lr_schedule, peak_lrs
from lmcheck.setup.seeds import eval_deterministic, reproducible
from lmcheck.supervision import template_end_of_turn
from lmcheck.training import loss_at_init, loss_matches_reference

__all__ = ["CHECKS", "DISTRIBUTED_CHECKS", "SETUP_CHECKS", "Check", "Driver", "FirstStep", "Run", "first_step_hook", "run_battery"]

Progress = Callable[[str, int, int], None]  # (phase, done, total)
# (the micro-batches of some calls, the calls so far, the last clip_grad_norm_ seen), at the first step
FirstStep = Callable[[Callable[[range], list[dict[str, torch.Tensor]]], int, "tuple[float, float] | None"], None]


@dataclass
class Run:
    """What one run of the user's code recorded."""

    steps: list[OptimizerStep]  # every optimizer step, in order
    losses: list[float]  # the loss the user's step returned at each call
    batches: list[int]  # the index of the batch each call trained on


class Driver(Protocol):
    """Runs the user's own training code, watched and then undone, and reads their data.

    Attributes:
        model: the language model lmcheck's own forwards call (inside any DDP wrapper).
        snapshot: the saved state (weights, optimizer and scheduler, random generators) every
            run starts from and every run is undone to.
        scheduler: the torch scheduler the user's code steps (once seen), or None.
        curve: the overfitting run's loss curve, filled by the battery.
        changed_inputs: what the runs found changed in place in the user's batches.
        lm_batches: the first batches in lmcheck's form (``input_ids``, ``labels`` or ``targets``).
        setup: what is known about the setup, for the report.
        tokenizer, collator: where the eos and BOS ids may come from (None where unknown).
        schedule: the expected learning rate at optimizer step i, where the user gave one.
        max_grad_norm: the clipping norm of the first run (0: it does not clip; None: not said).
        gradient_rtol: the accumulation tolerance where the setup computes in mixed precision.
    """

    model: torch.nn.Module
    snapshot: Snapshot
    scheduler: Any
    curve: LossCurve
    changed_inputs: list[str]
    lm_batches: list[dict[str, torch.Tensor]]
    setup: dict[str, Any]
    tokenizer: Any
    collator: Any
    schedule: Callable[[int], float] | None
    max_grad_norm: float | None
    gradient_rtol: float | None

    def run(self, steps: int, *, phase: str, first: bool = False, batches: Sequence[int] | None = None,
            peak_lrs: tuple[float, ...] | None = None, after_step: Callable[[int], bool] | None = None,
            on_first_step: FirstStep | None = None) -> Run:
        """The user's steps from the saved state until ``steps`` optimizer steps (``after_step(n)``
        may stop earlier) on the first batches, or those ``batches`` index. ``first``: the run whose
        update is compared: what the judges read of the gradients kept at step 1, dropout off, no
        clipping where it can be turned off. ``peak_lrs``: each parameter group's learning rate,
        held at every step. ``on_first_step(batches_of, calls, clip)`` is called at the first
        optimizer step, before it is taken: ``batches_of(range)`` gives those calls' micro-batches
        in lmcheck's form, ``calls`` counts the calls so far, ``clip`` is the last clipping seen."""
        ...

    def step_batches(self, run: Run, calls: range) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of those calls of ``run``, in lmcheck's form."""
        ...

    def overfit_batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        """The batches the overfitting run trains on, in lmcheck's form (``run(batches=...)`` indexes them)."""
        ...

    def collating(self) -> Collated:
        """The dataset's first examples against what the collator makes of them."""
        ...

    def epochs(self) -> Epochs:
        """Two epochs of the user's data (or its draws), for ``data_order``."""
        ...

    def seeding(self) -> tuple[int, str] | str:
        """(the seed, how it is applied) for ``reproducible``, or why it is not applicable."""
        ...

    def first_losses(self, seed: int) -> list[float]:
        """The first losses of the setup run (or built afresh) with ``seed``."""
        ...

    def evaluate_twice(self) -> tuple[list[float], str] | str:
        """Two evaluations' losses and how they were made, or why there are none."""
        ...

    def rank_checks(self) -> list[Result]:
        """Under torchrun: the results of :data:`DISTRIBUTED_CHECKS`, in that order."""
        ...

    def resumable(self) -> Resumable | str:
        """The runs of the ``resume`` check, or why it does not apply."""
        ...

    def restore(self) -> None:
        """Put back everything the runs changed: the user's objects as they were before."""
        ...


def first_step_hook(on_first_step: FirstStep | None, batches_of: Callable[[range], list[dict[str, torch.Tensor]]],
                    ) -> Callable[[int, tuple[float, float] | None], None] | None:
    """The recorder's ``at_first_step`` for a driver's run: ``on_first_step`` with the driver's
    way to the micro-batches of some calls."""
    if on_first_step is None:
        return None
    return lambda calls, clip: on_first_step(batches_of, calls, clip)


@dataclass
class FirstRun:
    """The first run and what the checks of its step read."""

    run: Run
    calls: range  # the calls whose micro-batches make the first optimizer step
    left: dict[str, torch.Tensor]  # the parameters as the run left them (before any restore)


class Session:
    """One battery over one driver: the options and what the runs have recorded so far."""

    def __init__(self, driver: Driver, budget: SetupBudget, pretrained: bool | None,
                 expect_eos: bool | None, packing: str | None = None,
                 supervision: Supervision = READ_FROM_BATCHES) -> None:
        self.driver, self.budget, self.supervision = driver, budget, supervision
        self.pretrained, self.expect_eos, self.packing = pretrained, expect_eos, packing
        self.collated = driver.collating()
        self.special = special_ids(driver.tokenizer, driver.collator, driver.model)
        driver.setup["eos and BOS from"] = self.special.source
        self.supervised = any(supervised_count(b) for b in driver.lm_batches)
        self.results: dict[str, Result] = {}
        self.costs: dict[str, dict[str, float]] = {}  # check -> seconds and optimizer steps it ran
        self._batches: list[Result] | None = None
        self._first: FirstRun | None = None
        self.replay: UpdateReplay | None = None  # the first run's element-wise replay of half-precision updates
        self._accumulation: Result | None = None  # judged at the first step of the first run
        self._window: int | None = None  # the first step's calls to judge, where steps were skipped
        self._ranks: dict[str, Result] | None = None

    def batch_result(self, index: int) -> Result:
        if self._batches is None:
            try:
                self._batches = batch_checks(self.driver.lm_batches, self.special, self.expect_eos, self.supervision)
            except InputError:
                raise
            except Exception as error:  # noqa: BLE001 -- both batch checks' outcome, said in full
                self._batches = [Result.from_exception(n, error) for n in ("batch_supervision", "causal_batch")]
        return self._batches[index]

    @property
    def first(self) -> FirstRun:
        if self._first is None:
            self._first = self._first_run()
        return self._first

    def _first_run(self) -> FirstRun:
        driver = self.driver
        if not self.supervised:  # only the learning rates are read
            run = driver.run(min(self.budget.steps, 3), phase="first steps", first=True)
            return FirstRun(run, range(0), {})
        # the half-precision weights' updates, replayed element by element on a sample as the run steps
        self.replay = UpdateReplay(driver.model)
        with self.replay:
            run = driver.run(self.budget.steps, phase="first steps", first=True, on_first_step=self._at_first_step)
        first = run.steps[0]
        # k: the calls between two steps, the most common count (fewer where an epoch ends inside an
        # accumulation: the Trainer steps on what is left; ties go to the larger). More before the
        # first step means steps were skipped (an AMP loss scaler that met an overflow skips
        # optimizer.step and the gradients are zeroed): the first step's gradient holds the last k
        # micro-batches only.
        counts = Counter(s.micro_batches for s in run.steps)
        k = min(max(counts.items(), key=lambda item: (item[1], item[0]))[0], first.micro_batches)
        driver.setup["micro-batches per optimizer step"] = k
        optimizers = {type(o).__name__ for o, _ in driver.snapshot.objects.values()
                      if isinstance(o, torch.optim.Optimizer)}
        driver.setup["optimizer"] = ", ".join(sorted(optimizers)) or "?"
        left = {n: p.detach() for n, p in driver.model.named_parameters()}
        return FirstRun(run, range(first.micro_batches - k, first.micro_batches), left)

    def _at_first_step(self, batches_of: Callable[[range], list[dict[str, torch.Tensor]]], calls: int,
                       clip: tuple[float, float] | None) -> None:
        """At the first optimizer step, before it is taken: the accumulation check, on the step's
        micro-batches (the last ``window`` calls where steps were skipped before it, else all)."""
        window = min(self._window or calls, calls)
        micro_batches = batches_of(range(calls - window, calls))
        d = self.driver
        preference = getattr(d, "preference", None)
        if preference is not None:  # the gradient of the trainer's own preference loss over the step's pairs
            self._accumulation = _isolated("accumulation", lambda: preference.accumulation(micro_batches,
                                                                                           d.gradient_rtol))
            return
        self._accumulation = _isolated("accumulation", lambda: accumulation(
            d.model, micro_batches, clip, d.max_grad_norm, d.gradient_rtol))

    def accumulation(self) -> Result:
        first = self.first
        if first.calls.start > 0:  # steps were skipped before the first: judged again on its last k calls
            self._window, self._accumulation = len(first.calls), None
            self.driver.run(1, phase="accumulation", first=True, on_first_step=self._at_first_step)
        if self._accumulation is None:
            return Result.not_applicable("accumulation", "no optimizer step of the first run was seen")
        return self._accumulation

    def rank_result(self, name: str) -> Result:
        if self._ranks is None:
            self._ranks = {r.name: r for r in self.driver.rank_checks()}
        return self._ranks[name]


# ---------------------------------------------------------------- the judges' calls


def _loss_at_init(s: Session) -> Result:
    model, pretrained = s.driver.model, s.pretrained
    if pretrained is None:
        base = hf_model(model)  # a PEFT model's base: loaded from a checkpoint, or not
        pretrained = base is not None and bool(getattr(base.config, "_name_or_path", ""))
    if check_bool(pretrained, "pretrained"):
        return Result.not_applicable("loss_at_init", "the model is pretrained (loaded from a checkpoint), "
                                     "so its loss is not near ln V; pass pretrained=False to check it")
    return loss_at_init(model, s.driver.lm_batches[0]["input_ids"])


def _loss_matches_reference(s: Session) -> Result:
    labelled = next((b for b in s.driver.lm_batches if "labels" in b), None)
    if labelled is None:
        return Result.not_applicable("loss_matches_reference", "the batches carry next-token targets, not "
                                     "labels, so the model's own loss is not called")
    return loss_matches_reference(s.driver.model, labels_form(labelled))


def _overfits(s: Session) -> Result:
    """A handful of batches, the user's step at their schedule's peak rate, until memorized."""
    d, first = s.driver, s.first
    peaks = peak_lrs(first.run.steps, d.snapshot, d.scheduler)
    reference = s.results["accumulation"].metrics.get("reference_loss")
    summed = sums_micro_batches([first.run.losses[i] for i in first.calls], reference)
    d.setup["overfitting learning rate"] = "peak of the schedule" if peaks is not None else "the schedule's"
    batches = d.overfit_batches(s.budget.overfit_batches)
    empty = nothing_to_memorize(batches)
    if empty is not None:
        return empty
    watch = MemorizationWatch(d.model, batches, s.budget.overfit_steps, s.budget.check_every)
    run = d.run(watch.limit, phase="overfitting", batches=list(range(len(batches))), after_step=watch,
                peak_lrs=peaks)
    record_curve(d.curve, run.steps, run.losses, summed, memorized=watch.at is not None)
    return overfits(watch, run.steps, d.curve, peaks)


def _adapters(s: Session) -> Result:
    """A PEFT model's adapter (:func:`lmcheck.lora.lora_adapters` on the first batch), and every
    ``lora_B`` off zero after the user's own first run; n/a for any other model."""
    model = s.driver.model
    if not is_peft_model(model):
        return Result.not_applicable("adapters", f"not a PEFT model ({type(model).__name__}): no adapter to check")
    result = lora_adapters(model, labels_form(s.driver.lm_batches[0]))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}  # not a frozen copy (TRL's "ref" adapter)
    still = [n for n, p in s.first.left.items() if ".lora_B." in n and n in trained and not bool(p.any())]
    if not still:
        return result
    said = (f"{len(still)} lora_B weight(s) are still zero after {len(s.first.run.steps)} optimizer steps of the "
            f"user's own run (first: {still[0]}): the adapter's output stays zero while the loss may fall "
            f"(peft #1402); are they in the optimizer?")
    explanation = said if result.passed else f"{said}; {result.explanation}"
    return dataclasses.replace(result, passed=False, explanation=explanation)


HALF = (torch.bfloat16, torch.float16)


def _precision(s: Session) -> Result:
    """What the dtype the user trains in loses (:mod:`lmcheck.precision`): the loss against the
    fp32 cross-entropy of the same logits, always; the RoPE tables where the model has them; the
    ops under autocast where the setup computes in mixed precision; fp16's range where it trains
    in fp16; and the share of the half-precision weights' element updates that the user's own
    first run rounded away (replayed in fp64 on a sample of each weight's elements)."""
    d = s.driver
    model, batch = d.model, labels_form(d.lm_batches[0])
    mixed = d.setup.get("mixed precision")  # "bf16" or "fp16" where the setup's autocast says so
    weights = {p.dtype for p in model.parameters() if p.requires_grad}
    parts = [loss_precision(model, batch), rope_precision(model, autocast=mixed is not None)]  # n/a without RoPE
    if mixed is not None:
        parts.append(autocast_ops(model, batch, dtype=torch.bfloat16 if mixed == "bf16" else torch.float16))
    if mixed == "fp16" or torch.float16 in weights:
        parts.append(fp16_headroom(model, batch))
    parts.append(_rounded_away(s))
    parts.append(_optimizer_state(s))
    judged = [r for r in parts if r.status != "n/a"]
    failed = [r for r in judged if not r.passed]
    dtypes = ", ".join(sorted(str(t).replace("torch.", "") for t in weights)) or "none trainable"
    metrics: dict[str, Any] = {r.name: r.status for r in parts}
    lost = next(r for r in parts if r.name == "lost_updates")
    if "replay_error_ulps" in lost.metrics:  # the element-wise replay's numbers
        metrics["lost_updates_replay"] = {k: lost.metrics[k] for k in ("lost_fraction", "intended_updates", "steps",
                                                                       "skipped_steps", "sample", "replay_error_ulps")}
    if failed:
        return Result(name="precision", passed=False, metrics=metrics,
                      explanation="; ".join(f"{r.name}: {r.explanation}" for r in failed))
    if not judged:
        return Result.not_applicable("precision", "; ".join(f"{r.name}: {r.explanation}" for r in parts))
    return Result(name="precision", passed=True, metrics=metrics,
                  explanation=f"weights in {dtypes}" + (f", {mixed} autocast" if mixed else "") + ": "
                              + "; ".join(f"{r.name}: {r.explanation}" for r in judged)
                              + "".join(f" ({r.name} n/a: {r.skip_reason})" for r in parts if r.status == "n/a"))


def _rounded_away(s: Session) -> Result:
    """The half-precision updates of the user's first run that rounded away: each step replayed in
    fp64 on a sample of each half-precision weight's elements (:class:`lmcheck.precision.UpdateReplay`),
    the share of intended element updates the stored weights lost (an update below half a step of
    the dtype leaves the element as it was: vllm-project/speculators PR #765). Where the optimizer
    is not one the replay can step element by element, approximated: the half-precision weights
    whose every element is unchanged after the run though they had a gradient. fp32 weights: not
    applicable."""
    name = "lost_updates"
    model, first = s.driver.model, s.first
    if s.replay is None:
        return Result.not_applicable(name, "the first run was not replayed (it supervised no token)")
    replayed = s.replay.result()
    if replayed.status != "n/a" or s.replay.unreplayed is None:
        return replayed
    half = {n for n, p in model.named_parameters() if p.requires_grad and p.dtype in HALF}
    saved = s.driver.snapshot.parameters()
    seen = first.run.steps[0].seen or {} if first.run.steps else {}
    stuck = [n for n in sorted(half, key=lambda n: ("norm" not in n.lower(), n))
             if n in saved and n in first.left and getattr(seen.get(n), "nonzero", False)
             and torch.equal(first.left[n].detach().cpu(), saved[n])]
    steps = len(first.run.steps)
    why = (f" (approximate, whole weights only: the element-wise replay was not possible, {replayed.skip_reason}; "
           f"lmcheck.precision.lost_updates measures each update)")
    if stuck:
        return Result(name=name, passed=False, metrics={"stuck": len(stuck), "half_precision": len(half)},
                      explanation=f"{len(stuck)} of {len(half)} half-precision weights did not change at all in "
                                  f"{steps} optimizer steps of the user's run though they had gradients (first: "
                                  f"{stuck[0]}): their updates are below half a step of their dtype and round away; "
                                  f"keep fp32 master weights (vllm-project/speculators PR #765, workofart/ml-by-hand "
                                  f"PR #85){why}")
    return Result(name=name, passed=True, metrics={"stuck": 0, "half_precision": len(half)},
                  explanation=f"every one of the {len(half)} half-precision weights with a gradient changed in "
                              f"{steps} optimizer steps{why}")


def _optimizer_state(s: Session) -> Result:
    """The dtypes of the user's optimizer state, as their first run left it: Adam's second moment
    in half precision fails (its decay by beta2 = 0.999 each step is below half a bf16 step, 0.39%,
    so it stops following the gradients); the rest is reported."""
    name = "optimizer_state"
    found: dict[str, set[str]] = {}
    for item, _ in s.driver.snapshot.objects.values():
        for state in getattr(item, "state", {}).values() if isinstance(item, torch.optim.Optimizer) else ():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0:
                    found.setdefault(key, set()).add(str(value.dtype).replace("torch.", ""))
    if not found:
        return Result.not_applicable(name, "no optimizer state with tensors was seen")
    said = ", ".join(f"{k} in {'/'.join(sorted(v))}" for k, v in sorted(found.items()))
    half = sorted(k for k, v in found.items() if k in ("exp_avg_sq", "square_avg", "sum") and v & {"bfloat16", "float16"})
    if half:
        return Result(name=name, passed=False, metrics={"state_dtypes": said},
                      explanation=f"the optimizer keeps {half[0]} in half precision ({said}): its decay each step is "
                                  f"below half a step of the dtype, so it stops following the gradients and the "
                                  f"update's scale is wrong; keep the optimizer state in fp32 "
                                  f"(lmcheck.precision.lost_updates measures it)")
    return Result(name=name, passed=True, metrics={"state_dtypes": said}, explanation=f"optimizer state: {said}")


def _packing_equivalence(s: Session) -> Result:
    """The first batch with a packed row, each of its documents run alone: where position ids
    restart and, where the setup says it packs, after each eos (unless the eos also ends the
    turns of the chat template)."""
    tokenizer = s.special.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else min(s.special.end_ids, default=None)
    if s.packing is None or not isinstance(eos, int) or (tokenizer is not None and eos in template_end_of_turn(tokenizer)):
        eos = None  # documents only where the positions restart: an eos that ends chat turns ends no document
    batches = [labels_form(b) for b in s.driver.lm_batches]
    packed = next((b for b in batches if _restarts(b)), None)
    if packed is None and s.packing is None:
        return Result.not_applicable("packing_equivalence", NOT_PACKED)
    if s.packing is not None:
        s.driver.setup["packing"] = s.packing
    return packing_equivalence(s.driver.model, packed if packed is not None else batches[0], eos_id=eos)


def _restarts(batch: dict[str, torch.Tensor]) -> bool:
    positions = batch.get("position_ids")
    if positions is None or positions.shape[-1] < 2:
        return False
    mask = batch.get("attention_mask")
    rows = positions.reshape(-1, positions.shape[-1])
    return any(len(document_starts(row[:int(mask[i].sum())] if mask is not None and mask.shape == rows.shape
                                   else row)) > 1 for i, row in enumerate(rows))


NOT_PACKED = ("the batches are not packed: no position ids restart inside a row, and neither the collator nor an "
              "option packs (rows of eos-separated documents that attend to each other, as GPT-2's pretraining "
              "chunks are, are not checked; pass packed=True if each document must be its own sequence)")


def _preference_at_init(s: Session) -> Result:
    """A preference trainer's step 0 (:mod:`lmcheck.setup.preference`); n/a for any other setup."""
    preference = getattr(s.driver, "preference", None)
    if preference is None:
        return Result.not_applicable("preference_at_init", "not a preference trainer (TRL's DPOTrainer): no "
                                     "reference model to compare the policy with")
    s.driver.setup["preference loss"] = ", ".join(getattr(preference.trainer, "loss_types", ["?"]))
    return preference.judge()


NOT_RL = ("not an RL trainer (TRL's GRPOTrainer): no completions are sampled inside the step, so there is no "
          "importance ratio")


def _reproducible(s: Session) -> Result:
    plan = s.driver.seeding()
    if isinstance(plan, str):
        return Result.not_applicable("reproducible", plan)
    seed, how = plan
    return reproducible([s.driver.first_losses(value) for value in (seed, seed, seed + 1)], seed, how)


def _eval_deterministic(s: Session) -> Result:
    made = s.driver.evaluate_twice()
    if isinstance(made, str):
        return Result.not_applicable("eval_deterministic", made)
    return eval_deterministic(*made)


# ---------------------------------------------------------------- the table


BATCHES, FIRST_RUN, OVERFITTING, AFTER_THE_RUNS, RANKS = range(5)  # the stages, in the order they run


@dataclass(frozen=True)
class Check:
    """One row of the battery.

    Attributes:
        name: the result's name.
        stage: when it runs (its results come in table order all the same): ``BATCHES`` before any
            run, ``FIRST_RUN`` on the first run, ``OVERFITTING``, ``AFTER_THE_RUNS``, and ``RANKS``
            only under torchrun.
        judge: the session in, the result out.
        supervised: it needs supervised tokens: not applicable where the first batches have none.
        follows: the checks its failure can follow from; where one of them failed too, the
            failure is marked as following from the first, which leads.
    """

    name: str
    stage: int
    judge: Callable[[Session], Result]
    supervised: bool = False
    follows: tuple[str, ...] = ()


CHECKS: tuple[Check, ...] = (
    Check("batch_supervision", BATCHES, lambda s: s.batch_result(0)),
    Check("causal_batch", BATCHES, lambda s: s.batch_result(1)),
    # after both runs (the first run's collator, made to give unequal lengths, copies the labels);
    # labels aliasing the inputs are one cause with two signs
    Check("inputs_unchanged", AFTER_THE_RUNS, lambda s: inputs_unchanged(s.driver.changed_inputs, s.collated),
          follows=("batch_supervision",)),
    Check("loss_at_init", BATCHES, _loss_at_init),
    Check("loss_matches_reference", BATCHES, _loss_matches_reference, supervised=True),
    Check("packing_equivalence", BATCHES, _packing_equivalence),
    Check("preference_at_init", BATCHES, _preference_at_init, supervised=True),
    # an RL trainer's own report (check_trainer's rl_report) judges it; every other setup has none
    Check("importance_ratio", BATCHES, lambda s: Result.not_applicable("importance_ratio", NOT_RL)),
    Check("gradient_flow", FIRST_RUN, lambda s: gradient_flow(s.driver.model, s.first.run.steps, s.driver.snapshot),
          supervised=True),
    # before params_update: half-precision weights that never moved are its cause
    Check("precision", FIRST_RUN, _precision, supervised=True, follows=("loss_matches_reference",)),
    # the parameters as the first run left them: judged before accumulation restores the saved ones
    Check("params_update", FIRST_RUN, lambda s: params_update(s.driver.model, s.driver.snapshot, s.first.left,
                                                              len(s.first.run.steps)),
          supervised=True, follows=("gradient_flow", "lr_schedule", "precision")),
    Check("adapters", FIRST_RUN, _adapters, supervised=True, follows=("gradient_flow", "params_update")),
    Check("accumulation", FIRST_RUN, lambda s: s.accumulation(), supervised=True,
          follows=("batch_supervision", "loss_matches_reference", "packing_equivalence", "gradient_flow")),
    Check("lr_schedule", FIRST_RUN, lambda s: lr_schedule(s.first.run.steps, s.driver.scheduler, s.driver.snapshot,
                                                          s.driver.schedule)),
    Check("overfits", OVERFITTING, _overfits, supervised=True,
          follows=("batch_supervision", "causal_batch", "loss_matches_reference", "packing_equivalence", "gradient_flow",
                   "params_update", "accumulation", "lr_schedule")),
    # packed rows are keyed by their documents, found where the position ids restart
    Check("data_order", AFTER_THE_RUNS, lambda s: data_order(s.driver.epochs()), follows=("packing_equivalence",)),
    Check("reproducible", AFTER_THE_RUNS, _reproducible, supervised=True, follows=("gradient_flow",)),
    Check("eval_deterministic", AFTER_THE_RUNS, _eval_deterministic, supervised=True),
    Check("resume", AFTER_THE_RUNS, lambda s: resume(s.driver.resumable()), supervised=True,
          follows=("reproducible",)),
    # last: after every other run, a Trainer must still sync its ranks
    Check("grads_synchronized", RANKS, lambda s: s.rank_result("grads_synchronized")),
    Check("data_sharding", RANKS, lambda s: s.rank_result("data_sharding")),
    Check("rank_randomness", RANKS, lambda s: s.rank_result("rank_randomness")),
)

# every report holds one result of each, in this order (and of each of these under torchrun)
SETUP_CHECKS = tuple(c.name for c in CHECKS if c.stage != RANKS)
DISTRIBUTED_CHECKS = tuple(c.name for c in CHECKS if c.stage == RANKS)


def run_battery(driver: Driver, budget: SetupBudget, *, pretrained: bool | None = None,
                expect_eos: bool | None = None, packing: str | None = None,
                supervision: Supervision = READ_FROM_BATCHES) -> SetupReport:
    """Every check of :data:`CHECKS` on the driver's setup, stage by stage, each isolated: one
    that raises is an ``error`` result and the rest still run (an InputError, the setup itself
    unfit, stops them). ``packing`` says what declares the rows packed (:func:`lmcheck.setup.batches.packing_of`), for
    ``packing_equivalence``; ``supervision``, what the setup says it trains on, for
    ``batch_supervision``'s chat-turn rules. Under torchrun every rank returns the same report. The driver's
    ``restore()`` runs at the end, whatever happens."""
    ranks = world_size() > 1
    try:
        session = Session(driver, budget, pretrained, expect_eos, packing, supervision)
        if supervision.source:
            driver.setup["trains on"] = supervision.source
        for check in sorted(CHECKS, key=lambda c: c.stage):
            if check.stage == RANKS and not ranks:
                continue
            if getattr(driver, "preference", None) is not None and check.name in PREFERENCE_NOT_APPLICABLE:
                session.results[check.name] = Result.not_applicable(check.name, PREFERENCE_NOT_APPLICABLE[check.name])
                continue
            if check.supervised and not session.supervised:
                # the root cause, said once by batch_supervision: what needs supervised tokens cannot run
                session.results[check.name] = Result.not_applicable(check.name, UNSUPERVISED)
                continue
            started = time.perf_counter()
            with counted_steps() as steps:
                session.results[check.name] = _isolated(check.name, partial(check.judge, session))
            elsewhere = session.results[check.name].metrics.get("steps_elsewhere", 0)  # in a fresh process
            session.costs[check.name] = {"seconds": round(time.perf_counter() - started, 3),
                                         "optimizer_steps": steps[0] + int(elsewhere)}
    finally:
        driver.restore()
    if ranks:
        driver.setup["world size"] = world_size()
    results = [session.results[c.name] for c in CHECKS if c.name in session.results]
    return SetupReport(results=_root_causes_first(_agree(results)), curve=driver.curve, setup=driver.setup,
                       costs=session.costs)


def _isolated(name: str, check: Callable[[], Result]) -> Result:
    """The check's result: its failure where a model output it reads is NaN or Inf (the message
    says which output and where), not applicable where it ran out of memory, an ``error`` result
    where it raised anything else. An
    InputError (the setup itself is unfit: a streaming train set, a bad option) still stops the
    checks with its message."""
    try:
        return check()
    except NonFiniteError as error:
        return non_finite_result(name, str(error))
    except (torch.OutOfMemoryError, MemoryError) as error:
        # the check needs more memory than the setup leaves: said, and the rest still run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return Result.not_applicable(name, f"the check ran out of memory ({type(error).__name__}: "
                                     f"{str(error).splitlines()[0] if str(error) else 'no message'}): the setup "
                                     f"leaves too little free for it; free memory or give a smaller batch")
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 -- the check's outcome, with the exception and where
        return Result.from_exception(name, error)


def _root_causes_first(results: list[Result]) -> list[Result]:
    follows = {c.name: c.follows for c in CHECKS}
    failed = {r.name for r in results if r.status == "fail"}
    out = []
    for result in results:
        cause = next((c for c in follows.get(result.name, ()) if c in failed), None)
        if result.status == "fail" and cause is not None:
            result = dataclasses.replace(result, metrics={**result.metrics, "follows_from": cause},
                                         explanation=f"follows from {cause}, which failed first: {result.explanation}")
        out.append(result)
    return out


def _agree(results: list[Result]) -> list[Result]:
    """The same results on every rank: for each check, the failing rank's result (its
    explanation prefixed with the rank), else this rank's. Where several ranks fail, the one
    whose run differs first (``metrics["first_difference_step"]``: a fault on one rank spreads
    to the others through the all-reduce a step later), then the lowest."""
    if world_size() == 1:
        return results
    everyone = gathered([r.to_dict() for r in results])
    agreed = []
    for index, result in enumerate(results):
        failing = min((rank for rank, rows in enumerate(everyone) if rows[index]["status"] == "fail"),
                      key=lambda rank: (everyone[rank][index]["metrics"].get("first_difference_step", 0), rank),
                      default=None)
        if failing is None:
            agreed.append(result)
        else:
            row = everyone[failing][index]
            agreed.append(Result(name=result.name, passed=False, metrics={**row["metrics"], "rank": failing},
                                 explanation=f"on rank {failing}: {row['explanation']}"))
    return agreed

