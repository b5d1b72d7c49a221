"""Healthy data-parallel setups and their documented bugs, each checked by its distributed probe.

Run on every rank by ``torchrun --standalone --nproc_per_node 2 tests/distributed_scenarios.py
OUT [probes|setup]`` or ``accelerate launch --multi_gpu --num_processes 2 ...`` (gloo, CPU): each
rank writes ``OUT/rank-N.json``, one result per scenario, which ``tests/test_distributed.py``
reads. Many scenarios share each launch, so the tests pay the start of two processes (about 4 s
of imports each) once per launch.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from transformers import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import setups  # noqa: E402

import lmcheck  # noqa: E402
from lmcheck.setup import distributed  # noqa: E402

BACKEND = os.environ.get("LMCHECK_DIST_BACKEND", "gloo")  # "nccl": the gpu(count=2) variant
DEVICE = torch.device("cpu")


def packed(count: int = 32, length: int = 12, seed: int = 0, vocab: int = 40) -> list[dict[str, torch.Tensor]]:
    """Equal-length rows of random words: every rank's batch holds the same number of tokens."""
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (length,), generator=generator)} for _ in range(count)]


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone()}


class DDPLoop:
    """A plain DDP loop: accumulation 2 with no_sync on every micro-batch but the last."""

    def __init__(self, net: torch.nn.Module, *, fault: str | None = None, accumulate: int = 2) -> None:
        self.model = DistributedDataParallel(net.to(DEVICE), device_ids=[DEVICE] if DEVICE.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.0)
        self.fault, self.accumulate, self.calls = fault, accumulate, 0

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        last = self.calls % self.accumulate == 0
        sync = not last if self.fault == "inverted_no_sync" else last  # FunASR #3472
        with contextlib.nullcontext() if sync else self.model.no_sync():
            loss = self.model(**{k: v.to(DEVICE) for k, v in batch.items()}).loss / self.accumulate
            if self.fault == "loss_times_world":  # sparseml #135
                loss = loss * dist.get_world_size()
            loss.backward()
        if last:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class DDPResumeLoop(DDPLoop):
    """The DDP loop with dropout, each rank its own masks, a DistributedSampler set to each
    epoch, and a checkpoint in ``torch.distributed.checkpoint``: the model and optimizer
    sharded across ranks, and each rank's own generator and data position in a file of its own.
    ``fault="rank0_state"``: every rank loads rank 0's file (Megatron-LM PR #6858: the RNG wrong
    on 252 of 256 ranks after a resume)."""

    def __init__(self, tok, rank: int, world: int, *, seed: int = 0, fault: str | None = None) -> None:
        super().__init__(setups.model(tok, seed=seed, dropout=0.1))
        torch.manual_seed(1000 * seed + rank)  # after the model: the same weights, each rank its own masks
        self.rank, self.resume_fault, self.resumed_at = rank, fault, None
        data = packed()
        self.sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        # a generator of its own: iter() draws the loader's base seed from it, not from the torch
        # generator the checkpoint restores (NVIDIA-NeMo/Megatron-Bridge #5257)
        self.loader = DataLoader(data, batch_size=4, sampler=self.sampler, collate_fn=collate,
                                 generator=torch.Generator().manual_seed(seed))

    def batches(self, epoch: int):
        self.sampler.set_epoch(epoch)
        skip = 0
        if self.resumed_at is not None:  # the epoch the resume falls in: what it trained already skipped
            skip, self.resumed_at = self.resumed_at - epoch * len(self.loader), None
        return itertools.islice(self.loader, max(skip, 0), None)

    def save(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model, "optimizer": optimizer}, checkpoint_id=folder)
        torch.save({"rng": torch.get_rng_state(), "calls": self.calls}, os.path.join(folder, f"rank-{self.rank}.pt"))

    def load(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer)
        state = {"model": model, "optimizer": optimizer}
        dcp.load(state, checkpoint_id=folder)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        mine = 0 if self.resume_fault == "rank0_state" else self.rank
        own = torch.load(os.path.join(folder, f"rank-{mine}.pt"), weights_only=True)
        torch.set_rng_state(own["rng"])
        self.calls = self.resumed_at = own["calls"]

    def setup(self) -> dict:
        return {"model": self.model, "train_step": self.step, "batches": self.batches,
                "checkpoint": (self.save, self.load)}


class FSDPLoop:
    """A plain FSDP2 loop (fully_shard on each block and the model), clipping to norm 1."""

    def __init__(self, net: torch.nn.Module, *, fault: str | None = None) -> None:
        from torch.distributed.fsdp import fully_shard

        for block in net.transformer.h:
            fully_shard(block)
        self.model = fully_shard(net)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.0)
        self.fault = fault

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.model(**{k: v.to(DEVICE) for k, v in batch.items()}).loss
        loss.backward()
        if self.fault == "clip_per_shard":  # each rank's own norm, not the global one (pytorch #170862)
            shards = [p.grad.to_local() for p in self.model.parameters() if p.grad is not None]
            norm = torch.sqrt(sum(g.float().pow(2).sum() for g in shards))
            for shard in shards:
                shard.mul_(min(1.0, 1.0 / (float(norm) + 1e-6)))
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def scenarios(rank: int, world: int, only: str = "") -> dict[str, dict]:
    """Every scenario's result. The tests split them between two launches of about the same
    length: ``only="probes"`` runs the distributed probes' scenarios and the healthy check_loop and
    check_trainer, ``only="setup"`` check_loop and check_trainer on their healthy and faulty setups."""
    tok = setups.tokenizer()
    if only == "setup":
        return setup_scenarios(tok, rank, world, faults=True)
    results = {}

    results["same_init"] = distributed.same_init(setups.model(tok, seed=0))
    results["same_init/seed_per_rank"] = distributed.same_init(setups.model(tok, seed=rank))

    data = packed()

    def sharded(seed: int, set_epoch: bool):
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        loader = DataLoader(data, batch_size=4, sampler=sampler, collate_fn=collate)

        def batches_of_epoch(epoch: int):
            if set_epoch:
                sampler.set_epoch(epoch)
            return loader

        return batches_of_epoch

    results["data_sharding"] = distributed.data_sharding(sharded(0, True))
    results["data_sharding/no_set_epoch"] = distributed.data_sharding(sharded(0, False))
    results["data_sharding/seed_per_rank"] = distributed.data_sharding(sharded(rank, True))

    mine = [collate(data[i:i + 4]) for i in range(rank * 4, len(data), 4 * world)]
    for fault in (None, "inverted_no_sync"):
        loop = DDPLoop(setups.model(tok, seed=0), fault=fault)
        key = "grads_synchronized" + (f"/{fault}" if fault else "")
        results[key] = distributed.grads_synchronized(loop.model, loop.step, mine)
    for fault in (None, "loss_times_world"):
        loop = DDPLoop(setups.model(tok, seed=0), fault=fault)
        key = "ddp_matches_single" + (f"/{fault}" if fault else "")
        results[key] = distributed.ddp_matches_single(loop.model, loop.step, mine)

    for fault in (None, "clip_per_shard"):
        loop = FSDPLoop(setups.model(tok, seed=0).to(DEVICE), fault=fault)
        key = "grads_synchronized/fsdp2" + (f"_{fault}" if fault else "")
        results[key] = distributed.grads_synchronized(loop.model, loop.step, mine, max_grad_norm=1.0)

    net = setups.model(tok, seed=0, dropout=0.1).to(DEVICE)
    torch.manual_seed(1000 + rank)  # after the model: the same weights, each rank its own masks
    results["rank_randomness"] = distributed.rank_randomness(net, mine[0])
    torch.manual_seed(42)  # one constant seed on every rank: transformers #31412
    results["rank_randomness/constant_seed"] = distributed.rank_randomness(net, mine[0])
    return {**{k: v.to_dict() for k, v in results.items()}, **setup_scenarios(tok, rank, world, faults=only != "probes")}


def setup_scenarios(tok, rank: int, world: int, *, faults: bool) -> dict[str, dict]:
    data = packed()
    found: dict[str, dict] = {}

    def sharded(epoch: int):
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        return DataLoader(data, batch_size=4, sampler=sampler, collate_fn=collate)

    # the whole battery of check_loop, run unchanged on every rank on a plain DDP loop
    for fault in (None, "inverted_no_sync")[: 2 if faults else 1]:
        loop = DDPLoop(setups.model(tok, seed=0), fault=fault)
        report = lmcheck.check_loop(loop.model, loop.step, sharded, tokenizer=tok, overfit_steps=150)
        found["check_loop" + (f"/{fault}" if fault else "")] = report.to_dict()

    # resume under torchrun: every rank's state and data position against the straight run
    for fault in (None, "rank0_state")[: 2 if faults else 1]:
        def rebuild(seed: int, fault=fault) -> dict:
            return DDPResumeLoop(tok, rank, world, seed=seed, fault=fault).setup()

        report = lmcheck.check_loop(**rebuild(0), rebuild=rebuild, tokenizer=tok, overfit_steps=5)
        found["resume" + (f"/{fault}" if fault else "")] = report["resume"].to_dict()

    # check_trainer on a Trainer that runs DDP itself (accelerate finds the process group)
    trainers = (("check_trainer", Trainer), ("check_trainer/per_micro_mean", PerMicroMean))
    for name, trainer_class in trainers[: 2 if faults else 1]:
        with tempfile.TemporaryDirectory() as output_dir:
            def build(seed: int, output_dir=output_dir, trainer_class=trainer_class) -> Trainer:
                return setups.trainer(tok, output_dir, seed=seed, trainer_class=trainer_class,
                                      use_cpu=DEVICE.type == "cpu")

            # rebuilt for reproducible and for resume: the Trainer's own checkpoint, resumed on every rank
            trainer = build(0)
            report = lmcheck.check_trainer(trainer, overfit_steps=100, rebuild=build)
            found[name] = {**report.to_dict(), "written": sorted(os.listdir(output_dir)),
                           "user_train_still_syncs": still_syncs(trainer)}
    return found


def still_syncs(trainer: Trainer) -> bool:
    """After the checks, the user's own train() still all-reduces: the gradients at each of two
    optimizer steps are the same on every rank."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    same: list[bool] = []

    def compare(optimizer, args, kwargs):
        grads = [p.grad.detach().clone() for p in trainer.model.parameters() if p.grad is not None]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, grads)
        same.append(all(torch.equal(a, b) for a, b in zip(everyone[0], grads, strict=True)))

    handle = register_optimizer_step_pre_hook(compare)
    trainer.args.max_steps, trainer.args.save_strategy = 2, "no"
    try:
        trainer.train()
    finally:
        handle.remove()
    return bool(same) and all(same)


class PerMicroMean(Trainer):
    """compute_loss returns each micro-batch's mean, ignoring num_items_in_batch (transformers #34191)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def main() -> None:
    out = Path(sys.argv[1])
    global DEVICE
    if BACKEND == "nccl":  # one GPU per rank
        DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(BACKEND)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        found = scenarios(rank, world, sys.argv[2] if len(sys.argv) > 2 else "")
        (out / f"rank-{rank}.json").write_text(json.dumps(found, indent=1))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
