"""One measurement, in a fresh process, of a probe's cost against the user's own training step
on the same model: GPT-2 configurations with random weights, fp32, batches of 4 x 128 random
token ids.

    python benchmarks/check_costs.py --check adapters --size 124m

prints one JSON line: the user's step (seconds, the mean of 3 after one warm-up step) and the
peak resident set size after those steps; then the probe's seconds and the peak after it. The
peak only grows, so ``peak_after_check - peak_after_steps`` is what the probe holds beyond the
user's training. ``adapters``: ``lmcheck.lora.lora_adapters`` on a LoRA of GPT-2's attention and
MLP projections (r=16); ``packing``: ``lmcheck.packing_equivalence`` on one row of 4 packed
documents of 32 tokens; ``precision``: the setup row's probes for fp32 weights under bf16 autocast
(the user's step runs under it too): ``loss_precision``, ``autocast_ops`` and ``fp16_headroom``.
``benchmarks/test_bench_check_costs.py`` runs it.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

import torch

SIZES = {"small": dict(n_layer=2, n_embd=128, n_head=4), "124m": dict(n_layer=12, n_embd=768, n_head=12)}
BATCH, LENGTH = 4, 128


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux gives KiB


def _model(size: str) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=LENGTH, **SIZES[size]))


def measure(check: str, size: str) -> dict[str, Any]:
    import lmcheck
    from lmcheck.lora import lora_adapters

    model = _model(size)
    ids = torch.randint(50257, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if check == "adapters":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, target_modules=["c_attn", "c_proj", "c_fc"],
                                                 fan_in_fan_out=True))
    elif check == "packing":
        positions = torch.arange(32).repeat(4)[None]  # 4 documents of 32 tokens in one row
        row = ids[:1]
        batch = {"input_ids": row, "labels": row.masked_fill(positions == 0, -100), "position_ids": positions}
        model.config.use_cache = False
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=check == "precision")

    def step() -> None:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    step()  # warm-up
    started = time.perf_counter()
    for _ in range(3):
        step()
    user = (time.perf_counter() - started) / 3
    after_steps = _peak()
    started = time.perf_counter()
    if check == "adapters":
        result = lora_adapters(model, batch)
    elif check == "precision":
        from lmcheck.precision import autocast_ops, fp16_headroom, loss_precision

        parts = [loss_precision(model, batch), autocast_ops(model, batch, dtype=torch.bfloat16),
                 fp16_headroom(model, batch)]
        result = next((r for r in parts if not r.passed), parts[0])
    else:
        result = lmcheck.packing_equivalence(model, batch)
    seconds = time.perf_counter() - started
    return {"check": check, "size": size, "parameters": sum(p.numel() for p in model.parameters()),
            "status": result.status, "explanation": result.explanation[:300], "user_step_seconds": user,
            "check_seconds": seconds, "peak_after_steps": after_steps, "peak_after_check": _peak()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", choices=["adapters", "packing", "precision"], required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    arguments = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(json.dumps(measure(arguments.check, arguments.size)))


if __name__ == "__main__":
    main()
