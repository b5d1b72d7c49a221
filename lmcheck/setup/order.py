"""The data-order family of the setup checks: ``data_order`` (each epoch a new order of the same
examples, none repeated; for a loop that samples with replacement, rows that differ from draw to
draw). Rows are told apart by fingerprints of their unpadded ids."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmcheck._ranks import fingerprint, world_size
from lmcheck.results import Result
from lmcheck.setup.batches import epoch_batches

_ORDER_ROWS = 4096  # rows read per epoch by data_order


def dataset_keys(dataset: Any) -> list[str] | None:
    """One fingerprint per example of a small map-style dataset (its ``input_ids``; one per
    document of a packed example), to tell
    repeated and skipped examples apart; None where there is none to read. Under torchrun a rank
    sees only its share of the dataset (data_sharding compares the shares): None there too."""
    if world_size() > 1 or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) \
            or len(dataset) > _ORDER_ROWS:
        return None
    try:
        return [key for i in range(len(dataset)) for key in _example_keys(dataset[i])]
    except (TypeError, KeyError, ValueError, IndexError, RuntimeError):
        return None


def _example_keys(example: Any) -> list[str]:
    """An example's key; a packed example's (TRL's, with its ``seq_lengths``) one per document,
    as :func:`row_keys` keys the packed rows its collator makes."""
    ids = torch.as_tensor(_example_ids(example))
    lengths = example.get("seq_lengths") if isinstance(example, Mapping) else None
    if lengths is None or ids.dim() != 1 or sum(lengths) != len(ids):
        return [fingerprint(ids)]
    return [fingerprint(piece) for piece in ids.split(list(lengths))]


def epoch_keys(batches: Iterable[Any], convert: Callable[[Any, int], dict[str, torch.Tensor]],
                limit: int = _ORDER_ROWS) -> tuple[list[str], bool]:
    """One key per row (its unpadded ids) over one pass, and whether the pass ended within
    ``limit`` rows (it stops at the batch that reaches it)."""
    keys: list[str] = []
    for index, batch in enumerate(batches):
        keys += row_keys(convert(batch, index))
        if len(keys) >= limit:
            return keys, False
    return keys, True


def row_keys(batch: Mapping[str, torch.Tensor]) -> list[str]:
    """One key per example in a batch in lmcheck's form: the fingerprint of a row's unpadded ids,
    or, in a packed row (``position_ids`` that restart), of each document's."""
    ids, mask, positions = batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids")
    if mask is not None and mask.shape != ids.shape:  # a 4-D mask: the ids as they are
        mask = None
    keys = []
    for row in range(ids.shape[0]):
        kept = torch.ones_like(ids[row], dtype=torch.bool) if mask is None else mask[row].bool()
        if positions is not None and positions.shape == ids.shape:
            starts = ((positions[row] == 0) & kept).nonzero().flatten().tolist() or [0]
            ends = starts[1:] + [ids.shape[1]]
            keys += [fingerprint(ids[row, a:b][kept[a:b]]) for a, b in zip(starts, ends, strict=True)]
        else:
            keys.append(fingerprint(ids[row][kept]))
    return keys


def _two_epochs(epochs: Sequence[tuple[list[str], bool]], dataset: list[str] | None) -> Result:
    name = "data_order"
    (first, whole), (second, _) = epochs
    problems = []
    for number, (keys, complete) in enumerate(epochs, 1):
        counts = Counter(keys)
        allowed = Counter(dataset) if dataset is not None else Counter({k: 1 for k in counts})
        repeated = [k for k, c in counts.items() if c > max(1, allowed.get(k, 0))]
        if repeated:
            rows = [i for i, k in enumerate(keys) if k == repeated[0]]
            problems.append(f"epoch {number} repeats an example (rows {rows[0]} and {rows[1]}; {len(repeated)} "
                            f"repeated): a sampler that draws with replacement, or shards that overlap")
            break
        if dataset is not None and complete:
            missing = sum((Counter(dataset) - counts).values())
            if missing > len(dataset) // 2 or (missing and len(keys) + missing != len(dataset)):
                problems.append(f"epoch {number} skips {missing} of {len(dataset)} examples")
                break
    if first == second:
        problems.append(f"epoch 2 sees the {len(first)} rows in the same order as epoch 1: the data is not "
                        f"reshuffled each epoch (shuffle off, a generator reseeded every epoch, or a "
                        f"DistributedSampler whose set_epoch is never called: pytorch #31771)")
    elif sorted(first) != sorted(second) and whole and world_size() == 1:  # a rank's share may change
        problems.append("epoch 2 holds other examples than epoch 1")
    passed = not problems
    coverage = "whole epochs" if whole else f"the first {len(first)} rows of each epoch"
    held = ("this rank's share of" if world_size() > 1 else "the same examples in")
    return Result(name=name, passed=passed, metrics={"rows_per_epoch": len(first), "whole_epochs": whole},
                  explanation=(f"two epochs ({coverage}) hold {held} different orders, none repeated"
                               if passed else "; ".join(problems)))


@dataclass(frozen=True)
class Epochs:
    """What ``data_order`` reads: two passes over the data (each pass's row keys and whether it
    ended within the rows read) and the dataset's own keys where known; or, for a loop that
    samples with replacement, each batch's row keys (``draws``); or why there is nothing to read."""

    passes: tuple[tuple[list[str], bool], ...] = ()
    dataset: list[str] | None = None
    draws: tuple[list[str], ...] | None = None
    not_applicable: str = ""


def data_order(epochs: Epochs) -> Result:
    """The judge: two epochs hold the same examples in different orders, none repeated; drawn
    batches (sampling with replacement) differ from one another."""
    if epochs.not_applicable:
        return Result.not_applicable("data_order", epochs.not_applicable)
    if epochs.draws is not None:
        return _draws(epochs.draws)
    return _two_epochs(epochs.passes, epochs.dataset)


def loop_epochs(batches: Iterable[Any], convert: Callable[[Any, int], dict[str, torch.Tensor]],
                batches_of_epoch: Callable[[int], Iterable[Any]] | None = None) -> Epochs:
    """Two epochs of a plain loop's batches: ``batches_of_epoch(0)`` and ``(1)`` where given, else
    two passes over ``batches`` (a DataLoader reshuffles on each)."""
    if batches_of_epoch is not None:
        return Epochs(passes=tuple(epoch_keys(epoch_batches(batches_of_epoch, epoch), convert) for epoch in (0, 1)))
    if iter(batches) is batches:
        return Epochs(not_applicable="'batches' is a one-shot iterator, so it has no second epoch to compare; "
                                     "pass the DataLoader itself")
    dataset = dataset_keys(getattr(batches, "dataset", None))
    passes = [epoch_keys(batches, convert), epoch_keys(batches, convert)]
    if getattr(batches, "drop_last", False):  # each epoch leaves out other rows: not whole epochs
        passes = [(keys, False) for keys, _ in passes]
    return Epochs(passes=tuple(passes), dataset=dataset)


def sampled_epochs(batches: Sequence[Any], convert: Callable[[Any, int], dict[str, torch.Tensor]]) -> Epochs:
    """The draws of a loop that samples random rows or windows at every step (with replacement,
    nanoGPT's ``get_batch``): there are no epochs, so each batch's rows are compared."""
    return Epochs(draws=tuple(epoch_keys([batch], convert)[0] for batch in batches))


def _draws(keyed: Sequence[list[str]]) -> Result:
    """The rows must differ from batch to batch; whether the seed matters is ``reproducible``'s
    to check."""
    name = "data_order"
    rows = [key for keys in keyed for key in keys]
    if len(keyed) < 2:
        return Result.not_applicable(name, "one batch was seen, so there is no second draw to compare it with")
    problems = []
    same = next((i for i in range(1, len(keyed)) if keyed[i] == keyed[i - 1]), None)
    if same is not None:
        problems.append(f"batches {same - 1} and {same} hold the same rows in the same order: the draw repeats "
                        f"itself (a generator reseeded at every step)")
    distinct = len(set(rows))
    if distinct < len(rows) / 2:
        problems.append(f"only {distinct} of the {len(rows)} rows drawn in {len(keyed)} batches differ: the draw "
                        f"keeps returning the same rows")
    passed = not problems
    return Result(name=name, passed=passed,
                  metrics={"batches": len(keyed), "rows": len(rows), "distinct_rows": distinct},
                  explanation=(f"sampling with replacement: {distinct} of the {len(rows)} rows drawn in {len(keyed)} "
                               f"batches differ, and no batch repeats the one before it" if passed
                               else "; ".join(problems)))


def _example_ids(example: Any) -> Any:
    if isinstance(example, Mapping):
        return example["input_ids"]  # KeyError: no input_ids, no key
    if isinstance(example, (tuple, list)) and example and isinstance(example[0], torch.Tensor):
        return example[0]
    return example
