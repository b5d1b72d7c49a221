"""Probes of a data-parallel training setup: what no single-process check can see.

Each probe is called on every rank of an initialized ``torch.distributed`` process group (launched
by ``torchrun``, ``accelerate launch`` or ``torch.multiprocessing``), gathers what it needs from
all ranks, and returns the same :class:`~lmcheck.results.Result` on every rank: a check that fails
on one rank fails everywhere, and its explanation names the rank and the step.

==========================  ====================================================================
``same_init``               every rank holds the same weights (per-rank seeds before building
                            the model: transformers #37932)
``data_sharding``           in each epoch the ranks see disjoint examples that together cover
                            the data, in a new order each epoch (``set_epoch`` never called:
                            pytorch #31771; samplers seeded by rank: LongLive #71)
``grads_synchronized``      at each optimizer step the gradients, and after it the parameters,
                            are identical on every rank (an inverted ``no_sync``: FunASR #3472,
                            build-nanogpt #30)
``ddp_matches_single``      the synchronized gradient of the first step equals one process's
                            gradient of the mean loss over every rank's tokens (the loss scaled
                            by the world size: sparseml #135)
``rank_randomness``         dropout masks differ across ranks while the weights do not (one
                            constant seed on every rank: transformers #31412)
==========================  ====================================================================

The user's step and batches are run as they are, under the optimizer-step hook of
``lmcheck._recording``; weights, optimizer state and random generators are put back afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from lmcheck._finite import probe, require_finite
from lmcheck._model import (
    has_dropout,
    model_device,
    model_forward,
    no_dropout,
    parameter_dtype,
    token_loss_sum,
)
from lmcheck._ranks import fingerprint, gathered, local, rank_and_world, unwrap_parallel
from lmcheck._recording import Recorder, Snapshot, rng_state, set_rng_state
from lmcheck._validate import check_callable, check_int, check_model, check_number
from lmcheck.errors import InputError, LmcheckError, NotApplicableError
from lmcheck.results import Result, headroom_below
from lmcheck.setup.batches import converter, loss_value, take, users_code
from lmcheck.setup.order import epoch_keys

__all__ = ["SyncWatch", "data_sharding", "ddp_matches_single", "grads_synchronized", "rank_randomness", "same_init"]

# Relative L2 error allowed between DDP's synchronized gradient and one process's, by dtype.
# Gloo's all-reduce sums in another order than one backward does: on a 2-core x86 CPU the two
# differed by below 1e-6 in float32. A world-size factor or a per-rank normalisation moves the
# gradient by 10% or more.
DDP_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def _check_as_batch(as_batch: object) -> None:
    if as_batch is not None:
        check_callable(as_batch, "as_batch", "a function from one of the user's batches to a mapping "
                       "with 'input_ids' and 'labels' or 'targets'")


def _differences(prints: list[dict[str, str]], what: str) -> list[str]:
    """One line per rank whose fingerprints differ from rank 0's."""
    lines = []
    for rank in range(1, len(prints)):
        differ = [n for n in prints[0] if prints[rank].get(n) != prints[0][n]]
        if differ:
            lines.append(f"rank {rank}'s {what} differ from rank 0's for {len(differ)} of {len(prints[0])} "
                         f"parameters (first: {differ[0]})")
    return lines


@probe("same_init")
def same_init(model: torch.nn.Module) -> Result:
    """Every rank holds the same parameters and buffers, bit for bit.

    Call it where the weights are first made, before DistributedDataParallel wraps the model:
    DDP broadcasts rank 0's weights when it wraps, which hides different initial weights from
    this probe but not from FSDP, hand-written all-reduce or the data each rank saw before.
    """
    check_model(model)
    _, world = rank_and_world()
    inner = unwrap_parallel(model)
    prints = gathered({n: fingerprint(t) for n, t in [*inner.named_parameters(), *inner.named_buffers()]})
    problems = _differences(prints, "weights")
    passed = not problems
    return Result(name="same_init", passed=passed, metrics={"world_size": world, "ranks_differing": len(problems)},
                  explanation=(f"all {world} ranks hold the same {len(prints[0])} tensors" if passed else
                               "; ".join(problems) + ": each rank initialised with its own seed (transformers "
                               "#37932); seed identically before building the model"))


@probe("data_sharding")
def data_sharding(batches_of_epoch: Callable[[int], Iterable[Any]], *, epochs: int = 2,
                  as_batch: Callable[[Any], Mapping[str, torch.Tensor]] | None = None,
                  max_rows: int = 4096) -> Result:
    """In each epoch the ranks see disjoint examples that together cover the data, and each rank
    sees a new order each epoch.

    ``batches_of_epoch(epoch)`` is what the user's loop does at the start of an epoch and the
    batches it then iterates, e.g. ``lambda e: (sampler.set_epoch(e), loader)[1]``: a loop that
    forgets ``set_epoch`` gives ``lambda e: loader``, and this probe sees the same order twice.
    Rows are told apart by their token ids; at most ``max_rows`` rows per rank and epoch are read.
    A ``DistributedSampler`` pads the last round with repeated rows: up to world size - 1 rows on
    two ranks are allowed.
    """
    check_callable(batches_of_epoch, "batches_of_epoch", "a function from the epoch number to its batches")
    check_int(epochs, "epochs", 2, 100)
    check_int(max_rows, "max_rows", 1)
    _check_as_batch(as_batch)
    _, world = rank_and_world()
    convert = converter(as_batch)
    orders = []
    for epoch in range(epochs):
        batches = users_code(f"'batches_of_epoch({epoch})'", batches_of_epoch, epoch)
        orders.append(epoch_keys(batches, convert, max_rows)[0])
    everyone = gathered(orders)  # [rank][epoch] -> keys
    problems = []
    for epoch in range(epochs):
        owners: dict[str, list[int]] = {}
        for r in range(world):
            for key in set(everyone[r][epoch]):
                owners.setdefault(key, []).append(r)
        shared = [k for k, rs in owners.items() if len(rs) > 1]
        if len(shared) > world - 1:
            ranks = owners[shared[0]]
            problems.append(f"in epoch {epoch} {len(shared)} examples are seen by more than one rank (first: "
                            f"on ranks {ranks[0]} and {ranks[1]}): the ranks' samplers do not share one seed "
                            f"(a DistributedSampler seeded by rank: LongLive #71), so examples overlap and "
                            f"others are skipped")
            break
    for r in range(world):
        repeats = [e + 1 for e in range(1, epochs) if everyone[r][e] == everyone[r][0]]
        if repeats:
            problems.append(f"rank {r} sees the same {len(everyone[r][0])} rows in the same order in epochs 0 and "
                            f"{repeats[0] - 1}: the sampler is not reshuffled each epoch "
                            f"(DistributedSampler.set_epoch never called: pytorch #31771)")
            break
    sizes = [len(set().union(*(set(everyone[r][e]) for r in range(world)))) for e in range(epochs)]
    if len(set(sizes)) > 1:
        problems.append(f"the ranks together see {sizes[0]} examples in epoch 0 but {sizes[1]} in epoch 1: "
                        f"some are skipped")
    passed = not problems
    rows = [len(everyone[r][0]) for r in range(world)]
    return Result(name="data_sharding", passed=passed,
                  metrics={"world_size": world, "rows_per_rank": rows, "examples": sizes[0]},
                  explanation=(f"{world} ranks see disjoint shares ({', '.join(map(str, rows))} rows) of "
                               f"{sizes[0]} examples, in a new order each of {epochs} epochs"
                               if passed else "; ".join(problems)))


def _run_steps(model: torch.nn.Module, train_step: Callable[[Any], Any], batches: Sequence[Any], steps: int,
               grad_steps: int = 0) -> tuple[Recorder, Snapshot]:
    """Call the user's step on the batches (cycling) until ``steps`` optimizer steps; the state
    is restored afterwards by the caller through the returned snapshot (here if the step raises)."""
    inner = unwrap_parallel(model)  # names without DDP's "module." prefix
    snapshot = Snapshot(inner)
    recorder = Recorder(inner, grad_steps=grad_steps, on_first_sight=snapshot.add)
    calls = 0
    try:
        with recorder.active():
            while len(recorder.steps) < steps:
                if calls >= 64 * steps:
                    raise InputError(f"'train_step' took {calls} calls without {steps} optimizer steps")
                recorder.calls += 1
                try:
                    loss = train_step(batches[calls % len(batches)])
                except LmcheckError:
                    raise
                except Exception as error:  # the user's code, with the traceback chained
                    raise InputError(f"'train_step' raised {type(error).__name__} on batch "
                                     f"{calls % len(batches)}: {error}") from error
                loss_value(loss, f"'train_step' on batch {calls % len(batches)}")
                calls += 1
    except BaseException:
        snapshot.restore()  # the user's step raised: their model and optimizer as they were
        raise
    return recorder, snapshot


@probe("grads_synchronized")
def grads_synchronized(model: torch.nn.Module, train_step: Callable[[Any], Any], batches: Iterable[Any], *,
                       steps: int = 3, max_grad_norm: float | None = None) -> Result:
    """Over ``steps`` optimizer steps of the user's loop, the gradients at each step and the
    parameters after it are identical on every rank (for FSDP2's sharded tensors: the gathered
    whole), and, with ``max_grad_norm``, the gradient the optimizer applies has a global norm of
    at most ``max_grad_norm``: clipping measured the norm over every shard, not its own. The
    model is put back afterwards."""
    check_model(model)
    check_callable(train_step, "train_step", "the user's step function: train_step(batch) -> loss")
    check_int(steps, "steps", 1, 1000)
    if max_grad_norm is not None:
        check_number(max_grad_norm, "max_grad_norm", low=0)
    _, world = rank_and_world()
    taken = take(batches, 64 * steps, "batches")
    watch = SyncWatch(unwrap_parallel(model), max_grad_norm)
    with watch.active():
        recorder, snapshot = _run_steps(model, train_step, taken, steps)
    snapshot.restore()
    return watch.result()


class SyncWatch:
    """While active, hooks every step of an optimizer over ``model``'s parameters: before it,
    the gradients' fingerprints and global norm; after it, whether the gradients, and then the
    parameters, agree across ranks (and, with ``max_grad_norm``, the applied norm stays within it).
    Every rank must take the same steps: each hook gathers from all of them."""

    def __init__(self, model: torch.nn.Module, max_grad_norm: float | None = None) -> None:
        self.model, self.max_grad_norm = model, max_grad_norm
        self.problems: list[str] = []
        self.pending: list[dict[str, str]] = []
        self.norms: list[tuple[float, list[float]]] = []  # per step: the global norm, each rank's own

    def _owns(self, optimizer: torch.optim.Optimizer) -> bool:
        names = {id(p) for p in self.model.parameters()}
        return any(id(p) in names for g in optimizer.param_groups for p in g["params"])

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._owns(optimizer):
            return
        for name, parameter in self.model.named_parameters():
            if parameter.grad is not None:  # equal NaNs on every rank are no synchronisation
                require_finite(local(parameter.grad), f"at optimizer step {len(self.pending) + 1}, the "
                               f"gradient of {name}", ("index",) * parameter.dim())
        self.pending.append({n: fingerprint(p.grad) for n, p in self.model.named_parameters()})
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        own = gathered(sum((float(local(g).float().pow(2).sum()) for g in grads), 0.0) ** 0.5)
        sharded = any(local(g) is not g for g in grads)  # FSDP2: the shards add up; DDP: replicas
        self.norms.append(((sum(n * n for n in own) ** 0.5) if sharded else own[0], own))

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._owns(optimizer):
            return
        step = len(self.pending)
        grads = _differences(gathered(self.pending[-1]), "gradients")
        weights = _differences(gathered({n: fingerprint(p) for n, p in self.model.named_parameters()}),
                               "parameters")
        total, each = self.norms[-1]
        if self.problems:
            return
        if grads:
            self.problems.append(f"at optimizer step {step}, {grads[0]}: gradients stayed rank-local, so each "
                                 f"rank trains its own model (an inverted no_sync condition, or the sync flag "
                                 f"set after the forward: FunASR #3472, build-nanogpt #30)")
        elif weights:
            self.problems.append(f"after optimizer step {step}, {weights[0]}")
        elif self.max_grad_norm is not None and total > self.max_grad_norm * (1 + 1e-4) + 1e-6:
            self.problems.append(f"at optimizer step {step} the gradient applied has a global norm of {total:.4g}, "
                                 f"above max_grad_norm={self.max_grad_norm:g} (the ranks' own parts: "
                                 f"{', '.join(f'{n:.3g}' for n in each)}): each rank clipped its shard by its "
                                 f"own norm, not the global one (pytorch #170862)")

    @contextmanager
    def active(self) -> Iterator[SyncWatch]:
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        handles = [register_optimizer_step_pre_hook(self._before), register_optimizer_step_post_hook(self._after)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def result(self) -> Result:
        world = dist.get_world_size()
        steps = len(self.pending)
        clipped = (f"; the applied gradient's global norm stays within max_grad_norm={self.max_grad_norm:g} "
                   f"({', '.join(f'{n:.3g}' for n, _ in self.norms)})" if self.max_grad_norm is not None else "")
        return Result(name="grads_synchronized", passed=not self.problems,
                      metrics={"world_size": world, "steps": steps, "global_grad_norms": [n for n, _ in self.norms]},
                      explanation=self.problems[0] if self.problems else
                      f"at each of {steps} optimizer steps the gradients and then the parameters are identical on "
                      f"all {world} ranks{clipped}")


@probe("ddp_matches_single")
def ddp_matches_single(model: torch.nn.Module, train_step: Callable[[Any], Any], batches: Iterable[Any], *,
                       as_batch: Callable[[Any], Mapping[str, torch.Tensor]] | None = None) -> Result:
    """The gradient DDP applies at the user's first optimizer step equals one process's gradient
    of the mean loss over every supervised token of every rank's micro-batches of that step.

    Every rank's micro-batches are gathered; the reference runs on each rank with the module
    inside DDP, its weights as before the step, and dropout off (the user's step runs with dropout
    off too, so both sides see the same network). The model is put back afterwards.
    """
    check_model(model)
    check_callable(train_step, "train_step", "the user's step function: train_step(batch) -> loss")
    _check_as_batch(as_batch)
    _, world = rank_and_world()
    taken = take(batches, 64, "batches")
    inner = unwrap_parallel(model)
    convert = converter(as_batch)
    with no_dropout(inner):
        recorder, snapshot = _run_steps(model, train_step, taken, 1, grad_steps=1)
    step = recorder.steps[0]
    local = [{k: v.cpu() for k, v in convert(taken[i % len(taken)], i).items()} for i in range(step.micro_batches)]
    everyone = gathered(local)
    snapshot.restore()
    names = [n for n, p in inner.named_parameters() if p.requires_grad]
    parameters = [p for n, p in inner.named_parameters() if p.requires_grad]
    try:
        rank_sums, per_rank_tokens = _rank_gradients(inner, parameters, everyone)
    finally:
        snapshot.restore()
    total = None
    for rank_sum in rank_sums:
        total = rank_sum if total is None else total + rank_sum
    tokens = sum(per_rank_tokens)
    if total is None or tokens == 0:
        raise NotApplicableError("the first step's micro-batches supervise no token")
    reference = total / tokens
    grads_at_step = step.grads or {}
    user = torch.cat([_or_zeros(grads_at_step.get(n), p).to(reference.device)
                      for n, p in zip(names, parameters, strict=True)])
    require_finite(user, "the synchronized gradient at the first optimizer step", ("index",))
    tol = DDP_RTOL.get(parameter_dtype(inner), DDP_RTOL[torch.float32])
    error = float((user - reference).norm() / max(float(reference.norm()), 1e-30))
    scale = float(user @ reference) / max(float(reference.norm()) ** 2, 1e-30)
    residual = float((user - scale * reference).norm()) / max(float(user.norm()), 1e-30)
    metrics = {"world_size": world, "relative_error": error, "scale": scale, "tokens_per_rank": per_rank_tokens}
    explanation = _ddp_explanation(user, rank_sums, per_rank_tokens, world, error, scale, residual, tol)
    return Result(name="ddp_matches_single", passed=error <= tol, metrics=metrics, threshold=tol,
                  headroom=headroom_below(error, tol), explanation=explanation)


def _ddp_explanation(user: torch.Tensor, rank_sums: Sequence[torch.Tensor], per_rank_tokens: Sequence[int],
                     world: int, error: float, scale: float, residual: float, tol: float) -> str:
    """What ddp_matches_single says: equal; the world-size factor; another scale; or, where each
    rank's own mean fits, the per-rank normalisation."""
    counted = f"{world} ranks supervising {', '.join(map(str, per_rank_tokens))} tokens"
    if error <= tol:
        return (f"the synchronized gradient over {counted} equals one process's gradient of the mean loss "
                f"over all of them (relative error {error:.1e}, allowed {tol:g})")
    if residual <= tol and abs(scale - world) <= 1e-2 * world:
        return (f"the synchronized gradient over {counted} is {scale:.3g} times one process's: the loss is "
                f"multiplied by the world size while DDP already averages the gradients (sparseml #135)")
    if residual <= tol:
        return (f"the synchronized gradient over {counted} points the right way but is {scale:.3g} times "
                f"one process's gradient")
    per_rank = torch.stack([g / max(c, 1) for g, c in zip(rank_sums, per_rank_tokens, strict=True)]).mean(0)
    fitted = float((user - per_rank).norm() / max(float(per_rank.norm()), 1e-30))
    return (f"the synchronized gradient over {counted} differs from one process's by {error:.3g} "
            f"(relative, allowed {tol:g})"
            + (": each rank normalises by its own token count and DDP averages the ranks, so a "
               "rank with few tokens weighs as much as one with many; divide the summed loss by the "
               "global token count times the world size" if fitted <= tol else ""))


def _rank_gradients(inner: torch.nn.Module, parameters: Sequence[torch.Tensor],
                    everyone: Sequence[Sequence[Mapping[str, torch.Tensor]]]) -> tuple[list[torch.Tensor], list[int]]:
    """Each rank's micro-batches' summed-loss gradient (flat, float32) and supervised tokens,
    computed here with dropout off: one process's view of every rank's share of the step."""
    device = model_device(inner)
    rank_sums: list[torch.Tensor] = []
    per_rank_tokens: list[int] = []
    with no_dropout(inner):
        inner.train()
        for rank_batches in everyone:
            rank_total = None
            rank_tokens = 0
            for batch in rank_batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits, _ = model_forward(inner, batch["input_ids"], batch.get("attention_mask"), None,
                                          use_cache=False, what="the logits of a gathered micro-batch")
                summed, count, _ = token_loss_sum(logits, batch)
                require_finite(summed.detach(), "the reference loss of a gathered micro-batch", ())
                grads = torch.autograd.grad(summed, list(parameters), allow_unused=True)
                flat = torch.cat([_or_zeros(g, p) for p, g in zip(parameters, grads, strict=True)])
                rank_total = flat if rank_total is None else rank_total + flat
                rank_tokens += count
            if rank_total is None:
                raise NotApplicableError("a rank took its first optimizer step before any micro-batch")
            rank_sums.append(rank_total)
            per_rank_tokens.append(rank_tokens)
    return rank_sums, per_rank_tokens


def _or_zeros(grad: torch.Tensor | None, parameter: torch.Tensor) -> torch.Tensor:
    """A gradient flattened in float32; zeros for a parameter that got none."""
    return (torch.zeros_like(parameter) if grad is None else grad).float().reshape(-1)


@probe("rank_randomness")
def rank_randomness(model: torch.nn.Module, batch: Any, *,
                    as_batch: Callable[[Any], Mapping[str, torch.Tensor]] | None = None,
                    sample: Callable[[], Any] | None = None) -> Result:
    """Dropout masks (and, with ``sample``, the data-side randomness it draws) differ across
    ranks, while the weights are the same on every rank.

    Each rank runs one forward in training mode on rank 0's batch with its own random state as
    the user's seeding left it; the random state is put back afterwards. Not applicable to a model
    with no dropout and no ``sample`` given.
    """
    check_model(model)
    if sample is not None:
        check_callable(sample, "sample", "a function that draws the data-side randomness")
    _check_as_batch(as_batch)
    _, world = rank_and_world()
    inner = unwrap_parallel(model)
    weights = _differences(gathered({n: fingerprint(p) for n, p in inner.named_parameters()}), "weights")
    shared = gathered(converter(as_batch)(batch, 0) if dist.get_rank() == 0 else None)[0]
    state = rng_state()
    problems = list(weights)
    draws: list[str] = []
    try:
        if has_dropout(inner):
            was = inner.training
            inner.train()
            with torch.no_grad():
                device = model_device(inner)
                logits, _ = model_forward(inner, shared["input_ids"].to(device), None, None, use_cache=False,
                                          what="the logits with dropout on")
            inner.train(was)
            require_finite(logits, "the logits with dropout on", ("row", "position", "token id"))
            masks = gathered(fingerprint(logits))
            if len(set(masks)) < world:
                same = [r for r in range(1, world) if masks[r] == masks[0]]
                problems.append(f"rank {same[0]} draws the same dropout masks as rank 0: every rank was seeded with "
                                f"one constant (set_seed(42) on each rank: transformers #31412); seed each rank "
                                f"with seed + rank after the model is built")
            draws.append("dropout masks")
        if sample is not None:
            try:
                drawn = torch.as_tensor(sample())
            except LmcheckError:
                raise
            except Exception as error:  # the user's code
                raise InputError(f"'sample' must return numbers or a tensor (it raised "
                                 f"{type(error).__name__}: {error})") from error
            values = gathered(fingerprint(drawn))
            if len(set(values)) < world:
                problems.append("sample() draws the same values on two ranks: the data-side randomness "
                                "(augmentation, worker seeds) ignores the rank (transformers #37932)")
            draws.append("data-side draws")
    finally:
        set_rng_state(state)
    if not draws:
        raise NotApplicableError("the model has no dropout and no sample() was given: nothing random to compare")
    passed = not problems
    return Result(name="rank_randomness", passed=passed, metrics={"world_size": world},
                  explanation=(f"{' and '.join(draws)} differ across {world} ranks; the weights are the same"
                               if passed else "; ".join(problems)))

