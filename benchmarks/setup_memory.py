"""One measurement of the setup checks' memory, in a fresh process: the user's own training
steps, or the same setup under ``check_loop`` or ``check_trainer``.

    python benchmarks/setup_memory.py --size 124m --run user-loop

prints one JSON line: the peak resident set size (bytes), the CUDA peak where the model is on a
GPU, the model's parameter count and the seconds it took. ``check_loop_resume`` and
``check_trainer_resume`` also give the checks a way to rebuild the setup (and the loop its own
checkpoint), so that ``resume`` runs; ``user-loop-epochs`` is the user's loop as the resumable
one iterates it. ``benchmarks/test_bench_setup_memory.py``
runs it for each kind of run and compares the peaks. GPT-2 configurations with random weights,
fp32, AdamW, batches of 4 x 128 random token ids.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from typing import Any

import torch

SIZES = {"small": dict(n_layer=2, n_embd=128, n_head=4), "124m": dict(n_layer=12, n_embd=768, n_head=12),
         "1b": dict(n_layer=24, n_embd=1792, n_head=16)}  # 1b: about 1.0 billion parameters, for a GPU
BATCH, LENGTH, BATCHES = 4, 128, 8


def _model(size: str, device: str) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=LENGTH, **SIZES[size])
    model = GPT2LMHeadModel(config).to(device)
    model.loss_type = "ForCausalLM"  # the Trainer's token count after the shift (transformers #46204)
    return model


def _rows() -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(50257, (BATCH * BATCHES, LENGTH), generator=generator)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def _loop(model: Any, device: str) -> tuple[Any, Any]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(
        _rows(), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0),
        collate_fn=lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")})

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, loader


def _resumable_loop(size: str, device: str, seed: int = 0) -> dict[str, Any]:
    """A setup check_loop can rebuild and resume: each epoch's order from the seed and the epoch,
    a checkpoint of the model, the optimizer, the torch generator and the data position."""
    import itertools
    import os

    model = _model(size, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows, position = _rows(), {"calls": 0, "resumed_at": None}

    def collate(chunk: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return {k: torch.tensor([r[k] for r in chunk]) for k in ("input_ids", "labels")}

    def batches(epoch: int) -> Any:
        loader = torch.utils.data.DataLoader(rows, batch_size=BATCH, shuffle=True, collate_fn=collate,
                                             generator=torch.Generator().manual_seed(1000 * seed + epoch))
        skip = 0
        if position["resumed_at"] is not None:
            skip, position["resumed_at"] = position["resumed_at"] - epoch * len(loader), None
        return itertools.islice(loader, max(skip, 0), None)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        position["calls"] += 1
        return loss.detach()

    def save(folder: str) -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                    "calls": position["calls"]}, os.path.join(folder, "state.pt"))

    def load(folder: str) -> None:
        state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        position["calls"] = position["resumed_at"] = state["calls"]

    return {"model": model, "train_step": step, "batches": batches, "checkpoint": (save, load)}


def _trainer(model: Any, folder: str, steps: int) -> Any:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    args = TrainingArguments(output_dir=folder, per_device_train_batch_size=BATCH, max_steps=steps,
                             learning_rate=1e-4, report_to=[], save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, use_cpu=not torch.cuda.is_available(), seed=0)
    return Trainer(model=model, args=args, train_dataset=Dataset.from_list(_rows()),
                   data_collator=default_data_collator)


def measure(size: str, run: str, steps: int) -> dict[str, Any]:
    import lmcheck.setup  # the same libraries in every kind of run

    device = "cuda" if torch.cuda.is_available() else "cpu"
    resumable = run in ("user-loop-epochs", "check_loop_resume")
    model = None if resumable else _model(size, device)  # a resumable loop builds its own
    started = time.perf_counter()
    budget = dict(steps=steps, overfit_steps=steps, check_every=1, overfit_batches=1)
    with tempfile.TemporaryDirectory() as folder:
        if run == "user-loop":
            step, loader = _loop(model, device)
            batches = iter(loader)
            for _ in range(steps):
                step(next(batches))
        elif run == "check_loop":
            step, loader = _loop(model, device)
            report = lmcheck.setup.check_loop(model, step, loader, pretrained=False, **budget)
        elif run == "user-loop-epochs":
            setup = _resumable_loop(size, device)
            model = setup["model"]
            started = time.perf_counter()  # the steps alone, as the check's cost is counted
            taken = 0
            for epoch in range(steps):
                for batch in setup["batches"](epoch):
                    setup["train_step"](batch)
                    taken += 1
                    if taken == steps:
                        break
                if taken == steps:
                    break
        elif run == "check_loop_resume":
            setup = _resumable_loop(size, device)
            model = setup["model"]
            report = lmcheck.setup.check_loop(**setup, rebuild=lambda seed: _resumable_loop(size, device, seed),
                                              pretrained=False, **budget)
        elif run == "user-trainer":
            _trainer(model, folder, steps).train()
        elif run == "check_trainer":
            report = lmcheck.setup.check_trainer(_trainer(model, folder, steps), pretrained=False, **budget)
        elif run == "check_trainer_resume":
            report = lmcheck.setup.check_trainer(
                _trainer(model, folder, steps), pretrained=False,
                rebuild=lambda seed: _trainer(_model(size, device), folder, steps), **budget)
        else:
            raise SystemExit(f"unknown run {run!r}")
    out = {"size": size, "run": run, "parameters": sum(p.numel() for p in model.parameters()),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "seconds": round(time.perf_counter() - started, 1)}
    if device == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    if run.startswith("check"):
        out["optimizer_steps"] = report.optimizer_steps
        out["costs"] = report.costs
        out["statuses"] = {r.name: r.status for r in report}
        out["failures"] = {r.name: r.explanation for r in report.failures()}
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--run", required=True, choices=("user-loop", "check_loop", "user-trainer", "check_trainer",
                                                          "user-loop-epochs", "check_loop_resume", "check_trainer_resume"))
    parser.add_argument("--steps", type=int, default=3)
    arguments = parser.parse_args()
    print(json.dumps(measure(arguments.size, arguments.run, arguments.steps)))
