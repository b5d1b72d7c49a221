"""Rank helpers for the setup checks and the data-parallel probes: the world, gathering from
every rank, the module inside a DDP wrapper, and fingerprints of tensors to compare across ranks.
In one process (no initialized process group) each is the one-rank case."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from lmcheck.errors import InputError

__all__ = ["fingerprint", "gathered", "local", "rank", "rank_and_world", "unwrap_parallel", "world_size"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the initialized process group; 0 in one process."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_and_world() -> tuple[int, int]:
    """(this rank, the world size) of the initialized process group; an InputError without one."""
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError("the distributed probes must be called on every rank of an initialized "
                         "torch.distributed process group (launch with torchrun or accelerate launch, "
                         "then call torch.distributed.init_process_group)")
    return dist.get_rank(), dist.get_world_size()


def gathered(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order; ``[value]`` in one process."""
    if world_size() == 1:
        return [value]
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def unwrap_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel or DataParallel: lmcheck's own forwards, the
    snapshot and the recorder use it, the user's step keeps the wrapper. (Not any ``.module``:
    a model made by lmcheck.adapt keeps its own.)"""
    parallel = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, parallel) else model


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def fingerprint(tensor: torch.Tensor | None) -> str:
    """A short hash of a tensor's values: ids of any integer type hash alike, -0.0 as 0.0, and an
    FSDP2 DTensor is gathered whole (a collective: every rank calls it in the same order)."""
    if tensor is None:
        return "none"
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    data = tensor.detach().to("cpu").contiguous()
    if data.is_floating_point():
        data = data + 0.0  # -0.0 and 0.0 are the same value (an all-reduce may give either)
    else:
        data = data.to(torch.int64)
    return hashlib.sha1(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()[:16]
