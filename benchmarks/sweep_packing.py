"""The packing record across architectures: does each transformers causal LM keep the documents
of a packed row apart when given position ids that restart (the padding-free form that
``DataCollatorWithFlattening`` and TRL's padding-free collator make)?

    python benchmarks/sweep_packing.py [results.json]

Every causal class of the architecture matrix (``tests/architectures.py``: tiny, seeded, sdpa
where the class has it, else eager) runs ``lmcheck.packing_equivalence`` on one row of three
random documents (6, 5 and 7 tokens), ``config.use_cache`` False, no attention mask. The summary
line counts the outcomes; the JSON holds each class's status and explanation, the machine and the
versions.
"""

from __future__ import annotations

import collections
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import architectures  # noqa: E402  (the matrix's own builders)
import transformers  # noqa: E402

import lmcheck  # noqa: E402
from lmcheck.setup.trainer import quiet  # noqa: E402

LENGTHS = (6, 5, 7)


def packed_row() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 200, (1, sum(LENGTHS)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return {"input_ids": ids, "position_ids": positions}


def main(argv: list[str]) -> int:
    tokenizer = architectures.tokenizers()["causal"]
    outcomes: dict[str, dict[str, str]] = {}
    started = time.perf_counter()
    for arch in architectures.architectures():
        if arch.family != "causal":
            continue
        attention = architectures.attentions(arch)[-1]
        try:
            model = architectures.build(arch, tokenizer, attention=attention)
            model.config.use_cache = False
        except Exception as error:  # noqa: BLE001 -- the class cannot be built at this size: said
            outcomes[arch.model_type] = {"status": "not built", "explanation": f"{type(error).__name__}: {error}"[:300]}
            continue
        try:
            with quiet():
                result = lmcheck.packing_equivalence(model, packed_row())
            outcomes[arch.model_type] = {"status": result.status, "attention": attention,
                                         "explanation": result.explanation}
        except Exception as error:  # noqa: BLE001 -- the model's own forward raised on the packed row
            outcomes[arch.model_type] = {"status": "raised", "attention": attention,
                                         "explanation": f"{type(error).__name__}: {error}"[:300]}
    counts = collections.Counter(o["status"] for o in outcomes.values())
    record = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "seconds": round(time.perf_counter() - started, 1), "counts": dict(counts), "outcomes": outcomes}
    print(json.dumps({k: record[k] for k in ("machine", "versions", "seconds", "counts")}))
    if len(argv) > 1:
        Path(argv[1]).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
