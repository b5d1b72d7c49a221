"""Users' training-setup functions for ``lmcheck train-check`` and ``--lmcheck-trainer``, built
from ``tests/setups.py``; the tests put this folder on the path and name them as
``setup_factories:function``."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import setups
import torch
from transformers import Trainer

# the Trainer's output_dir: lmcheck's runs go to a temporary folder, so nothing is written here
OUTPUT_DIR = os.path.join(tempfile.gettempdir(), "lmcheck-setup-factories")


def trainer(seed: int = 0) -> Trainer:
    """A healthy Trainer; the seed reaches the initialisation and the data order."""
    return setups.trainer(setups.tokenizer(), OUTPUT_DIR, seed=seed)


def loop(seed: int = 0) -> dict[str, Any]:
    """A healthy plain loop, as a mapping of check_loop's arguments."""
    tok = setups.tokenizer()
    net = setups.model(tok, seed=seed)
    step = setups.Loop(net)
    return {"model": net, "train_step": step.step, "batches": setups.loader(tok, seed=seed),
            "tokenizer": tok, "scheduler": step.scheduler, "max_grad_norm": 1.0}


def loop_tuple() -> tuple[Any, Any, Any]:
    """A healthy plain loop as (model, train_step, batches), with no seed to rebuild it by."""
    tok = setups.tokenizer()
    net = setups.model(tok)
    return net, setups.Loop(net).step, setups.loader(tok)


def scheduler_per_micro_batch(seed: int = 0) -> dict[str, Any]:
    """The plain loop with its scheduler stepped on every micro-batch (Lightning #1476)."""
    tok = setups.tokenizer()
    net = setups.model(tok, seed=seed)
    step = setups.Loop(net, fault="scheduler_per_micro_batch")
    return {"model": net, "train_step": step.step, "batches": setups.loader(tok, seed=seed),
            "tokenizer": tok, "scheduler": step.scheduler, "max_grad_norm": 1.0}


def broken() -> Any:
    raise RuntimeError("no training data at /data/train.jsonl")


def not_a_setup() -> str:
    return "trainer.pt"


def unknown_key() -> dict[str, Any]:
    return {**loop(), "learning_rate": 1e-3}


def trainer_with_budget(seed: int = 0) -> dict[str, Any]:
    """A Trainer and the budget its author chose for it."""
    return {"trainer": trainer(seed), "overfit_steps": 3, "check_every": 1}


def resumable_loop(seed: int = 0) -> dict[str, Any]:
    """A plain loop that checkpoints and resumes exactly (dropout, accumulation, a GradScaler)."""
    return setups.ResumableLoop(seed).setup()


def resumable_trainer(seed: int = 0) -> Trainer:
    """A healthy Trainer with dropout on, over 24 examples: the resume check cuts its epochs short."""
    tok = setups.tokenizer()
    return setups.trainer(tok, OUTPUT_DIR, seed=seed, dropout=0.1, data=setups.examples(tok, 24))


# each epoch's order, drawn from one generator the first time the epoch is asked for and kept in
# this process's memory only: every run in one process sees the same orders, a fresh process others
_ORDERS: dict[int, list[int]] = {}
_DRAWS = torch.Generator().manual_seed(0)


def _order_in_memory(epoch: int, count: int) -> list[int]:
    if epoch not in _ORDERS:
        _ORDERS[epoch] = torch.randperm(count, generator=_DRAWS).tolist()
    return _ORDERS[epoch]


def resumable_loop_order_in_memory(seed: int = 0) -> dict[str, Any]:
    """The resumable loop whose data order lives in a module-level cache nobody saves."""
    return setups.ResumableLoop(seed, order=_order_in_memory).setup()
