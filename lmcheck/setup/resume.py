"""The resume family of the setup checks: ``resume`` (a run stopped at a checkpoint, saved with
the user's own checkpointing and resumed on fresh objects, or in a fresh Python process,
continues exactly as the run that was never stopped).

Three kinds of run, all of the user's own code, watched from outside:

1. the straight run: ``T`` optimizer steps from a fresh build;
2. the first half: the same, stopped at the last resume point, saving a checkpoint at each;
3. for each resume point ``n``: a fresh build (or a fresh process) that loads checkpoint ``n``
   and runs on to ``T``.

The resume points are one at the end of an epoch and one inside the next, with the epoch's last
accumulation partial where the setup accumulates. Compared bit for bit: the loss of every
micro-batch after ``n``, the examples each optimizer step trained on, and the whole state
(every parameter, every optimizer state tensor and hyperparameter, the scheduler, the grad
scaler and any other stateful object, every random generator, the gradients) just after ``n``
and at ``T``. The state is compared by digests of its bytes, one tensor at a time: no second copy
of it is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lmcheck._finite import non_finite_result
from lmcheck._ranks import fingerprint, gathered, rank, unwrap_parallel, world_size
from lmcheck.errors import InputError
from lmcheck.results import Result
from lmcheck.setup.order import row_keys

__all__ = ["Plan", "Resumable", "RunWatch", "Trace", "plan_for", "resume"]

RESUME_STEPS = 24  # the furthest epoch end the check resumes at, in optimizer steps
Piece = tuple[str, str]  # (digest, what a message shows of it)


@dataclass(frozen=True)
class Plan:
    """Where the check stops and resumes.

    Attributes:
        steps: ``T``, the optimizer steps of the straight run and of every resumed one.
        saves: the optimizer steps to resume from, in order.
        epoch_calls: micro-batches per epoch (``None`` where the epoch's length is unknown).
        calls_per_step: micro-batches per optimizer step.
        seed: the seed every build uses.
        examples: the Trainer's train set is cut to this many examples (``None``: as it is).
        note: what the plan could not cover, said in the result.
        calls_at: resume point -> the micro-batches the straight run had trained by then.
    """

    steps: int
    saves: tuple[int, ...]
    epoch_calls: int | None
    calls_per_step: int
    seed: int
    examples: int | None = None
    note: str = ""
    calls_at: Mapping[int, int] = field(default_factory=dict)

    def placed(self, straight: Trace) -> Plan:
        """The plan with the straight run's micro-batch count at each resume point."""
        return replace(self, calls_at={n: straight.calls_before(n) for n in self.saves})

    def epoch_after(self, calls: int) -> int:
        """The epoch the next micro-batch comes from, after ``calls`` of them."""
        return calls // self.epoch_calls if self.epoch_calls else 0

    def where(self, calls: int) -> str:
        """A resume point in words, from the micro-batches trained before it."""
        if not self.epoch_calls:
            return f"{calls} micro-batches in"
        epoch, into = divmod(calls, self.epoch_calls)
        if into == 0:
            return f"the end of epoch {epoch - 1}"
        return f"mid-epoch {epoch}, {into} of its {self.epoch_calls} micro-batches"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Plan:
        return cls(**{**values, "saves": tuple(values["saves"]),
                      "calls_at": {int(k): int(v) for k, v in values.get("calls_at", {}).items()}})


def plan_for(epoch_calls: int | None, calls_per_step: int, seed: int, *, examples: int | None = None,
             why_unknown: str = "") -> Plan:
    """The resume points: the first epoch's end and one step into the next; where the epoch is
    longer than :data:`RESUME_STEPS` steps or its length is unknown, one point inside the first."""
    k = max(1, calls_per_step)
    if epoch_calls:
        end = -(-epoch_calls // k)  # the step at (or just after) the first epoch's end
        if end <= RESUME_STEPS:
            return Plan(steps=end + 3, saves=(end, end + 1), epoch_calls=epoch_calls, calls_per_step=k,
                        seed=seed, examples=examples)
        why = f"an epoch is {end} optimizer steps, more than the {RESUME_STEPS} the check runs to"
    else:
        why = why_unknown or "the epoch's length is unknown"
    return Plan(steps=4, saves=(2,), epoch_calls=epoch_calls, calls_per_step=k, seed=seed, examples=examples,
                note=f"only a resume inside the first epoch was checked: {why}")


@dataclass
class Trace:
    """One run as the check saw it: the loss and the rows of every micro-batch, where each
    optimizer step ended, the state just after chosen steps, and lost micro-batches.

    Attributes:
        start: the optimizer steps taken before the run began (the resume point; 0 for a new run).
        losses: the loss of each micro-batch, in order.
        rows: the keys of each micro-batch's rows (unpadded ids).
        ends: after each optimizer step of the run, how many micro-batches the run had trained.
        states: step -> the state just after it (every piece: a digest and what a message shows).
        lost: where a gradient was zeroed before any optimizer step used it.
        generators: the random generators as the run began (one the run never draws from is
            not compared: its state does not matter).
    """

    start: int = 0
    losses: list[float] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    states: dict[int, dict[str, Piece]] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    generators: dict[str, Piece] = field(default_factory=dict)

    def step_calls(self, step: int) -> range:
        """The run's micro-batches (0-based) that made optimizer ``step`` (counted from the start)."""
        local = step - self.start - 1
        if not 0 <= local < len(self.ends):
            return range(0)
        return range(self.ends[local - 1] if local else 0, self.ends[local])

    def calls_before(self, step: int) -> int:
        """The micro-batches the run had trained when optimizer ``step`` was done."""
        local = step - self.start - 1
        return self.ends[local] if 0 <= local < len(self.ends) else 0

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["states"] = {str(k): {n: list(p) for n, p in v.items()} for k, v in self.states.items()}
        values["generators"] = {n: list(p) for n, p in self.generators.items()}
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Trace:
        states = {int(k): {n: (p[0], p[1]) for n, p in v.items()} for k, v in values["states"].items()}
        return cls(start=values["start"], losses=list(values["losses"]), rows=list(values["rows"]),
                   ends=list(values["ends"]), states=states, lost=list(values["lost"]),
                   generators={n: (p[0], p[1]) for n, p in values["generators"].items()})


class Resumable(Protocol):
    """A driver's three runs of the check, each on a fresh build of the user's setup.

    Attributes:
        factory: the setup's ``package.module:function``, where the resumed runs may go to a
            fresh process (None: fresh objects in this one).
        kind: ``"trainer"`` or ``"loop"``: what the fresh process builds.
    """

    factory: str | None
    kind: str

    def plan(self) -> Plan | str:
        """Where to resume, or why the check does not apply."""
        ...

    def straight(self, plan: Plan) -> Trace:
        """``plan.steps`` optimizer steps, the state kept just after each resume point and at the end."""
        ...

    def first_half(self, plan: Plan, folder: Path) -> Trace:
        """Up to the last resume point, saving a checkpoint at each into ``folder / f"step-{n}"``."""
        ...

    def resumed(self, plan: Plan, step: int, folder: Path) -> Trace:
        """A fresh build, checkpoint ``step`` loaded, on to ``plan.steps``."""
        ...


# ---------------------------------------------------------------- watching a run


class RunWatch:
    """Watches one run: counts the model's optimizer steps, keeps each micro-batch's loss and
    rows, the state just after the steps of ``capture`` (read at the next step, before it is
    taken) and at the end, and notes a ``zero_grad()`` that throws away a gradient no optimizer
    step has used (an epoch's partial accumulation, zeroed at the next epoch's start).

    ``others()`` gives the stateful objects beside the model and its optimizers, as (label,
    object) pairs: a scheduler, a grad scaler. The driver calls :meth:`begin_call` with each
    micro-batch (lmcheck's form) before the user's code runs on it and :meth:`end_call` with its
    loss."""

    def __init__(self, model: torch.nn.Module, *, start: int, capture: Sequence[int],
                 others: Callable[[], list[tuple[str, Any]]]) -> None:
        self.model, self.others = unwrap_parallel(model), others
        self.trace = Trace(start=start)
        self.capture = set(capture)
        self.optimizers: list[torch.optim.Optimizer] = []
        self._pending = False  # a gradient was accumulated since the last optimizer step
        self._pending_from = 0

    @property
    def step(self) -> int:
        """Optimizer steps taken, counting those before the run."""
        return self.trace.start + len(self.trace.ends)

    @property
    def calls(self) -> int:
        return len(self.trace.rows)

    def begin_call(self, batch: Mapping[str, torch.Tensor]) -> None:
        self.trace.rows.append(row_keys(batch))

    def end_call(self, loss: float) -> None:
        self.trace.losses.append(loss)

    def keep_state(self, step: int) -> None:
        self.trace.states[step] = state_pieces(self.model, self.optimizers, self.others())

    @contextlib.contextmanager
    def active(self) -> Iterator[RunWatch]:
        names = {id(p) for p in self.model.parameters()}
        primary: list[int] = []

        def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if not any(id(p) in names for group in optimizer.param_groups for p in group["params"]):
                return
            if optimizer not in self.optimizers:
                self.optimizers.append(optimizer)
            if not primary:
                primary.append(id(optimizer))
            if id(optimizer) != primary[0]:
                return
            if self.step in self.capture:
                self.keep_state(self.step)
            self.trace.ends.append(self.calls)
            self._pending = False

        def accumulated(parameter: torch.Tensor) -> None:
            if not self._pending:
                self._pending, self._pending_from = True, self.calls

        def zeroing(original: Callable[..., Any], owns: Callable[[Any], bool]) -> Callable[..., Any]:
            def zero_grad(this: Any, *args: Any, **kwargs: Any) -> Any:
                if self._pending and owns(this) and any(p.grad is not None and bool(p.grad.any())
                                                        for p in self.model.parameters()):
                    first, last = self._pending_from, self.calls
                    self.trace.lost.append(
                        f"the gradient of micro-batches {first}-{last} (after optimizer step {self.step}) was zeroed "
                        f"by {type(this).__name__}.zero_grad() during micro-batch {last} before any optimizer step "
                        f"used it" if first != last else
                        f"the gradient of micro-batch {first} (after optimizer step {self.step}) was zeroed by "
                        f"{type(this).__name__}.zero_grad() before any optimizer step used it")
                    self._pending = False
                return original(this, *args, **kwargs)

            return zero_grad

        optimizer_zero, module_zero = torch.optim.Optimizer.zero_grad, torch.nn.Module.zero_grad
        handles = [register_optimizer_step_pre_hook(before_step)]
        handles += [p.register_post_accumulate_grad_hook(accumulated) for p in self.model.parameters()
                    if p.requires_grad]
        torch.optim.Optimizer.zero_grad = zeroing(  # type: ignore[method-assign]
            optimizer_zero, lambda o: any(id(p) in names for g in o.param_groups for p in g["params"]))
        torch.nn.Module.zero_grad = zeroing(  # type: ignore[method-assign]
            module_zero, lambda m: any(id(p) in names for p in m.parameters()))
        self.trace.generators = _generators()
        try:
            with deterministic():
                yield self
        finally:
            torch.optim.Optimizer.zero_grad = optimizer_zero  # type: ignore[method-assign]
            torch.nn.Module.zero_grad = module_zero  # type: ignore[method-assign]
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic algorithms on (a warning, not an error, where an op has none), as they were after."""
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def state_pieces(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                 others: Sequence[tuple[str, Any]]) -> dict[str, Piece]:
    """Every piece of a run's state, named, in the order a cause is looked for: the parameters,
    the optimizers' state and hyperparameters, the other stateful objects, the random
    generators, then the gradients (which follow from all of them)."""
    pieces: dict[str, Piece] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for name, parameter in model.named_parameters():
        pieces[f"parameter `{name}`"] = _piece(parameter)
    for number, optimizer in enumerate(optimizers):
        label = "optimizer" if len(optimizers) == 1 else f"optimizer {number}"
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved = optimizer.state_dict()
        for index, values in saved["state"].items():
            owner = names.get(id(params[index]), f"#{index}") if index < len(params) else f"#{index}"
            for key, value in values.items():
                pieces[f"{label} state `{key}` of `{owner}`"] = _piece(value)
        for group_number, group in enumerate(saved["param_groups"]):
            for key, value in group.items():
                if key != "params":
                    pieces[f"{label} group {group_number}: `{key}`"] = _piece(value)
    for label, item in others:
        if item is not None and hasattr(item, "state_dict"):
            for key, value in _flat(item.state_dict()):
                pieces[f"{label}: `{key}`"] = _piece(value)
    pieces.update(_generators())
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            pieces[f"the gradient of `{name}`"] = _piece(parameter.grad)
    return pieces


def _flat(values: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(values, Mapping):
        for key, value in values.items():
            yield from _flat(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, values


def _piece(value: Any) -> Piece:
    """(a digest, what a message shows): a tensor by its bytes and its norm, anything else by value."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            shown = repr(value.item())
            return f"{value.dtype}:{shown}", shown
        norm = float(value.detach().double().norm()) if value.is_floating_point() else None
        return fingerprint(value), "norm " + (f"{norm:.6g}" if norm is not None else "?") + f", shape {tuple(value.shape)}"
    if value is None:
        return "none", "absent"
    shown = repr(value)
    return hashlib.sha1(shown.encode()).hexdigest()[:16], shown if len(shown) <= 60 else shown[:57] + "..."


def _generators() -> dict[str, Piece]:
    pieces = {"the torch generator": (fingerprint(torch.get_rng_state()), ""),
              "the Python generator": (hashlib.sha1(repr(random.getstate()).encode()).hexdigest()[:16], "")}
    try:
        import numpy

        kind, keys, position, *rest = numpy.random.get_state(legacy=True)
        digest = hashlib.sha1(numpy.asarray(keys).tobytes() + repr((kind, position, rest)).encode()).hexdigest()[:16]
        pieces["the NumPy generator"] = (digest, "")
    except ImportError:  # numpy is optional
        pass
    if torch.cuda.is_available():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            pieces[f"the CUDA generator of device {device}"] = (fingerprint(state), "")
    return pieces


# ---------------------------------------------------------------- the check


def resume(resumable: Resumable | str) -> Result:
    """The straight run, the first half and every resumed run of ``resumable``, judged. Under
    torchrun every rank runs its part into one folder (rank 0's), and a fresh process is not
    started (the ranks' process group lives in this one)."""
    name = "resume"
    if isinstance(resumable, str):
        return Result.not_applicable(name, resumable)
    plan = resumable.plan()
    if isinstance(plan, str):
        return Result.not_applicable(name, plan)
    fresh = resumable.factory is not None and world_size() == 1
    straight = resumable.straight(plan)
    plan = plan.placed(straight)
    with shared_folder() as folder:
        first = resumable.first_half(plan, folder)
        resumed = {n: (in_fresh_process(resumable, plan, n, folder) if fresh else resumable.resumed(plan, n, folder))
                   for n in plan.saves}
    return judge(plan, straight, first, resumed, fresh=fresh)


@contextlib.contextmanager
def shared_folder() -> Iterator[Path]:
    """A temporary folder for the checkpoints: rank 0's under torchrun, the same path on every rank."""
    made = tempfile.TemporaryDirectory(prefix="lmcheck-resume-") if rank() == 0 else None
    path = gathered(made.name if made is not None else None)[0]
    try:
        yield Path(path)
    finally:
        if world_size() > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank is done with the checkpoints before rank 0 removes them
        if made is not None:
            made.cleanup()


def judge(plan: Plan, straight: Trace, first: Trace, resumed: Mapping[int, Trace], *, fresh: bool) -> Result:
    name = "resume"
    how = "in a fresh process" if fresh else "on fresh objects"
    runs = (straight, first, *resumed.values())
    metrics: dict[str, Any] = {"steps": plan.steps, "resumed_from": list(plan.saves), "fresh_process": fresh,
                               "micro_batches_per_epoch": plan.epoch_calls,
                               "optimizer_steps": sum(len(t.ends) for t in runs)}
    if fresh:  # the resumed runs' steps, taken in other processes
        metrics["steps_elsewhere"] = sum(len(t.ends) for t in resumed.values())
    for label, trace in (("the straight run", straight), ("the first half", first), *(
            (f"the run resumed from step {n}", t) for n, t in resumed.items())):
        bad = next((i for i, v in enumerate(trace.losses) if not math.isfinite(v)), None)
        if bad is not None:
            return non_finite_result(name, f"{label}: the loss of its micro-batch {bad} is {trace.losses[bad]}",
                                     **metrics)
    if straight.lost:
        return Result(name=name, passed=False, metrics={**metrics, "lost": straight.lost},
                      explanation=f"{straight.lost[0]}: that micro-batch's data never reaches the model, in the "
                                  f"straight run as in a resumed one (an epoch's partial accumulation zeroed at the "
                                  f"next epoch's start, ultralytics PR #11217)")
    end = straight.states.get(plan.steps, {})
    unused = {n for n, piece in straight.generators.items() if end.get(n) == piece}  # never drawn from
    problems = []
    twice = _first_difference(straight, first, 1, max(plan.saves))[1]
    if twice is not None:
        problems.append(f"built twice, the setup does not repeat its own first steps ({twice}), so no resume can "
                        f"match; see reproducible")
    for n in plan.saves[:-1]:
        changed = _state_difference(straight.states.get(n), first.states.get(n), unused)
        if twice is None and changed is not None:
            problems.append(f"saving a checkpoint at step {n} changed the run: just after it, {changed}")
    first_step: int | None = None  # where a run first differs (a resume point where its state does)
    for n, trace in resumed.items():
        where = plan.where(plan.calls_at[n])
        step, difference = _first_difference(straight, trace, n + 1, plan.steps)
        found = [difference] if difference is not None else []
        # the gradients at the first step follow from its data, the parameters and the generators:
        # named only where nothing before them differs
        at_load = _state_difference(straight.states.get(n), trace.states.get(n), unused, gradients=not found)
        at_end = _state_difference(straight.states.get(plan.steps), trace.states.get(plan.steps), unused)
        if at_load is not None:
            found.append(f"just after loading, {at_load}")
            step = n
        if step is not None:
            first_step = step if first_step is None else min(first_step, step)
        if at_end is not None and at_load is None:
            found.append(f"at step {plan.steps}, {at_end}")
        if found:
            problems.append(f"resumed from step {n} ({where}) {how}: " + "; ".join(found))
    if first_step is not None:
        metrics["first_difference_step"] = first_step
    passed = not problems
    points = " and ".join(f"{n} ({plan.where(plan.calls_at[n])})" for n in plan.saves)
    explanation = (f"resumed {how} from step {points}, every run continues as the straight run to step "
                   f"{plan.steps}: the same losses bit for bit, the same examples, the same parameters, optimizer, "
                   f"scheduler and random generators" if passed else "; ".join(problems))
    if plan.note:
        explanation += f" ({plan.note})"
    return Result(name=name, passed=passed, metrics=metrics, explanation=explanation)


def _first_difference(straight: Trace, other: Trace, first: int, last: int) -> tuple[int | None, str | None]:
    """The first optimizer step in first..last where ``other`` trained on other rows or had
    another loss than the straight run, and what differs in words; (None, None) where none does."""
    for step in range(first, last + 1):
        mine, theirs = straight.step_calls(step), other.step_calls(step)
        if not theirs:
            return step, f"it never reached step {step}"
        rows = [straight.rows[i] for i in mine], [other.rows[i] for i in theirs]
        if rows[0] != rows[1]:
            return step, f"step {step} trained on {_rows(straight, step, other.start, rows[1], rows[0])}"
        losses = [straight.losses[i] for i in mine], [other.losses[i] for i in theirs]
        if losses[0] != losses[1]:
            where = next((i for i, (a, b) in enumerate(zip(*losses, strict=False)) if a != b), 0)
            return step, (f"step {step}'s loss is {losses[1][where]!r} where the straight run has "
                          f"{losses[0][where]!r}" + (f" (micro-batch {where + 1} of {len(losses[0])})"
                                                    if len(losses[0]) > 1 else ""))
    return None, None


def _rows(straight: Trace, step: int, resumed_at: int, theirs: list[list[str]], mine: list[list[str]]) -> str:
    """What ``step`` trained on instead of the straight run's rows: when the straight run trained
    on those rows (the last time up to ``step``, else the next), told by the digests of their ids."""
    flat = [k for batch in theirs for k in batch], [k for batch in mine for k in batch]
    if sorted(flat[0]) == sorted(flat[1]):
        return "the straight run's rows in another order"
    other = [k for k in flat[0] if k not in set(flat[1])]
    seen: dict[str, list[int]] = {}
    for number in range(straight.start + 1, straight.start + len(straight.ends) + 1):
        for call in straight.step_calls(number):
            for key in straight.rows[call]:
                seen.setdefault(key, []).append(number)
    when = sorted({max((s for s in seen[k] if s <= step), default=min(seen[k])) for k in other if k in seen})
    said = f"{len(other)} of its {len(flat[0])} rows other than the straight run's"
    if not when:
        return said + " (rows the straight run never trained on)"
    how = " (replayed)" if when[-1] <= resumed_at else " (skipped ahead)" if when[0] > step else ""
    return said + f": the straight run trained on them at step{'s' if len(when) > 1 else ''} " \
        f"{', '.join(map(str, when))}{how}"


def _state_difference(mine: Mapping[str, Piece] | None, theirs: Mapping[str, Piece] | None,
                      unused: set[str], *, gradients: bool = True) -> str | None:
    """The first piece of state that differs (the ``unused`` generators, and the gradients
    unless ``gradients``, aside), and how many more, in words; None where all agree."""
    if mine is None or theirs is None:
        return None if mine is None and theirs is None else "the state was not seen"
    skip = unused | ({n for n in {**mine, **theirs} if n.startswith("the gradient of")} if not gradients else set())
    differ = [n for n in mine if n not in skip and theirs.get(n, ("absent", "absent"))[0] != mine[n][0]]
    differ += [n for n in theirs if n not in mine and n not in skip]
    if not differ:
        return None
    first = differ[0]
    have, had = theirs.get(first, ("absent", "absent"))[1], mine.get(first, ("absent", "absent"))[1]
    said = f"{first} differs" + (f": {have} where the straight run has {had}" if have != had else
                                 "" if not have else f" ({have} in both)")
    if len(differ) > 1:
        kinds = sorted({_kind(n) for n in differ[1:]})
        said += f" (and {len(differ) - 1} more: {', '.join(kinds)})"
    return said


def _kind(piece: str) -> str:
    for kind in ("parameter", "optimizer", "gradient", "generator"):
        if kind in piece:
            return {"parameter": "parameters", "optimizer": "optimizer state", "gradient": "gradients",
                    "generator": "random generators"}[kind]
    return piece.split(":")[0]


# ---------------------------------------------------------------- a fresh process


def in_fresh_process(resumable: Resumable, plan: Plan, step: int, folder: Path) -> Trace:
    """The resumed run from checkpoint ``step`` in a new Python process that builds the setup
    with ``resumable.factory`` (this process's import path and thread count)."""
    job = folder / f"job-{step}.json"
    out = folder / f"trace-{step}.json"
    job.write_text(json.dumps({"factory": resumable.factory, "kind": resumable.kind, "plan": plan.to_dict(),
                               "step": step, "folder": str(folder), "out": str(out),
                               "threads": torch.get_num_threads()}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    command = "import sys; from lmcheck.setup.resume import _fresh_process; _fresh_process(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", command, str(job)], capture_output=True, text=True, env=env,
                          cwd=os.getcwd(), check=False)
    if done.returncode != 0 or not out.is_file():
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise InputError(f"the resumed run from step {step} in a fresh process ({resumable.factory}) failed "
                         f"with exit status {done.returncode}: {tail}")
    return Trace.from_dict(json.loads(out.read_text()))


def _fresh_process(job_file: str) -> None:
    """The fresh process's part: build the setup, load the checkpoint, run on, write the trace."""
    job = json.loads(Path(job_file).read_text())
    torch.set_num_threads(int(job["threads"]))
    from lmcheck.batteries import load_setup

    plan = Plan.from_dict(job["plan"])
    setup, _ = load_setup(job["factory"], seed=plan.seed)
    made: Resumable
    if job["kind"] == "trainer":
        from lmcheck.setup.trainer import TrainerResume

        trainer = setup["trainer"] if isinstance(setup, Mapping) else setup
        made = TrainerResume(trainer, lambda seed: trainer, factory=None)
    else:
        from lmcheck.setup.loop import LoopResume

        made = LoopResume(lambda seed: setup, plan.seed, None, factory=None)
    trace = made.resumed(plan, int(job["step"]), Path(job["folder"]))
    Path(job["out"]).write_text(json.dumps(trace.to_dict()))

