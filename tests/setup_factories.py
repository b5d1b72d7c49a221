"""Users' training-setup functions for ``lmcheck train-check`` and ``--lmcheck-trainer``, built
from ``tests/setups.py``; the tests put this folder on the path and name them as
``setup_factories:function``."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import setups
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
