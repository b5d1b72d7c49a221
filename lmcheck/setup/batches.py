"""The user's batches in lmcheck's form, read without changing them: conversion, the eos and
BOS ids, the batch checks (``batch_supervision``, ``causal_batch``), collating compared with the
examples and ``inputs_unchanged``, and reading a loader that can be put back."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from lmcheck._model import IGNORE_INDEX, hf_model
from lmcheck._validate import check_bool, describe
from lmcheck.errors import InputError, LmcheckError
from lmcheck.results import Result
from lmcheck.supervision import batch_supervision
from lmcheck.training import causal_batch

# The reason the checks that need supervised tokens give where the batches have none: the root
# cause is batch_supervision's to say, once.
UNSUPERVISED = ("follows from batch_supervision: the first batches supervise no token (every label is -100), "
                "so there is no loss to train on")

Collated = tuple[list[str], int, int]  # collating's problems, examples compared, examples with labels compared


def converter(as_batch: Callable[[Any], Mapping[str, torch.Tensor]] | None) -> Callable[[Any, int], dict[str, torch.Tensor]]:
    """A function from one of the user's batches (and its index) to lmcheck's form: a dict with
    ``input_ids`` and ``labels`` (unshifted) or ``targets`` (next-token), ``attention_mask`` and
    ``position_ids`` (a packed row's, restarting at each document) where given."""
    def convert(batch: Any, index: int) -> dict[str, torch.Tensor]:
        where = f"batch {index}"
        if as_batch is not None:
            made = as_batch(batch)
            if not isinstance(made, Mapping) or "input_ids" not in made or not ({"labels", "targets"} & set(made)):
                raise InputError(f"'as_batch' must return a mapping with 'input_ids' and 'labels' or 'targets' "
                                 f"(got {describe(made)} for {where})")
            out = {k: v for k, v in made.items() if isinstance(v, torch.Tensor)}
        elif isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
            out = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids")
                   if isinstance(batch.get(k), torch.Tensor)}
            if "labels" not in out and isinstance(batch.get("completion_mask"), torch.Tensor):
                # a preference batch (TRL's DPO collator): its completions are what it trains on
                out["labels"] = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
            elif "labels" not in out:  # the model's own labels are the inputs; lmcheck's copy masks pads
                out["labels"] = _labels_from(batch["input_ids"], out.get("attention_mask"))
        elif isinstance(batch, torch.Tensor):
            out = {"input_ids": batch, "labels": _labels_from(batch, None)}
        elif isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch) \
                and batch[0].shape == batch[1].shape:
            out = {"input_ids": batch[0], "targets": batch[1]}
        else:
            raise InputError(f"'batches' must yield mappings with 'input_ids', (B, T) tensors of ids or "
                             f"(x, y) pairs of inputs and next-token targets (got {describe(batch)} for "
                             f"{where}); give as_batch=lambda batch: {{'input_ids': ..., 'labels': ...}}")
        ids = out["input_ids"]
        if ids.dim() != 2 or ids.dtype.is_floating_point:
            raise InputError(f"the input_ids of {where} must be a (B, T) integer tensor (got {describe(ids)})")
        return {k: v.detach() for k, v in out.items()}

    return convert


def packing_of(collator: Any, arguments: Any = None, packed: bool = False) -> str | None:
    """What says the rows hold several documents each that must not see each other: the user's
    ``packed=True``, a packing collator (transformers' ``DataCollatorWithFlattening``, TRL's
    padding-free one) or TRL's ``packing``/``padding_free`` arguments; None where nothing does
    (position ids that restart inside a row say it too, read from the batches)."""
    if check_bool(packed, "packed"):
        return "packed=True"
    if type(collator).__name__ == "DataCollatorWithFlattening":
        return "the collator, a DataCollatorWithFlattening"
    if getattr(collator, "padding_free", False) is True:
        return f"the collator's padding_free=True ({type(collator).__name__})"
    for option in ("packing", "padding_free"):
        if getattr(arguments, option, False) is True:
            strategy = getattr(arguments, "packing_strategy", None) if option == "packing" else None
            return f"{option}=True in the trainer's arguments" + (f" (packing_strategy={strategy!r})" if strategy else "")
    return None


@dataclasses.dataclass(frozen=True)
class Supervision:
    """What the setup says it trains on, for the chat-turn rules of ``batch_supervision``:
    ``completion_only`` (None: read from the batches), ``assistant_only`` and what said so."""

    completion_only: bool | None = None
    assistant_only: bool = False
    source: str = ""


READ_FROM_BATCHES = Supervision()  # nothing declared: the chat-turn rules read the setup off the batches


def supervision_of(arguments: Any, dataset: Any) -> Supervision:
    """TRL's arguments: ``assistant_only_loss=True`` trains on every assistant turn and nothing
    else; prompt-completion data (``prompt`` and ``completion`` columns) trains on completions
    unless ``completion_only_loss=False``. Anything else: read from the batches."""
    if type(arguments).__name__ == "DPOConfig":
        return Supervision(True, False, "a preference trainer: the completions of chosen and rejected rows")
    if getattr(arguments, "assistant_only_loss", False) is True:
        return Supervision(True, True, "assistant_only_loss=True in the trainer's arguments")
    columns = set(getattr(dataset, "column_names", None) or ())
    if {"prompt", "completion"} <= columns and getattr(arguments, "completion_only_loss", None) is not False:
        return Supervision(True, False, "prompt-completion data, completion_only_loss not False")
    return READ_FROM_BATCHES


def _labels_from(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Labels for a batch that brings none: a copy of the ids (never the same memory), -100 at pads."""
    labels = ids.clone()
    if mask is not None and mask.shape == ids.shape:
        labels[mask == 0] = IGNORE_INDEX
    return labels


def labels_form(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch with ``labels`` (Hugging Face's unshifted form); next-token targets become labels
    one position later (the last target has no place and is dropped)."""
    out = dict(batch)
    if "targets" in out:
        targets = out.pop("targets")
        labels = torch.full_like(targets, IGNORE_INDEX)
        labels[:, 1:] = targets[:, :-1]
        out["labels"] = labels
    return out


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Where the eos and BOS checks get their ids: a tokenizer (also for the chat template's
    end-of-turn token and which tokens are whitespace), else ids read from the model."""

    tokenizer: Any  # a Hugging Face tokenizer, or None
    end_ids: frozenset[int]
    bos_id: int | None
    source: str


def special_ids(tokenizer: Any, collator: Any, model: torch.nn.Module) -> SpecialIds:
    """The tokenizer given, else the collator's own (``collator.tokenizer``, as transformers'
    and TRL's collators keep it), else the model's config and generation config."""
    from transformers import PreTrainedTokenizerBase

    for candidate, source in ((tokenizer, "the tokenizer"),
                              (getattr(collator, "tokenizer", None), "the collator's tokenizer"),
                              (getattr(collator, "processing_class", None), "the collator's tokenizer")):
        if isinstance(candidate, PreTrainedTokenizerBase):
            return SpecialIds(candidate, frozenset(), None, source)
    ends: set[int] = set()
    bos = None
    base = hf_model(model) or model
    for config in (getattr(base, "config", None), getattr(base, "generation_config", None)):
        eos = getattr(config, "eos_token_id", None)  # an id, a list of them, or None
        ends |= {i for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if isinstance(i, int) and not isinstance(i, bool)}
        bos = bos if bos is not None else getattr(config, "bos_token_id", None)
    bos = bos if isinstance(bos, int) and not isinstance(bos, bool) else None
    if ends or bos is not None:
        return SpecialIds(None, frozenset(ends), bos, "the model's config (no tokenizer given)")
    return SpecialIds(None, frozenset(), None, "nowhere (no tokenizer, and the model's config names none)")


def batch_checks(lm_batches: list[dict[str, torch.Tensor]], special: SpecialIds,
                  expect_eos: bool | None, supervision: Supervision = READ_FROM_BATCHES) -> list[Result]:
    """batch_supervision and causal_batch on each of the first batches: the first failure, else
    the first batch's pass with the supervised fraction over all of them."""
    padded = any("attention_mask" in b and bool((b["attention_mask"] == 0).any()) for b in lm_batches)
    eos = padded if expect_eos is None else check_bool(expect_eos, "expect_eos")
    out = []
    for check in (lambda b: batch_supervision(b, special.tokenizer, expect_eos=eos, end_ids=special.end_ids,
                                              bos_id=special.bos_id, completion_only=supervision.completion_only,
                                              assistant_only=supervision.assistant_only),
                  lambda b: causal_batch(b, max_ignored_fraction=1.0)):
        results = [check(labels_form(b)) for b in lm_batches]
        failed = next(((i, r) for i, r in enumerate(results) if not r.passed), None)
        if failed is not None:
            index, result = failed
            out.append(dataclasses.replace(result, explanation=f"batch {index}: {result.explanation}"))
        else:
            out.append(dataclasses.replace(
                results[0], explanation=f"{len(results)} batches checked: {results[0].explanation}"
                + (" (rows end with eos: checked because they are padded examples)" if eos and expect_eos is None else "")
                + ("" if special.source == "the tokenizer" else f"; eos and BOS from {special.source}")))
    return out


def supervised_count(batch: Mapping[str, torch.Tensor]) -> int:
    """The tokens a batch in lmcheck's form trains on: next-token targets, or labels after the shift."""
    if "targets" in batch:
        return int((batch["targets"] != IGNORE_INDEX).sum())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _batch_ids(batch: Any) -> Any:
    """The token ids of one of the user's batches, in whatever form it came (mapping, pair, tensor)."""
    return batch.get("input_ids") if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (tuple, list)) and batch else batch


def ids_copy(batch: Any) -> torch.Tensor | None:
    ids = _batch_ids(batch)
    return ids.detach().clone() if isinstance(ids, torch.Tensor) else None


def _first_difference(before: torch.Tensor, after: torch.Tensor, where: str) -> str:
    row, column = (int(i) for i in (before != after).nonzero()[0])
    return (f"the step changed the input_ids of {where} in place (first at row {row}, position {column}: "
            f"{int(before[row, column])} became {int(after[row, column])}); a loss mask written into labels "
            f"that alias input_ids does this (Fast-LLM #253): clone the labels")


def note_changed_ids(changes: list[str], before: torch.Tensor | None, after: torch.Tensor | None,
                      where: str) -> bool:
    """Whether a step changed the batch's ids in place; the first such change is noted in ``changes``."""
    if before is None or after is None or torch.equal(before, after):
        return False
    if not changes:
        changes.append(_first_difference(before, after, where))
    return True


def put_ids_back(batch: Any, saved: torch.Tensor) -> None:
    ids = _batch_ids(batch)
    if isinstance(ids, torch.Tensor) and ids.shape == saved.shape:
        with torch.no_grad():
            ids.copy_(saved)


_COLLATED_EXAMPLES = 8  # examples of the dataset compared with their collated rows


def collating_problems(dataset: Any, collate: Callable[[Any], Any],
                        columns: Callable[[list[Any]], list[Any]]) -> tuple[list[str], int, int]:
    """Collate the dataset's first examples as the loader would and compare: at each example's
    real positions (attention_mask 1) the collated ``input_ids`` must be the example's, and every
    position after the first that the example's own ``labels`` set to -100 must still be -100.
    Returns (problems, examples compared, examples with labels compared). What cannot be
    compared position by position is skipped: a collator that raises on these examples, rows
    packed, truncated or given extra tokens, and, without an attention_mask, rows longer than
    their example."""
    try:
        examples = [dataset[i] for i in range(min(_COLLATED_EXAMPLES, len(dataset)))]
    except Exception:  # a dataset that cannot be indexed like this: nothing to compare
        return [], 0, 0
    if not examples or not all(isinstance(e, Mapping) and "input_ids" in e for e in examples):
        return [], 0, 0
    wanted = [(_id_list(e["input_ids"]), _id_list(e["labels"]) if "labels" in e else None) for e in examples]
    try:
        batch = collate(columns([dict(e) for e in examples]))
    except Exception:  # the user's collator, called outside their loader: not comparable
        return [], 0, 0
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != len(examples):
        return [], 0, 0
    labels = batch.get("labels")
    labels = labels if isinstance(labels, torch.Tensor) and labels.shape == ids.shape else None
    mask = batch.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.shape == ids.shape else None
    problems: list[str] = []
    compared = labelled = 0
    changed_ids = dropped_labels = None
    for row, (example_ids, example_labels) in enumerate(wanted):
        if example_ids is None:
            continue
        # the real positions: attention_mask 1; without a mask only rows as long as their example
        positions = mask[row].nonzero().flatten().tolist() if mask is not None else list(range(ids.shape[1]))
        if len(positions) != len(example_ids):
            continue  # truncated, packed or tokens added: not comparable position by position
        compared += 1
        got = ids[row, positions].tolist()
        if got != example_ids and changed_ids is None:
            at = next(i for i, (a, b) in enumerate(zip(example_ids, got, strict=True)) if a != b)
            changed_ids = (f"collating changed the input_ids of example {row} (position {at}: {example_ids[at]} "
                           f"became {got[at]}); a loss mask written in place into labels that alias "
                           f"input_ids does this (Fast-LLM #253): clone the labels")
        if labels is not None and example_labels is not None and len(example_labels) == len(example_ids):
            labelled += 1
            collated = labels[row, positions].tolist()
            lost = [i for i, (a, b) in enumerate(zip(example_labels, collated, strict=True))
                    if i > 0 and a == IGNORE_INDEX and b != IGNORE_INDEX]  # the first is never a target
            if lost and dropped_labels is None:
                masked = sum(v == IGNORE_INDEX for v in example_labels[1:])
                dropped_labels = (f"the collator supervises {len(lost)} of the {masked} positions that example "
                                  f"{row}'s own labels ignore with -100 (first: its token {lost[0]}, now "
                                  f"labelled {collated[lost[0]]}): it rebuilds labels from input_ids and drops the "
                                  f"user's (transformers #26357); use a collator that keeps the labels "
                                  f"(DataCollatorForSeq2Seq pads them with -100)")
    problems += [p for p in (changed_ids, dropped_labels) if p is not None]
    return problems, compared, labelled


def _id_list(value: Any) -> list[int] | None:
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    if tensor.dim() != 1 or tensor.dtype.is_floating_point:
        return None
    return [int(v) for v in tensor.tolist()]


def inputs_unchanged(problems: list[str], collated: tuple[list[str], int, int]) -> Result:
    collating, compared, labelled = collated
    problems = [*collating, *problems]
    passed = not problems
    if compared:
        checked = (f"collating {compared} examples keeps their input_ids"
                   + (f" and every -100 of the labels {labelled} of them bring" if labelled else
                      " (they bring no labels of their own)")
                   + "; input_ids are the same after each step")
    else:
        checked = ("input_ids are the same after each step; collating was not compared with the examples (the "
                   "batches do not come from a DataLoader over a dataset of examples with input_ids)")
    return Result(name="inputs_unchanged", passed=passed,
                  metrics={"problems": len(problems), "examples_compared": compared, "examples_labelled": labelled},
                  explanation=checked if passed else "; ".join(problems))


def loader_state(batches: object) -> Callable[[], None]:
    """A function that puts back the random generators (and a DistributedSampler's epoch) that
    iterating a DataLoader advances."""
    sampler: Any = getattr(batches, "sampler", None)
    generators = [getattr(owner, "generator", None) for owner in (batches, sampler)]
    saved = [(g, g.get_state()) for g in generators if isinstance(g, torch.Generator)]
    epoch = getattr(sampler, "epoch", None)

    def put_back() -> None:
        for generator, state in saved:
            generator.set_state(state)
        if epoch is not None:
            sampler.epoch = epoch

    return put_back


def take(batches: Iterable[Any], count: int, argument: str) -> list[Any]:
    if isinstance(batches, (str, bytes, Mapping)) or not isinstance(batches, Iterable):
        raise InputError(f"'{argument}' must be an iterable of batches, such as a DataLoader or a list "
                         f"(got {describe(batches)})")
    taken: list[Any] = []
    try:
        for batch in batches:
            taken.append(batch)
            if len(taken) >= count:
                break
    except LmcheckError:
        raise
    except Exception as error:  # the user's collator, dataset or sampler: named, traceback chained
        raise InputError(f"'{argument}' raised {type(error).__name__} while lmcheck read batch {len(taken)} "
                         f"(the collator, the dataset or the sampler): {error}") from error
    if not taken:
        raise InputError(f"'{argument}' yielded no batch")
    return taken


def users_code(what: str, function: Callable[..., Any], *arguments: Any) -> Any:
    """``function(*arguments)``, the user's code: what it raises (lmcheck's own errors aside)
    becomes an InputError of one line that begins with ``what``, the traceback chained."""
    try:
        return function(*arguments)
    except LmcheckError:
        raise
    except Exception as error:  # the user's code
        raise InputError(f"{what} raised {type(error).__name__}: {error}") from error


def epoch_batches(batches_of_epoch: Callable[[int], Iterable[Any]], epoch: int) -> Iterable[Any]:
    made = users_code(f"'batches({epoch})'", batches_of_epoch, epoch)
    if made is None:
        raise InputError(f"'batches' as a function must return the batches of the epoch (got None for epoch {epoch})")
    return made


def call_rebuild(rebuild: Callable[[int], Any], seed: int) -> Any:
    return users_code(f"'rebuild({seed})'", rebuild, seed)


def loss_value(loss: Any, where: str) -> float:
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return float(loss.detach().float())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise InputError(f"{where} must return the loss, a scalar tensor or a float (got {describe(loss)})")


def loader_collating(loader: Any) -> Collated:
    """A DataLoader's first examples against what its ``collate_fn`` makes of them; nothing to
    compare without a map-style dataset and a batch size."""
    dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
    if getattr(loader, "batch_size", None) is None or not callable(collate) \
            or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return [], 0, 0
    return collating_problems(dataset, collate, lambda examples: examples)
