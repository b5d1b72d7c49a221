"""The guard under data parallelism: one plain DDP loop per scenario, each wrapped in
``lmcheck.watch``.

Run on every rank by ``torchrun --standalone --nproc_per_node 2 tests/watch_scenarios.py OUT``
(gloo, CPU): each rank writes ``OUT/rank-N.json``, one result per scenario, which
``tests/test_watch_distributed.py`` reads. The scenarios run one after another in the same
process group, so a rank that decided otherwise than the other (stopped where the other went
on) leaves their collectives out of step, and the launch hangs or fails instead of reporting.

The faults: at one step, after ``backward()`` (DDP's all-reduce is done) and before
``optimizer.step()``, rank 1 alone writes a NaN into one gradient, or sets its learning rate off
the schedule. Only rank 1 could see either locally; the guard's all-reduced step vector must bring
it to rank 0 too.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import lmcheck.watch
from lmcheck.watch import GuardStop, Rules

VOCAB, WIDTH, LENGTH, BATCH = 40, 16, 12, 4
STEPS = 8
LR = 1e-2
FAULT_STEP = 4  # the optimizer step (1-based) whose gradient rank 1 poisons


class TinyLM(torch.nn.Module):
    """Embedding, one hidden layer, output layer; returns a dict with ``loss``, as a Hugging Face
    causal LM's output does, so the guard reads the loss from the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.hidden = torch.nn.Linear(WIDTH, WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(torch.tanh(self.hidden(self.embed(input_ids))))  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return {"loss": loss, "logits": logits}


def batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """This rank's batches: each rank its own rows, as a DistributedSampler gives them."""
    generator = torch.Generator().manual_seed(100 + rank)
    ids = [torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator) for _ in range(STEPS)]
    return [{"input_ids": row, "labels": row} for row in ids]


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of every weight, to compare across ranks."""
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return hashlib.sha1(weights.numpy().tobytes()).hexdigest()[:16]


def optimizer_fingerprint(optimizer: torch.optim.Optimizer) -> str:
    state = [v.detach().reshape(-1).float() for s in optimizer.state.values() for v in s.values()
             if isinstance(v, torch.Tensor)]
    return hashlib.sha1(torch.cat(state).numpy().tobytes() if state else b"").hexdigest()[:16]


def run(rank: int, rules: Rules | None, *, fault: str | None = None, fault_step: int = FAULT_STEP) -> dict:
    """A plain DDP loop of STEPS steps inside the guard; at ``fault_step`` rank 1 alone
    poisons one gradient (``fault="nan"``) or halves its learning rate (``fault="lr"``, the
    guard given the planned constant rate). What it saw and where the weights ended."""
    torch.manual_seed(0)  # the same initial weights on every rank
    model = DistributedDataParallel(TinyLM())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    found: dict = {"stopped_at": None, "before_fault": None, "after_fault": None}
    with lmcheck.watch(model, optimizer, rules=rules, lr_schedule=lambda step: LR) as guard:
        for step, batch in enumerate(batches(rank), start=1):
            loss = model(**batch)["loss"]
            loss.backward()  # DDP has all-reduced the gradients once this returns
            if fault and step == fault_step:
                found["before_fault"] = [fingerprint(model), optimizer_fingerprint(optimizer)]
                if rank == 1 and fault == "nan":
                    model.module.hidden.weight.grad[0, 0] = float("nan")
                if rank == 1 and fault == "lr":  # say, a scheduler stepped once more on this rank
                    optimizer.param_groups[0]["lr"] = LR / 2
            try:
                optimizer.step()
            except GuardStop as stop:
                found.update(stopped_at=step, stop_event=stop.event.to_dict())
                break
            finally:
                if fault and step == fault_step:
                    found["after_fault"] = [fingerprint(model), optimizer_fingerprint(optimizer)]
            optimizer.zero_grad(set_to_none=True)
    found.update(events=[e.to_dict() for e in guard.events], skipped=list(guard.skipped), guard_step=guard.step,
                 steps_run=step, weights=fingerprint(model), optimizer=optimizer_fingerprint(optimizer),
                 finite=all(bool(torch.isfinite(p).all()) for p in model.parameters()))
    return found


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        found = {"healthy": run(rank, Rules()),
                 "stop": run(rank, Rules(nonfinite="stop"), fault="nan"),
                 "skip": run(rank, Rules(nonfinite="skip"), fault="nan"),
                 # at the last step: where the ranks decide otherwise, neither waits on the other after it
                 "learning_rate_stop": run(rank, Rules(learning_rate="stop"), fault="lr", fault_step=STEPS)}
        dist.barrier()  # both ranks came through every scenario
        (out / f"rank-{rank}.json").write_text(json.dumps(found, indent=1))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
