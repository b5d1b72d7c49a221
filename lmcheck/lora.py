"""Does a LoRA adapter cover the model, train, save and merge? ``lora_adapters``.

A PEFT run can train for days and change nothing useful, and the loss may still fall:

- ``lora_B`` stays zero while the loss falls (peft #1402); the LoRA model equals the base model
  (peft #793); ``merge_and_unload`` leaves the weights unchanged (peft #918); an 888-byte
  adapter file with no weights in it (transformers #24551);
- ``target_modules`` that partly match are accepted silently (peft #40): NemotronH's default
  targets covered 7% of its layers and the DPO loss stayed at ln 2 for 25 steps (peft #3554);
  fixing a pattern gave 50% more trainable parameters (dllm-reasoning/d1 #6);
- gradient checkpointing with frozen embeddings leaves nothing requiring grad (transformers
  #26334, #42489);
- a resized embedding made trainable but not saved with the adapter: the reloaded model has
  the base's rows (artidoro/qlora #214);
- a resized, untied head re-initialised by ``post_init`` (transformers #35141, fixed by PR #45079):
  the base's logits over the old vocabulary are gibberish, and the adapter trains on them.

:func:`lora_adapters` reads the PEFT model's structure, then takes a few steps of its own on the
trainable parameters (AdamW; put back afterwards, with the gradients and the random generators),
so that ``lora_B`` is off zero and the adapter has an effect to save, reload and merge.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmcheck._finite import locate, probe, require_finite
from lmcheck._model import model_device
from lmcheck._recording import rng_state, set_rng_state
from lmcheck._validate import as_ids, check_fraction, check_int, check_number, describe
from lmcheck.errors import InputError
from lmcheck.results import Result

__all__ = ["is_peft_model", "lora_adapters"]

NAME = "adapters"
# Logits of the adapter reloaded from its own files against the adapter as it trains, in
# float32: the same weights give the same logits to about 1e-6 on a CPU.
LOGITS_ATOL = 1e-4
# A layer's output with its weight merged (W + B A scaled) against the layer with its adapter,
# relative to the output's largest value: one rounding of the sum, about 1e-7 in float32 and
# 4e-3 in bfloat16 (its 8 significant bits); a merge that drops the scaling is off by 10% or more.
MERGE_RTOL = 2e-2
# below this share of the base's linear layers carrying an adapter, the adapter covers too little
# of the model to be the one meant: the original LoRA recipe (q and v projections) is 2 of a
# Llama block's 7; NemotronH's default targets covered 7% (peft #3554)
MIN_COVERAGE = 0.1
# a pretrained base whose loss on the user's batch is above this share of ln V predicts no better
# than chance: pretrained models score far below it on text of their kind (SmolLM2-135M: about
# 3 nats against ln V = 10.8)
CHANCE_SHARE = 0.9


def is_peft_model(model: object) -> bool:
    """A PEFT model: ``peft_config`` and ``get_base_model``, as ``peft.PeftModel`` has."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


@probe(NAME)
def lora_adapters(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], *, min_coverage: float = MIN_COVERAGE,
                  steps: int = 2, lr: float = 1e-2) -> Result:
    """A PEFT (LoRA) model's adapter covers the model, trains, saves, reloads and merges.

    Checks, each naming the modules or parameters at fault:

    - coverage: the share of the base model's linear layers (the output head aside) that carry
      an adapter, at least ``min_coverage``; every block of a layer stack carries one (unless
      ``layers_to_transform`` chooses); no ``target_modules`` pattern matches nothing;
    - training: over ``steps`` AdamW steps at ``lr`` on ``batch`` (the model's own loss, in its
      present mode, so under its gradient-checkpointing setting), every adapter parameter gets a
      finite, non-zero gradient and every ``lora_B`` leaves zero;
    - the adapter has an effect: its logits differ from the base's (the adapter turned off);
    - saving: ``save_pretrained`` into a temporary folder holds every adapter weight and every
      other trainable parameter (a resized embedding); loaded back as a second adapter, it gives
      the same logits;
    - merging: each adapted layer's weight merged out of place (``W + get_delta_weight``, as
      ``merge_and_unload`` adds it) gives the layer's output with its adapter;
    - tying: where the config ties the embeddings, the head is still the input embedding;
    - resizing: where the base was loaded from a local folder of safetensors and its vocabulary
      was resized since, the old vocabulary's rows of the input embedding and of the output head
      (and its bias) are the checkpoint's, value for value in the live dtype: the base's weights
      under PEFT's wrappers (a ``base_layer``, a ``modules_to_save`` wrapper's ``original_module``),
      the adapter's own copies and deltas left out. Weights, not logits: the rows are what makes
      the old vocabulary's logits, and no second model is loaded. Only those rows are read from
      the files. Where no such folder is at hand (a model built in memory, a Hub id, ``.bin``
      weights), ``metrics["resize_check"]`` is ``"not checked"`` and the explanation says why;
      a pretrained base is still held to predicting its batch better than chance.

    Everything is put back: the trainable parameters, their gradients, the active adapter, the
    random generators. Not applicable for a model that is not a PEFT model.
    """
    if not is_peft_model(model):
        return Result.not_applicable(NAME, f"not a PEFT model ({type(model).__name__}): no adapter to check")
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor) or \
            not isinstance(batch.get("labels"), torch.Tensor):
        raise InputError(f"'batch' must be a mapping with 'input_ids' and 'labels' tensors, as a collator returns "
                         f"(got {describe(batch)})")
    as_ids(batch["input_ids"], "batch['input_ids']")
    check_fraction(min_coverage, "min_coverage")
    check_int(steps, "steps", 1, 100)
    check_number(lr, "lr", low=0)
    problems: list[str] = []
    coverage = _coverage(model)
    problems += coverage.problems(min_coverage)
    device = model_device(model)
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    metrics: dict[str, Any] = {}
    problems += _resized_rows(model, metrics)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        problems.append("no parameter requires grad: the adapter cannot train")
        return _result(problems, coverage, metrics)
    problems += _chance(model, inputs, metrics)
    with _put_back(model, trainable):
        untrained = _train(model, inputs, trainable, steps, lr, metrics)
        problems += untrained
        if not untrained:  # an adapter that did not train has no effect to save, reload or merge
            problems += _effects(model, inputs, trainable, metrics)
    problems += _tying(model)
    return _result(problems, coverage, metrics)


def _chance(model: Any, inputs: Mapping[str, torch.Tensor], metrics: dict[str, Any]) -> list[str]:
    """A pretrained base (its config names where it was loaded from) must predict the batch
    better than chance: a loss near ln V means its output head is random (a resized, untied head
    re-initialised: transformers PR #45079). Where the checkpoint is at hand, ``_resized_rows``
    names the rows; this catches a random head also where it is not."""
    base = model.get_base_model()
    source = getattr(getattr(base, "config", None), "_name_or_path", "")
    if not source:
        return []
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            output = model(**inputs)
    finally:
        model.train(training)
    vocabulary = int(output.logits.shape[-1])
    loss, chance = float(output.loss), math.log(vocabulary)
    metrics.update(base_loss=loss, chance_loss=chance)
    if not math.isfinite(loss):
        return [f"the base model's loss on the batch is {loss}"]
    if loss > CHANCE_SHARE * chance:
        return [f"the pretrained base (from {source}) predicts the batch no better than chance: its "
                f"loss {loss:.3f} is near ln V = {chance:.3f}: its output head is random; a resize re-initialised "
                f"an untied head (transformers PR #45079), or the head was not loaded"]
    return []


@dataclass
class _Rows:
    """One tensor of the live base (the input embedding, the head's weight or bias) beside its
    saved counterpart: the rows they share (the old vocabulary) and how many of them differ."""

    what: str  # "the output head"
    live_name: str  # its name in the PEFT model: "base_model.model.lm_head.base_layer.weight"
    key: str  # its name in the checkpoint: "lm_head.weight"
    file: Path  # the safetensors file that holds it
    saved_rows: int  # the old vocabulary
    live_rows: int
    changed: int = 0  # old rows that differ
    first: int = -1  # the first of them
    non_finite: str = ""  # where the saved rows hold a NaN or Inf, said by ``locate``

    @property
    def common(self) -> int:
        return min(self.saved_rows, self.live_rows)


_TIED_HEAD = "the output head (tied to the input embedding)"
# what, most often, changed a tensor's old rows after a resize
_HINTS = {
    "the input embedding": "the embedding was re-initialised or overwritten after the resize",
    _TIED_HEAD: "the embedding, and the head tied to it, was re-initialised or overwritten after the resize",
    "the output head": "an untied head re-initialised after the resize (post_init, before transformers PR #45079)",
    "the output head's bias": "an untied head re-initialised after the resize (post_init, before transformers "
                              "PR #45079)",
}


def _resized_rows(model: Any, metrics: dict[str, Any]) -> list[str]:
    """After ``resize_token_embeddings`` the old vocabulary's rows of the input embedding and of
    the output head (the base's weights, the adapter's own deltas left out) must be the checkpoint's
    the base was loaded from, value for value: a resize copies them, so the base's logits over the
    old vocabulary stay the pretrained model's. Read lazily from the checkpoint's safetensors, a
    slice of rows at a time: no second model is loaded, and no logits are compared (the rows are
    what makes those logits; the resize touches nothing else). A head re-initialised after the
    resize (transformers PR #45079) fails here, naming its rows. Where the pre-resize weights are
    not at hand, the part is said to be not checked, with the reason."""
    from safetensors import SafetensorError

    base = model.get_base_model()
    found = _checkpoint(base)
    if isinstance(found, str):
        return _resize_unchecked(metrics, found)
    folder, files = found
    compared: list[_Rows] = []
    unchecked: list[str] = []
    for what, tensor, live_name, path in _base_tensors(model, base, unchecked):
        keys = _checkpoint_keys(path, getattr(base, "base_model_prefix", ""))
        key = next((k for k in keys if k in files), None)
        if key is None:
            unchecked.append(f"{live_name}: the checkpoint has no tensor for it (looked for {', '.join(keys)})")
            continue
        try:
            rows = _compare_rows(what, tensor, live_name, key, files[key], unchecked)
        except (OSError, SafetensorError) as error:
            unchecked.append(f"{live_name}: {files[key]} could not be read ({type(error).__name__}: {error})")
            continue
        if rows is not None:
            compared.append(rows)
    resized = [r for r in compared if r.saved_rows != r.live_rows]
    metrics["resize_unchecked"] = unchecked
    if not compared:
        return _resize_unchecked(metrics, "; ".join(unchecked) or "the base has no input embedding or output head")
    part = f" ({'; '.join(unchecked)}: not checked)" if unchecked else ""
    if not resized:
        metrics.update(resize_check="no resize", old_rows_changed=0,
                       resize_note=f"the vocabulary is the checkpoint's ({compared[0].saved_rows:,} rows in "
                                   f"{folder}): no resize to check{part}")
        return []
    metrics["old_vocabulary"] = min(r.saved_rows for r in resized)
    metrics["old_rows_changed"] = sum(r.changed for r in resized)
    problems = [f"the checkpoint's {r.key} in {r.file} is not finite ({r.non_finite}): the base's own weights are "
                f"broken" for r in resized if r.non_finite]
    problems += [f"the resize changed the old vocabulary's rows of {r.what}: {r.changed:,} of the {r.common:,} old "
                 f"rows of {r.live_name} differ from {r.key} in {folder} (first: row {r.first}), so the base's logits "
                 f"over the old vocabulary are not the pretrained model's: "
                 f"{_HINTS.get(r.what, _HINTS['the input embedding'])}; load the base again and resize it once, or "
                 f"copy the checkpoint's rows back" for r in resized if r.changed and not r.non_finite]
    if problems:
        metrics.update(resize_check="rows changed" if metrics["old_rows_changed"] else "checkpoint not finite",
                       resize_note=f"the resize check failed{part}")
        return problems
    shown = " and ".join(f"{r.what} ({r.live_name}: {r.common:,} of {r.live_rows:,} rows)" for r in resized)
    metrics.update(resize_check="rows kept",
                   resize_note=f"the resize kept the old vocabulary's rows of {shown} as the checkpoint in {folder} "
                               f"has them (weights compared value for value, not logits){part}")
    return []


def _resize_unchecked(metrics: dict[str, Any], reason: str) -> list[str]:
    metrics.update(resize_check="not checked", resize_unchecked=[reason],
                   resize_note=f"whether a resize kept the old vocabulary's rows was not checked: {reason}")
    return []


def _checkpoint(base: Any) -> tuple[Path, dict[str, Path]] | str:
    """The folder the base was loaded from and the safetensors file that holds each tensor (the
    index of a sharded checkpoint, else the keys of each file's header); a reason where there is none."""
    from safetensors import SafetensorError, safe_open

    source = getattr(getattr(base, "config", None), "_name_or_path", "") or getattr(base, "name_or_path", "")
    if not isinstance(source, (str, Path)) or not str(source):
        return "the base was built in memory (its config names no folder it was loaded from)"
    folder = Path(source)
    if not folder.is_dir():
        return (f"the base names {str(source)!r}, not a local folder (a Hub id, or a folder since removed): its "
                f"pre-resize weights are not at hand")
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            return folder, {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        files: dict[str, Path] = {}
        for file in sorted(folder.glob("*.safetensors")):
            if not file.name.startswith("adapter_model"):
                with safe_open(str(file), "pt") as opened:
                    files.update(dict.fromkeys(opened.keys(), file))
    except (OSError, ValueError, KeyError, AttributeError, SafetensorError) as error:
        return f"the checkpoint in {folder} could not be read ({type(error).__name__}: {error})"
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
        return (f"{folder} holds no *.safetensors weights" + (f" (only {', '.join(others[:3])}: lmcheck reads "
                                                               f"safetensors only, never a pickle)" if others else ""))
    return folder, files


def _base_tensors(model: Any, base: Any, unchecked: list[str]) -> list[tuple[str, torch.Tensor, str, str]]:
    """The input embedding's weight and the output head's weight and bias as the base has them,
    under PEFT's wrappers: a LoRA or trainable-tokens layer's ``base_layer``, a ``modules_to_save``
    wrapper's ``original_module`` (its trained copy is the adapter's). Each with its name in the
    model and its module path in the base (PEFT's own segments left out). A tied head is the
    embedding: its rows are compared once."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper, TrainableTokensWrapper

    live_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    base_paths = {id(m): n for n, m in base.named_modules(remove_duplicate=False)}
    out: list[tuple[str, torch.Tensor, str, str]] = []
    embedding_weight = None
    for what, getter in (("the input embedding", "get_input_embeddings"), ("the output head", "get_output_embeddings")):
        try:
            module = getattr(base, getter)() if callable(getattr(base, getter, None)) else None
        except (NotImplementedError, AttributeError):  # a model that does not say which it is
            module = None
        for _ in range(8):  # a wrapper around a wrapper: modules_to_save around a LoRA layer
            if isinstance(module, TrainableTokensWrapper):
                module = module.token_adapter  # a tuner layer: its base_layer, unless merged
            elif isinstance(module, AuxiliaryTrainingWrapper):
                module = module.original_module
            elif isinstance(module, BaseTunerLayer):
                if module.merged:
                    unchecked.append(f"{what}: its adapter is merged into its weight ({live_names.get(id(module))})")
                    module = None
                    break
                module = getattr(module, "base_layer", None)
            else:
                break
        if not isinstance(module, torch.nn.Module) or id(module) not in base_paths:
            continue
        path = ".".join(s for s in base_paths[id(module)].split(".")
                        if s not in ("base_layer", "original_module", "token_adapter"))
        for kind in ("weight", "bias"):
            tensor = getattr(module, kind, None)
            if not isinstance(tensor, torch.Tensor):
                continue
            if kind == "weight" and what == "the output head" and embedding_weight is not None and \
                    tensor.data_ptr() == embedding_weight.data_ptr() and tensor.shape == embedding_weight.shape:
                out[0] = (_TIED_HEAD, *out[0][1:])
                continue
            if kind == "weight" and what == "the input embedding":
                embedding_weight = tensor
            out.append((what if kind == "weight" else f"{what}'s bias", tensor,
                        f"{live_names.get(id(module), path)}.{kind}", f"{path}.{kind}"))
    return out


def _checkpoint_keys(path: str, prefix: str) -> list[str]:
    """The names a tensor may have in the checkpoint: its path in the base, without the base's
    prefix (GPT-2's hub checkpoint says ``wte.weight`` for ``transformer.wte.weight``), or with it."""
    if not prefix:
        return [path]
    return [path, path.removeprefix(f"{prefix}.") if path.startswith(f"{prefix}.") else f"{prefix}.{path}"]


def _compare_rows(what: str, live: torch.Tensor, live_name: str, key: str, file: Path,
                  unchecked: list[str]) -> _Rows | None:
    """The rows the live tensor shares with the saved one, compared a slice at a time on the CPU. Equal value for value: the saved rows are cast to the live dtype as the load
    cast them (``Tensor.to``, round to nearest even), and a resize copies rows, so any difference,
    even one ulp, is a change and not a rounding; a NaN is never equal."""
    from safetensors import safe_open

    if live.is_meta or not live.is_floating_point():
        unchecked.append(f"{live_name}: its weights are {'offloaded (on the meta device)' if live.is_meta else live.dtype}")
        return None
    with safe_open(str(file), "pt") as opened:
        saved = opened.get_slice(key)
        shape = list(saved.get_shape())
        if not shape or shape[1:] != list(live.shape[1:]):
            unchecked.append(f"{live_name}: its shape {tuple(live.shape)} does not match the checkpoint's "
                             f"{key} {tuple(shape)} (quantized, or another layout)")
            return None
        rows = _Rows(what, live_name, key, file, shape[0], int(live.shape[0]))
        if rows.saved_rows == rows.live_rows:
            return rows
        step = max(1, 2 ** 22 // max(1, math.prod(shape[1:])))  # rows in 4M values: 16 MB in float32
        for start in range(0, rows.common, step):
            stop = min(rows.common, start + step)
            old = saved[start:stop]  # (rows, H): only these rows are read from the file
            bad = locate(old, ("row", "column"), offsets=(start,))
            if bad is not None:
                rows.non_finite = bad
                return rows
            new = live.detach()[start:stop].cpu()
            differ = (new != old.to(new.dtype)).reshape(stop - start, -1).any(dim=1)  # (rows,)
            if rows.first < 0 and bool(differ.any()):
                rows.first = start + int(differ.nonzero()[0])
            rows.changed += int(differ.sum())
    return rows


class _Coverage:
    """Which of the base's linear layers carry an adapter, by block, and what each pattern matched."""

    def __init__(self, adapted: list[str], plain: list[str], unmatched: list[str], patterns: str,
                 chosen_layers: bool, adapted_parameters: int, linear_parameters: int) -> None:
        self.adapted, self.plain, self.unmatched, self.patterns = adapted, plain, unmatched, patterns
        self.chosen_layers = chosen_layers
        self.adapted_parameters, self.linear_parameters = adapted_parameters, linear_parameters

    @property
    def share(self) -> float:
        return len(self.adapted) / max(1, len(self.adapted) + len(self.plain))

    def blocks_without(self) -> list[str]:
        """The blocks of a layer stack (``...layers.3``) with linear layers but no adapter."""
        def block(name: str) -> str | None:
            found = re.match(r"^(.*?\.\d+)\.", name)
            return found.group(1) if found else None

        covered = {block(n) for n in self.adapted} - {None}
        return sorted({b for b in map(block, self.plain) if b is not None} - covered,
                      key=lambda b: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", b)])

    def problems(self, minimum: float) -> list[str]:
        out = []
        if self.unmatched:
            out.append(f"target_modules pattern(s) {', '.join(map(repr, self.unmatched))} match no module (of "
                       f"{self.patterns}): PEFT accepts a partial match silently (peft #40); fix the name")
        if self.share < minimum:
            out.append(f"the adapter covers {len(self.adapted)} of the base's {len(self.adapted) + len(self.plain)} "
                       f"linear layers ({self.share:.0%}, below {minimum:.0%}; {self.adapted_parameters:,} of "
                       f"{self.linear_parameters:,} linear weights): target_modules covers too little of the model "
                       f"(peft #3554: 7% of NemotronH's layers, the DPO loss stuck at ln 2)")
        missing = self.blocks_without()
        if missing and self.adapted and not self.chosen_layers:
            out.append(f"{len(missing)} block(s) carry no adapter (first: {missing[0]}), though others do: "
                       f"target_modules misses their layers")
        return out


def _coverage(model: Any) -> _Coverage:
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    adapted, plain, inside = [], [], set()
    adapted_weights = linear_weights = 0
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            adapted.append(name)
            inside |= {f"{name}.{child}" for child, _ in base.get_submodule(name).named_modules() if child}
            weight = getattr(module.get_base_layer(), "weight", None)
            count = weight.numel() if isinstance(weight, torch.Tensor) else 0
            adapted_weights, linear_weights = adapted_weights + count, linear_weights + count
        elif _linear(module) and name not in inside and module is not head:
            plain.append(name)
            linear_weights += module.weight.numel()
    names = adapted + plain
    unmatched: list[str] = []
    described = []
    chosen = False
    for config in model.peft_config.values():
        targets = getattr(config, "target_modules", None)
        chosen = chosen or getattr(config, "layers_to_transform", None) is not None
        if isinstance(targets, str):
            described.append(repr(targets))
            if targets != "all-linear" and not any(re.fullmatch(targets, n) for n in names):
                unmatched.append(targets)
        elif targets:
            shown = sorted(map(repr, targets))
            described.append(", ".join(shown[:4]) + (f" and {len(shown) - 4} more" if len(shown) > 4 else ""))
            unmatched += sorted(t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names))
    return _Coverage(adapted, plain, unmatched, "; ".join(described) or "no target_modules", chosen,
                     adapted_weights, linear_weights)


def _linear(module: torch.nn.Module) -> bool:
    """A linear layer: ``torch.nn.Linear``, or transformers' ``Conv1D`` (GPT-2's, a transposed one)."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


@contextlib.contextmanager
def _put_back(model: Any, trainable: list[tuple[str, torch.nn.Parameter]]) -> Iterator[None]:
    """The trainable parameters, their gradients, the active adapter and the generators as they were."""
    saved = [(p, p.detach().clone(), p.grad) for _, p in trainable]
    active, state = getattr(model, "active_adapter", None), rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, value, grad in saved:
                parameter.copy_(value)
                parameter.grad = grad
        if isinstance(active, str) and getattr(model, "active_adapter", None) != active:
            model.set_adapter(active)
        set_rng_state(state)


def _loss(model: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).loss


def _train(model: Any, inputs: Mapping[str, torch.Tensor], trainable: list[tuple[str, torch.nn.Parameter]],
           steps: int, lr: float, metrics: dict[str, Any]) -> list[str]:
    """``steps`` AdamW steps on the trainable parameters: which adapter parameters got a
    finite, non-zero gradient, and whether every lora_B left zero."""
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=lr, weight_decay=0.0)
    reached: set[str] = set()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(model, inputs)
        require_finite(loss.detach(), "the loss at the probe's step", ())
        if not loss.requires_grad:
            checkpointing = getattr(model.get_base_model(), "is_gradient_checkpointing", False)
            return [("the loss does not require grad: nothing trainable is on its path"
                     + (" (gradient checkpointing is on: with use_reentrant=True and frozen embeddings no input of "
                        "a checkpointed block requires grad, so its adapters get none; call "
                        "model.enable_input_require_grads() or use use_reentrant=False: transformers #26334, "
                        "#42489)" if checkpointing else ""))]
        loss.backward()
        for name, parameter in trainable:
            grad = parameter.grad
            found = locate(grad, ("index",) * grad.dim()) if grad is not None else None
            if found is not None:
                return [f"the gradient of {name} is not finite at the probe's step: {found}"]
            if grad is not None and bool(grad.any()):
                reached.add(name)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    adapter = [n for n, _ in trainable if ".lora_" in n]
    silent = [n for n in adapter if n not in reached]
    still_zero = [n for n, p in trainable if ".lora_B." in n and not bool(p.detach().any())]
    metrics.update(adapter_parameters=len(adapter), trained_parameters=len(reached), steps=steps)
    problems = []
    if silent:
        checkpointing = getattr(model.get_base_model(), "is_gradient_checkpointing", False)
        problems.append(f"{len(silent)} of {len(adapter)} adapter parameters get no gradient in {steps} steps "
                        f"(first: {silent[0]})" + ("; gradient checkpointing is on: with use_reentrant=True and frozen "
                                                   "embeddings its blocks get none (transformers #26334)"
                                                   if checkpointing else ""))
    if still_zero:
        problems.append(f"{len(still_zero)} lora_B weight(s) stay zero after {steps} steps (first: {still_zero[0]}): "
                        f"the adapter's output stays zero (peft #1402)")
    return problems


def _logits(model: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits.float()


def _effects(model: Any, inputs: Mapping[str, torch.Tensor], trainable: list[tuple[str, torch.nn.Parameter]],
             metrics: dict[str, Any]) -> list[str]:
    """The trained adapter against the base, against itself saved and reloaded, and merged."""
    problems = []
    training = model.training
    model.eval()  # the comparisons are of one model's outputs: no dropout between them
    try:
        adapter = _logits(model, inputs)
        with model.disable_adapter():
            base = _logits(model, inputs)
        effect = float((adapter - base).abs().max())
        metrics["adapter_effect"] = effect
        if effect <= LOGITS_ATOL:
            problems.append(f"the adapter changes nothing: its logits equal the base model's (max difference "
                            f"{effect:.2g}) after training: its scaling is 0 or it is not active (peft #793)")
        problems += _saved(model, inputs, adapter, trainable, metrics)
        problems += _merged(model, metrics)
    finally:
        model.train(training)
    return problems


def _merged(model: Any, metrics: dict[str, Any], layers: int = 8) -> list[str]:
    """Each of the first ``layers`` adapted layers, its weight merged out of place (the base
    weight plus the adapter's ``get_delta_weight``, as ``merge_and_unload`` adds it), against the
    layer with its adapter, on random inputs. Out of place: merging into a half-precision weight
    and unmerging would not give the user's weight back."""
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    worst, name_at, unchanged = 0.0, "", []
    generator = torch.Generator().manual_seed(0)
    found: list[tuple[str, Any]] = [(n, m) for n, m in model.named_modules()
                                    if isinstance(m, LoraLayer) and adapter in m.lora_A][:layers]
    for name, layer in found:
        base = layer.get_base_layer()
        weight: torch.Tensor = base.weight
        x = torch.randn(2, layer.in_features, generator=generator).to(weight.device, weight.dtype)
        delta = layer.get_delta_weight(adapter)
        with torch.no_grad():
            with_adapter = layer(x).float()
            # in the base's dtype, as merging adds the delta in place: PEFT keeps a half-precision
            # base's adapter weights (and so the delta) in float32
            merged_weight = (weight + delta).to(weight.dtype)
            merged = torch.func.functional_call(base, {**dict(base.named_parameters()), "weight": merged_weight},
                                                (x,)).float()
        gap = float((merged - with_adapter).abs().max() / with_adapter.abs().max().clamp(min=1e-12))
        if gap > worst:
            worst, name_at = gap, name
        if not bool(delta.any()) and not torch.equal(with_adapter, base(x).float()):
            unchanged.append(name)
    metrics["merged_gap"] = worst
    if unchanged:
        return [f"merging changes no weight of {unchanged[0]} ({len(unchanged)} layer(s)), though its adapter changes "
                f"its output: merge_and_unload would leave the weights as they were (peft #918)"]
    if worst > MERGE_RTOL:
        return [f"the merged weight of {name_at} gives outputs {worst:.3g} away from the layer with its adapter "
                f"(relative; tolerance {MERGE_RTOL:g}): merge_and_unload would change what the model computes"]
    return []


def _saved(model: Any, inputs: Mapping[str, torch.Tensor], adapter: torch.Tensor,
           trainable: list[tuple[str, torch.nn.Parameter]], metrics: dict[str, Any]) -> list[str]:
    """``save_pretrained`` into a temporary folder: every trainable tensor in it, and the adapter
    loaded back (as a second adapter of the same model: no copy of the base) gives the same logits."""
    from safetensors import safe_open

    active = model.active_adapter
    problems = []
    with tempfile.TemporaryDirectory(prefix="lmcheck-adapter-") as folder:
        model.save_pretrained(folder, selected_adapters=[active])
        files = sorted(Path(folder).rglob("adapter_model.safetensors"))
        keys: set[str] = set()
        for file in files:
            with safe_open(str(file), "pt") as opened:
                keys |= set(opened.keys())
        metrics["saved_tensors"] = len(keys)
        missing = [n for n, _ in trainable if not _saved_as(n, active, keys)]
        if missing:
            lora = [n for n in missing if ".lora_" in n]
            problems.append(f"{len(missing)} trainable parameter(s) are not in the saved adapter (first: "
                            f"{missing[0]})" + (": its adapter weights are missing, as in an 888-byte adapter "
                                                "file (transformers #24551)" if lora else
                                                ": a reloaded model gets the base's values, so what they learned "
                                                "is lost (a resized embedding: artidoro/qlora #214); put them in "
                                                "modules_to_save or trainable_token_indices, or save with "
                                                "save_embedding_layers=True"))
        reloaded = "lmcheck_reloaded"
        model.load_adapter(folder, adapter_name=reloaded)
        try:
            model.set_adapter(reloaded)
            again = _logits(model, inputs)
        finally:
            model.set_adapter(active)
            model.delete_adapter(reloaded)
    gap = float((again - adapter).abs().max())
    metrics["reloaded_gap"] = gap
    if gap > LOGITS_ATOL:
        problems.append(f"the adapter saved with save_pretrained and loaded back gives logits {gap:.3g} away from "
                        f"the adapter's (tolerance {LOGITS_ATOL:g}): what it learned is not all in its files")
    return problems


def _saved_as(name: str, adapter: str, keys: set[str]) -> bool:
    """Whether a trainable parameter is among the saved tensors: PEFT saves ``...lora_A.default.weight``
    as ``...lora_A.weight``, ``...modules_to_save.default.weight`` as ``...weight``, and a parameter
    dict's entry (``...trainable_tokens_delta.default``, ``...lora_embedding_A.default``) without the
    adapter's name."""
    plain = name.removesuffix(f".{adapter}").replace(f".{adapter}.", ".").replace(".modules_to_save.", ".") \
        .replace(".original_module.", ".")
    return plain in keys or any(key.endswith(plain.split("base_model.model.", 1)[-1]) for key in keys)


def _tying(model: Any) -> list[str]:
    """Where the config ties the embeddings, the head's weight is the input embedding's."""
    base = model.get_base_model()
    config: Any = getattr(base, "config", None)
    tied = getattr(config, "tie_word_embeddings", None)
    if hasattr(config, "get_text_config"):
        tied = getattr(config.get_text_config(), "tie_word_embeddings", tied)
    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    if not tied or head is None or embedding is None:
        return []
    head_weight = getattr(head, "weight", None)
    embedding_weight = getattr(embedding, "weight", None)
    if isinstance(head_weight, torch.Tensor) and isinstance(embedding_weight, torch.Tensor) and \
            head_weight.data_ptr() != embedding_weight.data_ptr():
        return [f"the config ties the embeddings (tie_word_embeddings=True) but the output head is a tensor of its "
                f"own ({tuple(head_weight.shape)} against the input embedding's {tuple(embedding_weight.shape)}): a "
                f"resize or a load that did not tie them again; call model.tie_weights()"]
    return []


def _result(problems: list[str], coverage: _Coverage, metrics: dict[str, Any]) -> Result:
    metrics = {**metrics, "coverage": coverage.share, "adapted_layers": len(coverage.adapted),
               "linear_layers": len(coverage.adapted) + len(coverage.plain), "unmatched_patterns": coverage.unmatched}
    note = metrics.get("resize_note", "")
    if problems:
        # a part that could not run is said beside the failures too, never left out
        unchecked = [note] if metrics.get("resize_check") == "not checked" else []
        return Result(name=NAME, passed=False, metrics=metrics, explanation="; ".join(problems + unchecked))
    return Result(name=NAME, passed=True, metrics=metrics,
                  explanation=f"the adapter covers {len(coverage.adapted)} of {metrics['linear_layers']} linear layers "
                              f"({coverage.share:.0%}; every pattern of {coverage.patterns} matched), every adapter "
                              f"parameter trained in {metrics.get('steps', 0)} steps and every lora_B left zero; "
                              f"saved and reloaded it gives the same logits ({metrics.get('reloaded_gap', 0):.1g}), "
                              f"merged layers too ({metrics.get('merged_gap', 0):.1g} relative), and it changes the base's "
                              f"(by {metrics.get('adapter_effect', 0):.2g})" + (f"; {note}" if note else ""))
