"""The sweep behind chapter 4's CPU recipe: which settings memorize the first chunk of every
training document (49 chunks of 128 tokens, 32-token prefix, 32 greedy tokens) in the fewest
epochs, and at what cost on this machine.

    python benchmarks/sweep_memorization.py                      # the recorded grid
    python benchmarks/sweep_memorization.py '{"lr": 3e-3}' ...   # settings over PRETRAIN_CPU

Each line it prints is one run (JSON): the settings, the step and epoch it memorized at (or the
share memorized at the 20-epoch limit), the seconds of training and the tokens/s. Epoch counts do
not depend on the machine; seconds do, so the machine is printed first. The runs use the library's
own loop (lmcheck.loops.pretraining.pretrain_default), not a copy of it.
"""

from __future__ import annotations

import json
import platform
import sys
import time

import torch

from lmcheck.loops.pretraining import pretrain_default

# One change at a time from the chosen recipe, and the plain-AdamW baseline it replaced.
GRID: list[dict] = [
    {},  # PRETRAIN_CPU itself
    {"preset": "gpt2-tiny-cpu"},  # width 128
    {"embedding_lr": None, "betas": (0.9, 0.999), "warmup": 0.0, "decay": "constant",
     "preset": "gpt2-tiny-cpu", "lr": 1e-3},  # one rate for every parameter, as before
    {"betas": (0.9, 0.95)},
    {"embedding_lr": 2e-2},
    {"batch_size": 8},
]


def run(settings: dict) -> dict:
    started = time.perf_counter()
    result = pretrain_default(**settings, memorization_every=1)
    curve = result.curve
    per_epoch = -(-len(result.data.train) // result.config.batch_size)  # steps
    screened = curve.metadata.get("screened_fraction", [])
    checked = curve.metadata.get("memorized_fraction", [])
    last = max(screened + checked, key=lambda point: point[0])[1] if screened or checked else None
    return {"settings": settings, "stop": curve.stop_reason, "steps": curve.steps,
            "epochs": round(curve.steps / per_epoch, 2), "memorized_at_stop": last,
            "final_train_loss": round(curve.train[-1][1], 4), "train_s": round(curve.metadata["train_s"], 1),
            "wall_s": round(time.perf_counter() - started, 1), "tokens_per_s": round(curve.metadata["tokens_per_s"])}


def main(arguments: list[str]) -> None:
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__}), flush=True)
    for settings in [json.loads(a) for a in arguments] or GRID:
        if "betas" in settings:
            settings["betas"] = tuple(settings["betas"])
        print(json.dumps(run(settings)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
