"""The parts of the setup checks (``lmcheck.setup_checks``) below its entry points: a user's
batches in lmcheck's form, and each check's Result judged from what the runs of the user's loop
or Trainer recorded (the gradients and learning rates at each optimizer step, the losses, the
rows of each epoch). Under torchrun, the ranks' data is gathered here. Private: the entry points
and their drivers are the public surface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmcheck._finite import locate, non_finite_result
from lmcheck._model import (
    IGNORE_INDEX,
    eval_mode,
    hf_model,
    kind,
    model_device,
    model_forward,
    no_dropout,
    parameter_dtype,
    shifted_loss_sum,
)
from lmcheck._recording import OptimizerStep, Snapshot
from lmcheck._validate import check_bool, check_callable, check_model, describe
from lmcheck.errors import InputError, LmcheckError, NonFiniteError
from lmcheck.results import Result, headroom_below
from lmcheck.supervision import batch_supervision
from lmcheck.training import causal_batch, loss_at_init

# Relative L2 error allowed between the user's gradient and the reference one, by parameter
# dtype. Both sides are computed by the same model on the same tokens; in float32 on a 2-core
# x86 CPU they differed by below 1e-6 (summation order). A normalisation bug moves the gradient
# by 10% or more (a factor of k, or micro-batches weighted 2:1).
GRADIENT_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}

def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gathered(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order; ``[value]`` in one process."""
    if _world_size() == 1:
        return [value]
    everyone: list[Any] = [None] * _world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def _unwrap_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel or DataParallel: lmcheck's own forwards, the
    snapshot and the recorder use it, the user's step keeps the wrapper. (Not any ``.module``:
    a model made by lmcheck.adapt keeps its own.)"""
    parallel = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, parallel) else model


def _epoch_batches(batches_of_epoch: Callable[[int], Iterable[Any]], epoch: int) -> Iterable[Any]:
    try:
        made = batches_of_epoch(epoch)
    except LmcheckError:
        raise
    except Exception as error:  # the user's code, traceback chained
        raise InputError(f"'batches({epoch})' raised {type(error).__name__}: {error}") from error
    if made is None:
        raise InputError(f"'batches' as a function must return the batches of the epoch (got None for epoch {epoch})")
    return made


# ---------------------------------------------------------------- batches


def _converter(as_batch: Callable[[Any], Mapping[str, torch.Tensor]] | None) -> Callable[[Any, int], dict[str, torch.Tensor]]:
    """A function from one of the user's batches (and its index) to lmcheck's form: a dict with
    ``input_ids`` and ``labels`` (unshifted) or ``targets`` (next-token), ``attention_mask``
    where given."""
    def convert(batch: Any, index: int) -> dict[str, torch.Tensor]:
        where = f"batch {index}"
        if as_batch is not None:
            made = as_batch(batch)
            if not isinstance(made, Mapping) or "input_ids" not in made or not ({"labels", "targets"} & set(made)):
                raise InputError(f"'as_batch' must return a mapping with 'input_ids' and 'labels' or 'targets' "
                                 f"(got {describe(made)} for {where})")
            out = {k: v for k, v in made.items() if isinstance(v, torch.Tensor)}
        elif isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
            out = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")
                   if isinstance(batch.get(k), torch.Tensor)}
            if "labels" not in out:  # the model's own labels are the inputs; lmcheck's copy masks pads
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


def _labels_from(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Labels for a batch that brings none: a copy of the ids (never the same memory), -100 at pads."""
    labels = ids.clone()
    if mask is not None and mask.shape == ids.shape:
        labels[mask == 0] = IGNORE_INDEX
    return labels


def _labels_form(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def _batch_checks(lm_batches: list[dict[str, torch.Tensor]], special: SpecialIds,
                  expect_eos: bool | None) -> list[Result]:
    """batch_supervision and causal_batch on each of the first batches: the first failure, else
    the first batch's pass with the supervised fraction over all of them."""
    padded = any("attention_mask" in b and bool((b["attention_mask"] == 0).any()) for b in lm_batches)
    eos = padded if expect_eos is None else check_bool(expect_eos, "expect_eos")
    out = []
    for check in (lambda b: batch_supervision(b, special.tokenizer, expect_eos=eos, end_ids=special.end_ids,
                                              bos_id=special.bos_id),
                  lambda b: causal_batch(b, max_ignored_fraction=1.0)):
        results = [check(_labels_form(b)) for b in lm_batches]
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


def _batch_ids(batch: Any) -> Any:
    """The token ids of one of the user's batches, in whatever form it came (mapping, pair, tensor)."""
    return batch.get("input_ids") if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (tuple, list)) and batch else batch


def _ids_copy(batch: Any) -> torch.Tensor | None:
    ids = _batch_ids(batch)
    return ids.detach().clone() if isinstance(ids, torch.Tensor) else None


def _first_difference(before: torch.Tensor, after: torch.Tensor, where: str) -> str:
    row, column = (int(i) for i in (before != after).nonzero()[0])
    return (f"the step changed the input_ids of {where} in place (first at row {row}, position {column}: "
            f"{int(before[row, column])} became {int(after[row, column])}); a loss mask written into labels "
            f"that alias input_ids does this (Fast-LLM #253): clone the labels")


def _note_changed_ids(changes: list[str], before: torch.Tensor | None, after: torch.Tensor | None,
                      where: str) -> bool:
    """Whether a step changed the batch's ids in place; the first such change is noted in ``changes``."""
    if before is None or after is None or torch.equal(before, after):
        return False
    if not changes:
        changes.append(_first_difference(before, after, where))
    return True


def _put_ids_back(batch: Any, saved: torch.Tensor) -> None:
    ids = _batch_ids(batch)
    if isinstance(ids, torch.Tensor) and ids.shape == saved.shape:
        with torch.no_grad():
            ids.copy_(saved)


_COLLATED_EXAMPLES = 8  # examples of the dataset compared with their collated rows


def _collating_problems(dataset: Any, collate: Callable[[Any], Any],
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


def _inputs_unchanged(problems: list[str], collated: tuple[list[str], int, int]) -> Result:
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


def _unequal_lengths(collator: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The collator, then fewer supervised positions in some batches than others (the later
    labels set to -100), so that micro-batches of one step hold unequal token counts."""
    counter = [0]

    def collate(examples: Any) -> Any:
        batch = collator(examples)
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] > 4:
            # each row keeps the first quarter, half, three quarters or all of its supervised
            # positions (at least one): a completion-only row keeps part of its completion
            share = 1 + counter[0] % 4
            supervised = labels != IGNORE_INDEX
            supervised[:, 0] = False  # never a target
            rank = supervised.long().cumsum(dim=1)  # (B, T) the how-many-th supervised position
            keep = (supervised.sum(dim=1, keepdim=True) * share // 4).clamp(min=1)  # (B, 1)
            labels = labels.clone()
            labels[supervised & (rank > keep)] = IGNORE_INDEX
            batch["labels"] = labels
        counter[0] += 1
        return batch

    return collate


def _subset(dataset: Any, count: int) -> Any:
    """The first ``count`` examples of a map-style dataset (a Trainer's train or eval set)."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise InputError(f"the Trainer's dataset must be map-style (with len() and indexing) for the "
                         f"overfitting and evaluation runs, which take its first examples (got "
                         f"{describe(dataset)}; a streaming dataset can be cut with .take(n) and "
                         f"turned into one with datasets.Dataset.from_list(list(...)))")
    count = max(1, min(count, len(dataset)))
    if hasattr(dataset, "select"):
        return dataset.select(range(count))
    return torch.utils.data.Subset(dataset, range(count))


def _loader_state(batches: object) -> Callable[[], None]:
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


def _take(batches: Iterable[Any], count: int, argument: str) -> list[Any]:
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


# ---------------------------------------------------------------- the checks on the recordings


def supervised_count(batch: Mapping[str, torch.Tensor]) -> int:
    """The tokens a batch in lmcheck's form trains on: next-token targets, or labels after the shift."""
    if "targets" in batch:
        return int((batch["targets"] != IGNORE_INDEX).sum())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# The reason the checks that need supervised tokens give where the batches have none: the root
# cause is batch_supervision's to say, once.
UNSUPERVISED = ("follows from batch_supervision: the first batches supervise no token (every label is -100), "
                "so there is no loss to train on")


def _loss_at_init(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], pretrained: bool | None) -> Result:
    if pretrained is None:
        base = hf_model(model)  # a PEFT model's base: loaded from a checkpoint, or not
        pretrained = base is not None and bool(getattr(base.config, "_name_or_path", ""))
    if check_bool(pretrained, "pretrained"):
        return Result.not_applicable("loss_at_init", "the model is pretrained (loaded from a checkpoint), "
                                     "so its loss is not near ln V; pass pretrained=False to check it")
    return loss_at_init(model, batch["input_ids"])


def _gradient_flow(model: torch.nn.Module, steps: Sequence[OptimizerStep],
                   snapshot: Snapshot | None = None) -> Result:
    """Every trainable parameter gets a finite gradient at the first step, and a non-zero one at
    the first step or soon after: a factor whose partner starts at zero (LoRA's ``lora_A``, PEFT
    starts ``lora_B`` at zero) or a branch behind a zero-initialised gate gets an exactly zero
    gradient at step 1 by design, and trains from step 2."""
    first = steps[0]
    missing: list[str] = []  # no gradient or an all-zero one at every flagged step
    late: list[tuple[str, int]] = []  # zero at step 1, non-zero at a later step
    non_finite: list[str] = []
    grads = first.grads or {}
    flagged = [s for s in steps if s.nonzero is not None]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, _ in trainable:
        grad = grads.get(name)
        if grad is not None and (found := locate(grad, ("index",) * grad.dim())) is not None:
            non_finite.append(f"{name} has a non-finite gradient: {found}")
        elif grad is None or not bool(grad.any()):
            later = next((s.index for s in flagged[1:] if name in (s.nonzero or ())), None)
            if later is not None:
                late.append((name, later))
            else:
                missing.append(f"{name} {'gets no gradient' if grad is None else 'has an all-zero gradient'}")
    problems = non_finite + missing
    passed = not problems
    seen = f"the first {len(flagged)} optimizer steps" if len(flagged) > 1 else "the first optimizer step"
    zero_init = _zero_initialised(model, snapshot) if late else []
    by_design = ""
    if late:
        by_design = (f"; {len(late)} ({', '.join(n for n, _ in late[:2])}{' ...' if len(late) > 2 else ''}) have an "
                     f"exactly zero gradient at step 1 and a non-zero one from step {min(i for _, i in late)}, as a "
                     f"factor whose partner starts at zero does"
                     + (f" ({', '.join(zero_init[:2])}{' ...' if len(zero_init) > 2 else ''} start at zero: "
                        f"{'LoRA, whose lora_B PEFT initialises to zero' if any('lora_B' in z for z in zero_init) else 'a zero-initialised gate'})"
                        if zero_init else ""))
    if passed:
        explanation = (f"within {seen} all {len(trainable)} trainable parameters have finite, non-zero "
                       f"gradients{by_design}")
    else:
        explanation = (f"within {seen} {len(problems)} of {len(trainable)} trainable parameters are not "
                       f"trained: " + "; ".join(problems[:4])
                       + (f"; {len(problems) - 4} more" if len(problems) > 4 else ""))
        if non_finite:
            explanation += (". A NaN or Inf gradient comes from a non-finite loss or weight, or an overflow in "
                            "half precision")
        if missing:
            if _checkpointed(model):
                explanation += (". Reentrant gradient checkpointing with frozen embeddings leaves the checkpointed "
                                "blocks without gradients (transformers #21381): use use_reentrant=False or "
                                "model.enable_input_require_grads()")
            else:
                explanation += (". The parameter is not used by the forward, or its path to the loss is cut (a "
                                "detach(), a torch.no_grad() block, an output that is not used)")
    metrics: dict[str, Any] = {"trainable": len(trainable), "problems": len(problems), "zero_at_first_step": len(late),
                               "steps_seen": len(flagged) or 1}
    if non_finite:
        return non_finite_result("gradient_flow", explanation, **metrics)
    return Result(name="gradient_flow", passed=passed, metrics=metrics, explanation=explanation)


def _zero_initialised(model: torch.nn.Module, snapshot: Snapshot | None) -> list[str]:
    """Trainable parameters that were all zero before the first step."""
    if snapshot is None:
        return []
    saved = snapshot.parameters()
    return [n for n, p in model.named_parameters() if p.requires_grad and n in saved
            and saved[n].numel() and not bool(saved[n].any())]


def _checkpointed(model: torch.nn.Module) -> bool:
    """Whether gradient checkpointing is on anywhere in the model (transformers' flag)."""
    if bool(getattr(model, "is_gradient_checkpointing", False)):
        return True
    return any(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules())


def _params_update(model: torch.nn.Module, snapshot: Snapshot, after: Mapping[str, torch.Tensor],
                   steps: int) -> Result:
    before = snapshot.parameters()
    problems: list[str] = []
    unchanged = []
    trainable = 0
    for name, parameter in model.named_parameters():
        if (found := locate(after[name], ("index",) * after[name].dim())) is not None:
            problems.append(f"{name} holds a non-finite value after the steps: {found}")
            continue
        changed = not torch.equal(before[name], after[name])
        trainable += parameter.requires_grad
        if parameter.requires_grad and not changed:
            unchanged.append(name)
        elif not parameter.requires_grad and changed:
            problems.append(f"{name} is frozen (requires_grad=False) but changed: weight decay or an "
                            f"optimizer step reaches it")
    if unchanged:
        problems.insert(0, f"{len(unchanged)} of {trainable} trainable parameters did not change in {steps} "
                        f"optimizer steps: " + ", ".join(unchanged[:4]) + (" ..." if len(unchanged) > 4 else "")
                        + " (missing from the optimizer, no gradient, or a learning rate of 0)")
    passed = not problems
    return Result(name="params_update", passed=passed, metrics={"trainable": trainable, "unchanged": len(unchanged)},
                  explanation=(f"all {trainable} trainable parameters changed in {steps} optimizer steps of the "
                               f"user's loop, and no frozen one" if passed else "; ".join(problems[:4])))


def _token_loss_sum(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Summed cross-entropy over the supervised tokens, their count, and the count the shift
    would drop (``labels != -100`` before the shift, transformers #46204's mistake)."""
    if "targets" in batch:
        scores, targets = logits, batch["targets"].to(logits.device)
        unshifted = int((targets != IGNORE_INDEX).sum())
        total = F.cross_entropy(scores.float().reshape(-1, scores.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total, unshifted, unshifted
    total, count = shifted_loss_sum(logits, batch["labels"])
    return total, count, int((batch["labels"] != IGNORE_INDEX).sum())


def _accumulation(model: torch.nn.Module, snapshot: Snapshot, micro_batches: list[Mapping[str, torch.Tensor]],
                  step: OptimizerStep, max_grad_norm: float | None, rtol: float | None = None) -> Result:
    """The user's gradient at the first optimizer step against the gradient of the mean loss
    over every supervised token of its micro-batches."""
    name = "accumulation"
    if not micro_batches:
        return Result.not_applicable(name, "no micro-batch of the first step was seen")
    world = _world_size()
    if world > 1:  # DDP averages the ranks' gradients: the reference covers every rank's tokens
        local = [{k: v.detach().cpu() for k, v in b.items()} for b in micro_batches]
        micro_batches = [b for rank_batches in _gathered(local) for b in rank_batches]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    parameters = [p for n, p in model.named_parameters() if p.requires_grad]
    snapshot.restore()
    device = model_device(model)
    counts, unshifted = [], []
    losses: list[float] = []
    with no_dropout(model):
        model.train()
        summed: torch.Tensor | None = None  # the sum of the micro-batches' gradients of summed losses
        per_micro: torch.Tensor | None = None  # the sum of their gradients of mean losses
        for batch in micro_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits, _ = model_forward(model, batch["input_ids"], batch.get("attention_mask"), None,
                                      use_cache=False, what="the logits of a micro-batch")
            total, count, before_shift = _token_loss_sum(logits, batch)
            if not bool(torch.isfinite(total)):
                return non_finite_result(name, f"the reference loss of a micro-batch of the first step is {float(total)}")
            # .backward() into .grad, as the user's step computes its own: torch.autograd.grad
            # returns None for the parameters inside reentrant checkpointed blocks
            for parameter in parameters:
                parameter.grad = None
            total.backward()
            flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad.detach()).float().reshape(-1)
                              for p in parameters])
            losses.append(float(total.detach()))
            summed = flat if summed is None else summed + flat
            per_micro = flat / max(count, 1) if per_micro is None else per_micro + flat / max(count, 1)
            counts.append(count)
            unshifted.append(before_shift)
    snapshot.restore()
    k = len(micro_batches)
    if sum(counts) == 0:
        return Result.not_applicable(name, "the first step's micro-batches supervise no token")
    if summed is None or per_micro is None:
        return Result.not_applicable(name, "no micro-batch of the first step was seen")
    correct = summed / sum(counts)
    if not bool(correct.any()):
        return Result.not_applicable(name, f"the gradient of the mean loss over the first step's {k} micro-batches "
                                     f"is exactly zero, so there is no update to compare the user's with")
    user_grads = step.grads or {}

    def user_grad(name: str, parameter: torch.Tensor) -> torch.Tensor:
        grad = user_grads.get(name)
        return (grad if grad is not None else torch.zeros_like(parameter)).float().reshape(-1)

    user = torch.cat([user_grad(n, p) for n, p in zip(names, parameters, strict=True)])
    tol = rtol if rtol is not None else GRADIENT_RTOL.get(parameter_dtype(model), GRADIENT_RTOL[torch.float32])
    if (found := locate(user, ("index",))) is not None:
        return non_finite_result(name, f"the gradient at the user's first optimizer step is not finite: {found}")
    metrics: dict[str, Any] = {"micro_batches": k, "supervised_tokens": counts,
                               "reference_norm": float(correct.norm()), "user_norm": float(user.norm()),
                               "reference_loss": sum(losses) / sum(counts)}
    clipped_by = _clipped_by(step.clip, float(user.norm()), tol)
    if clipped_by is not None:  # seen through the clipping: the update before it is compared
        user = user / clipped_by
        metrics.update(clip_coefficient=clipped_by, user_norm_before_clipping=float(user.norm()))
        max_grad_norm = 0.0
    unequal = len(set(counts)) > 1
    counted = (f"{k} micro-batch{'es' if k > 1 else ''}" + (f" of {world} ranks" if world > 1 else "")
               + f" supervising {', '.join(map(str, counts))} tokens")

    def fit(direction: torch.Tensor) -> tuple[float, float]:
        """(scale c, residual) of the user's gradient as c * direction."""
        norm = float(direction.norm())
        if norm == 0:
            return 0.0, float("inf")
        scale = float(user @ direction) / norm**2
        return scale, float((user - scale * direction).norm()) / max(float(user.norm()), 1e-30)

    scale, residual = fit(correct)
    metrics.update(scale=scale, residual=residual)
    error = float((user - correct).norm() / max(float(correct.norm()), 1e-30))
    metrics["relative_error"] = error
    # max_grad_norm: None = not said (the step may clip), 0 = the step does not clip
    clipping = max_grad_norm is None or max_grad_norm > 0
    clip = min(1.0, max_grad_norm / max(float(correct.norm()), 1e-30)) if max_grad_norm else None
    if residual <= tol and abs(scale - 1) <= tol:
        return Result(name=name, passed=True, metrics=metrics, threshold=tol, headroom=headroom_below(error, tol),
                      explanation=f"the user's update over {counted} equals the gradient of the mean loss over "
                                  f"all their tokens (relative error {error:.1e}, allowed {tol:g})"
                                  + ("" if unequal or k == 1 else "; the counts are equal, so a per-micro-batch "
                                     "mean could not be told apart: give batches of unequal length")
                                  + (f"; compared before clip_grad_norm_, which clipped it by {clipped_by:.3g} to "
                                     f"norm {step.clip[1]:g}" if clipped_by is not None and step.clip else ""))
    if residual <= tol:
        causes = []
        if k > 1 and abs(scale - k) <= 10 * tol * k:
            causes.append(f"the loss is not divided by the {k} accumulation steps")
        ratio = sum(counts) / max(1, sum(unshifted))
        if abs(scale - ratio) <= tol and ratio != 1:
            causes.append(f"the loss is divided by the labels counted before the shift ({sum(unshifted)}), not "
                          f"after it ({sum(counts)}) (transformers #46204)" + _loss_type_fix(model))
        if clip is not None and scale < clip * (1 - tol):
            causes.append(f"it is smaller than clipping to max_grad_norm={max_grad_norm} makes it: the "
                          f"gradients were clipped while still scaled by the AMP loss scaler, before "
                          f"unscale_ (Lightning #9330)")
        if not causes and scale < 1 and clipping and (clip is None or abs(scale - clip) <= tol):
            return Result(name=name, passed=True, metrics=metrics, threshold=tol,
                          headroom=headroom_below(residual, tol),
                          explanation=f"the user's update over {counted} is the mean-loss gradient clipped by "
                                      f"{scale:.3g} to norm {float(user.norm()):.3g}"
                                      + ("" if clip is not None else " (pass max_grad_norm to check the norm)"))
        explanation = (f"the user's update over {counted} points the right way but is {scale:.4g} times the "
                       f"gradient of the mean loss" + (f": {'; '.join(causes)}" if causes else
                                                       " (and the step does not clip)" if not clipping else ""))
    else:
        micro_scale, micro_residual = fit(per_micro)
        if micro_residual <= tol and unequal:
            # the sum of the means itself (scale 1, not 1/k): the k micro-batches' losses are not
            # divided by k either (clipping that shrinks the update by exactly 1/k is unlikely)
            undivided = k > 1 and abs(micro_scale - 1) <= 10 * tol
            explanation = (f"the user's update over {counted} is "
                           + ("the" if undivided else f"{micro_scale:.3g} times the")
                           + " sum of the micro-batches' mean losses, not the mean over all their tokens: each micro-batch "
                           "is normalised by its own token count, so short ones weigh as much as long ones "
                           "(transformers #34191, torchtune #1875)"
                           + (f", and the sum is not divided by the {k} accumulation steps either" if undivided else "")
                           + "; divide the summed loss by the step's total token count")
        else:
            worst = _worst_parameter(user, correct, names, parameters)
            explanation = (f"the user's update over {counted} differs from the gradient of the mean loss by "
                           f"{error:.3g} (relative, allowed {tol:g}); it differs most at {worst}. The loss "
                           f"the step minimises is not shifted cross-entropy over the supervised tokens")
    if clipped_by is not None:
        explanation += (f" (seen through the clipping: the step's clip_grad_norm_ measured {step.clip[0]:.4g} and "
                        f"clipped to {step.clip[1]:g})" if step.clip else "")
    return Result(name=name, passed=False, metrics=metrics, threshold=tol, headroom=headroom_below(error, tol),
                  explanation=explanation)


def _clipped_by(clip: tuple[float, float] | None, user_norm: float, tol: float) -> float | None:
    """The factor clip_grad_norm_ scaled the update by, where it clipped and the clipped norm is
    the one that reached the step (clipping of still-scaled AMP gradients, Lightning #9330, is
    not: its norm was measured on other values); None otherwise."""
    if clip is None:
        return None
    total, max_norm = clip
    if not (math.isfinite(total) and total > max_norm > 0):
        return None
    coefficient = max_norm / (total + 1e-6)  # as torch.nn.utils.clip_grad_norm_ computes it
    if abs(user_norm - max_norm) > max(tol, 1e-4) * max_norm:
        return None
    return coefficient


def _loss_type_fix(model: torch.nn.Module) -> str:
    """The fix for a Hugging Face model whose Trainer loss counts the labels before the shift:
    transformers 5.24 picks the loss from the class name, and GPT2LMHeadModel's matches none."""
    if kind(model) != "transformers":
        return ""
    loss_type = getattr(model, "loss_type", None)
    return ("; the model's loss_type is " + repr(loss_type) + ", so transformers uses its default loss: set "
            "model.loss_type = \"ForCausalLM\" before building the Trainer" if loss_type != "ForCausalLM" else "")


def _worst_parameter(user: torch.Tensor, reference: torch.Tensor, names: Sequence[str],
                     parameters: Sequence[torch.Tensor]) -> str:
    offset, worst, where = 0, -1.0, ""
    for name, parameter in zip(names, parameters, strict=True):
        size = parameter.numel()
        a, b = user[offset: offset + size], reference[offset: offset + size]
        error = float((a - b).norm() / max(float(b.norm()), 1e-30))
        if error > worst:
            worst, where = error, f"{name} (relative error {error:.3g})"
        offset += size
    return where


def _lr_schedule(steps: list[OptimizerStep], driver: Any, schedule: Callable[[int], float] | None) -> Result:
    name = "lr_schedule"
    observed = [s.lrs[0] for s in steps]
    k = max(1, min(s.micro_batches for s in steps))
    metrics: dict[str, Any] = {"observed": observed, "micro_batches_per_step": k}
    problems = []
    zeros = [s.index for s in steps if all(lr == 0 for lr in s.lrs)]
    if any(i > 1 for i in zeros):
        problems.append(f"the learning rate is 0 at optimizer step{'s' if len(zeros) > 1 else ''} "
                        f"{', '.join(map(str, zeros[:5]))}: nothing is learned there (a warmup that never "
                        f"starts, or a scheduler that is never stepped)")
    expected: list[float] | None = None
    source = ""
    if schedule is not None:
        expected = [float(schedule(i)) for i in range(len(steps) * k + k + 1)]
        source = "the given schedule"
    elif isinstance(driver.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        source = ""  # it follows a metric, not the step count: nothing to replay
    elif driver.scheduler is not None:
        expected = _replay(driver.scheduler, driver.snapshot, len(steps) * k + k + 1)
        source = f"{type(driver.scheduler).__name__} stepped once per optimizer step"
    if expected is not None:
        metrics["expected"] = expected[: len(steps)]
        wrong = [i for i, lr in enumerate(observed) if not math.isclose(lr, expected[i], rel_tol=1e-6, abs_tol=1e-12)]
        if wrong:
            i = wrong[0]
            per_micro = k > 1 and any(all(math.isclose(lr, expected[j * k + offset], rel_tol=1e-6, abs_tol=1e-12)
                                          for j, lr in enumerate(observed)) for offset in range(k + 1))
            problems.append(
                f"at optimizer step {i + 1} the learning rate is {observed[i]:.4g}, but {source} gives "
                f"{expected[i]:.4g}" + (f"; the observed rates are the schedule counted in micro-batches ({k} per step): "
                                        f"the scheduler is stepped on every micro-batch, so warmup and decay "
                                        f"run {k} times too fast (Lightning #1476)" if per_micro else ""))
    passed = not problems
    if passed:
        explanation = (f"the learning rate at {len(steps)} optimizer steps follows {source}" if expected is not None
                       else f"the learning rate at {len(steps)} optimizer steps is never 0 after the first; no "
                            + ("step-counted schedule to compare with (ReduceLROnPlateau follows a metric)"
                               if isinstance(driver.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
                               else "schedule to compare with (pass scheduler= or schedule=)"))
        explanation += f" ({', '.join(f'{lr:.3g}' for lr in observed[:4])}{' ...' if len(observed) > 4 else ''})"
    else:
        explanation = "; ".join(problems)
    return Result(name=name, passed=passed, metrics=metrics, explanation=explanation)


def _replay(scheduler: Any, snapshot: Snapshot, count: int) -> list[float]:
    """The scheduler's learning rate over ``count`` steps from its saved start, stepped once per
    optimizer step; the states are put back afterwards."""
    snapshot.restore()
    optimizer = scheduler.optimizer
    last = getattr(scheduler, "_last_lr", None)
    if isinstance(last, (list, tuple)) and len(last) == len(optimizer.param_groups):
        # the rates the scheduler set when it was saved: an optimizer the user built before the
        # Trainer made its scheduler was saved with the rate of its construction
        for group, lr in zip(optimizer.param_groups, last, strict=True):
            group["lr"] = float(lr)
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(count):
            rates.append(float(optimizer.param_groups[0]["lr"]))
            scheduler.step()
    snapshot.restore()
    return rates


def _memorized_rows(model: torch.nn.Module, lm_batches: Sequence[Mapping[str, torch.Tensor]],
                    ) -> tuple[int, int, float, int]:
    """(rows whose every supervised next token is the argmax given the true prefix, rows, the
    summed cross-entropy of the supervised tokens, their count): the loss tells a run that is
    still learning from one that has stalled.

    A position whose prefix recurs in another row with another next token cannot be right in
    both (two examples that open alike, a shared prompt template); such positions are left out.
    """
    targets_of, predicted_of, keys_of = [], [], []
    nll, tokens = 0.0, 0
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        for batch in lm_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            ids = batch["input_ids"]
            logits, _ = model_forward(model, ids, batch.get("attention_mask"), None,
                                      use_cache=False, what="the logits while overfitting")
            if "targets" in batch:
                predicted, targets, prefix = logits.argmax(-1), batch["targets"], ids
            else:
                predicted, targets, prefix = logits[:, :-1].argmax(-1), batch["labels"][:, 1:], ids[:, :-1]
            scores = logits if "targets" in batch else logits[:, :-1]
            nll += float(F.cross_entropy(scores.float().reshape(-1, scores.shape[-1]), targets.reshape(-1),
                                         ignore_index=IGNORE_INDEX, reduction="sum"))
            tokens += int((targets != IGNORE_INDEX).sum())
            predicted_of.append(predicted.cpu())
            targets_of.append(targets.cpu())
            keys_of.append(_prefix_hashes(prefix.cpu()))
    width = max(t.shape[1] for t in targets_of)
    pad = lambda t, v: F.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    targets = torch.cat([pad(t, IGNORE_INDEX) for t in targets_of])
    predicted = torch.cat([pad(t, IGNORE_INDEX) for t in predicted_of])
    keys = torch.cat([pad(t, 0) for t in keys_of])
    supervised = targets != IGNORE_INDEX
    pairs = torch.stack([keys[supervised], targets[supervised]], dim=1).unique(dim=0)
    if _world_size() > 1:  # one model for every rank's rows: a prefix shared across ranks is ambiguous too
        pairs = torch.cat(_gathered(pairs)).unique(dim=0)
    prefixes, counts = pairs[:, 0].unique(return_counts=True)
    ambiguous_keys = prefixes[counts > 1]
    ambiguous = supervised & torch.isin(keys, ambiguous_keys)
    right = (predicted == targets) | ~supervised | ambiguous
    counted = (supervised & ~ambiguous).any(dim=1)  # a row with nothing to predict is not memorized
    return int((right.all(dim=1) & counted).sum()), int(counted.sum()), nll, tokens


def _prefix_hashes(ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 hash of each prefix ``ids[:, :t + 1]`` (a polynomial hash; int64 wraps)."""
    powers = torch.full((ids.shape[1],), 1_000_003, dtype=torch.int64).cumprod(0)
    return ((ids.to(torch.int64) + 1) * powers).cumsum(dim=1) * 31 + torch.arange(ids.shape[1])


def _overfit(driver: Any, lm_batches: list[dict[str, torch.Tensor]], budget: int, check_every: int,
             peak_lrs: tuple[float, ...] | None = None, summed: bool = False) -> Result:
    """Memorize a handful of the user's batches with their step, model and optimizer, at the
    peak of their schedule (``peak_lrs``, one per parameter group; None: as the schedule goes).
    ``summed``: the step's loss is the sum of its micro-batches' returned losses (each divided by
    the accumulation steps, as the Trainer and nanoGPT return them), else their mean."""
    name = "overfits"
    budget_text = f"{budget} optimizer steps (overfit_steps)"
    if sum(_gathered(sum(supervised_count(b) for b in lm_batches))) == 0:
        return Result.not_applicable(name, "the overfitting batches supervise no token (every label is -100), so "
                                     "there is nothing to memorize: see batch_supervision")
    state: dict[str, Any] = {"memorized": (0, 1), "at": None, "non_finite": None, "extended": False}
    limit = 2 * budget  # a run still learning fast at the budget may go on to twice it
    held_out: dict[int, float] = {}  # optimizer step -> the loss of the memorization check

    def after_step(step: int) -> bool:
        if step % check_every and step not in (budget, limit):
            return False
        try:
            measured = _memorized_rows(driver.model, lm_batches)
        except NonFiniteError as error:
            state["non_finite"] = f"after optimizer step {step} of the overfitting run, {error}"
            return True
        hits, rows, nll, tokens = (sum(v) for v in zip(*_gathered(measured), strict=True))
        state["memorized"] = (hits, rows)
        held_out[step] = nll / max(tokens, 1)
        if hits == rows:  # on every rank together: a rank that stopped alone would hang the others
            state["at"] = step
            return True
        if step == budget:
            halfway = min(held_out, key=lambda s: abs(s - budget / 2))
            if held_out[step] < _STILL_LEARNING * held_out[halfway]:
                state["extended"] = True
                return False
            return True
        return False

    indices = list(range(len(lm_batches)))
    recorder, losses, _ = driver.run(limit, batches=indices, phase="overfitting", after_step=after_step,
                                     peak_lrs=peak_lrs)
    if state["extended"]:
        budget_text = (f"{limit} optimizer steps (overfit_steps={budget}, doubled: the loss fell by more than "
                       f"{1 - _STILL_LEARNING:.0%} over its second half)")
    curve = driver.curve
    curve.train.clear()
    position = 0
    for step in recorder.steps:
        part = losses[position: position + max(1, step.micro_batches)]
        position += max(1, step.micro_batches)
        if part:
            curve.record_train(step.index, sum(part) if summed else sum(part) / len(part))
    curve.stop_reason = "memorized" if state["at"] is not None else "max_steps"
    hits, rows = state["memorized"]
    lrs = [s.lrs[0] for s in recorder.steps]
    metrics: dict[str, Any] = {"memorized_rows": hits, "rows": rows, "steps": recorder.steps[-1].index if recorder.steps else 0,
                               "budget": limit if state["extended"] else budget, "extended": state["extended"],
                               "learning_rate": max(lrs, default=0.0),
                               "at_peak": peak_lrs is not None}
    if curve.non_finite_step is not None:
        return non_finite_result(name, f"the training loss is not finite at optimizer step {curve.non_finite_step} "
                                       f"of the overfitting run", **metrics)
    if state["non_finite"] is not None:
        return non_finite_result(name, state["non_finite"], **metrics)
    first, last = (curve.train[0][1], curve.train[-1][1]) if curve.train else (math.nan, math.nan)
    metrics.update(first_loss=first, last_loss=last)
    rate = (f"at the schedule's peak learning rate {max(lrs, default=0):.3g}, held constant" if peak_lrs is not None
            else f"with learning rates {min(lrs, default=0):.3g} to {max(lrs, default=0):.3g}")
    passed = state["at"] is not None
    if passed:
        explanation = (f"{rows} rows of {len(lm_batches)} batches memorized (every supervised next token is the "
                       f"argmax) after {state['at']} of {budget_text} {rate}; loss {first:.3f} -> {last:.3f}")
    else:
        explanation = (f"after {budget_text} on {len(lm_batches)} batches {rate}, {hits} of {rows} rows are "
                       f"memorized; loss {first:.3f} -> {last:.3f}. A setup that cannot overfit a handful of "
                       f"batches will not learn from many: check the loss, the labels and the learning rate, "
                       f"or raise overfit_steps")
    allowed = float(limit if state["extended"] else budget)
    return Result(name=name, passed=passed, metrics=metrics, threshold=allowed,
                  headroom=None if not passed else headroom_below(float(state["at"] or 0), allowed),
                  explanation=explanation)


# At the budget, a loss below this share of the loss halfway through is still falling fast: the
# overfitting run goes on to twice the budget rather than fail a setup that is learning.
_STILL_LEARNING = 0.7


def _peak_lrs(steps: Sequence[OptimizerStep], snapshot: Snapshot, scheduler: Any) -> tuple[float, ...] | None:
    """The peak of the user's schedule for each parameter group: the highest of the rates seen in
    the first run, the groups' ``initial_lr`` (what a torch scheduler scales) and the scheduler's
    ``base_lrs``; None where no step was seen."""
    if not steps:
        return None
    groups = len(steps[0].lrs)
    peaks = [max(s.lrs[i] for s in steps if i < len(s.lrs)) for i in range(groups)]
    candidates: list[Sequence[float]] = []
    base = getattr(scheduler, "base_lrs", None)
    if isinstance(base, (list, tuple)) and len(base) == groups:
        candidates.append([float(v) for v in base])
    for item, state in snapshot.objects.values():
        if isinstance(item, torch.optim.Optimizer) and len(state.get("param_groups", ())) == groups:
            candidates.append([float(g.get("initial_lr", g.get("lr", 0.0))) for g in state["param_groups"]])
    for values in candidates:
        peaks = [max(a, b) for a, b in zip(peaks, values, strict=True)]
    return tuple(peaks) if any(p > 0 for p in peaks) else None


def _sums_micro_batches(part: Sequence[float], reference: float | None) -> bool:
    """Whether the user's step returns each micro-batch's share of the step's loss (their sum is
    the loss) rather than each micro-batch's own loss (their mean is), from the losses it
    returned for the first step's micro-batches: the one nearer their reference loss."""
    if len(part) <= 1 or reference is None or not all(math.isfinite(v) for v in part):
        return False
    return abs(sum(part) - reference) < abs(sum(part) / len(part) - reference)


# ---------------------------------------------------------------- data order, seeds, evaluation


_ORDER_ROWS = 4096  # rows read per epoch by data_order


def _fingerprint(tensor: torch.Tensor | None) -> str:
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


def _dataset_keys(dataset: Any) -> list[str] | None:
    """One fingerprint per example of a small map-style dataset (its ``input_ids``), to tell
    repeated and skipped examples apart; None where there is none to read. Under torchrun a rank
    sees only its share of the dataset (data_sharding compares the shares): None there too."""
    if _world_size() > 1 or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) \
            or len(dataset) > _ORDER_ROWS:
        return None
    try:
        return [_fingerprint(torch.as_tensor(_example_ids(dataset[i]))) for i in range(len(dataset))]
    except (TypeError, KeyError, ValueError, IndexError, RuntimeError):
        return None


def _epoch_keys(batches: Iterable[Any], convert: Callable[[Any, int], dict[str, torch.Tensor]],
                limit: int = _ORDER_ROWS) -> tuple[list[str], bool]:
    """One key per row (its unpadded ids) over one pass, and whether the pass ended within
    ``limit`` rows (it stops at the batch that reaches it)."""
    keys: list[str] = []
    for index, batch in enumerate(batches):
        lm = convert(batch, index)
        ids, mask = lm["input_ids"], lm.get("attention_mask")
        for row in range(ids.shape[0]):
            keys.append(_fingerprint(ids[row] if mask is None else ids[row][mask[row].bool()]))
        if len(keys) >= limit:
            return keys, False
    return keys, True


def _data_order(epochs: list[tuple[list[str], bool]], dataset: list[str] | None) -> Result:
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
    elif sorted(first) != sorted(second) and whole and _world_size() == 1:  # a rank's share may change
        problems.append("epoch 2 holds other examples than epoch 1")
    passed = not problems
    coverage = "whole epochs" if whole else f"the first {len(first)} rows of each epoch"
    held = ("this rank's share of" if _world_size() > 1 else "the same examples in")
    return Result(name=name, passed=passed, metrics={"rows_per_epoch": len(first), "whole_epochs": whole},
                  explanation=(f"two epochs ({coverage}) hold {held} different orders, none repeated"
                               if passed else "; ".join(problems)))


def _data_order_of_loop(batches: Iterable[Any], convert: Callable[[Any, int], dict[str, torch.Tensor]],
                        batches_of_epoch: Callable[[int], Iterable[Any]] | None = None) -> Result:
    if batches_of_epoch is not None:
        epochs = [_epoch_keys(_epoch_batches(batches_of_epoch, epoch), convert) for epoch in (0, 1)]
        return _data_order(epochs, None)
    if iter(batches) is batches:
        return Result.not_applicable("data_order", "'batches' is a one-shot iterator, so it has no second "
                                     "epoch to compare; pass the DataLoader itself")
    dataset = _dataset_keys(getattr(batches, "dataset", None))
    epochs = [_epoch_keys(batches, convert), _epoch_keys(batches, convert)]
    if getattr(batches, "drop_last", False):  # each epoch leaves out other rows: not whole epochs
        epochs = [(keys, False) for keys, _ in epochs]
    return _data_order(epochs, dataset)


def _data_order_sampled(batches: Sequence[Any], convert: Callable[[Any, int], dict[str, torch.Tensor]]) -> Result:
    """data_order for a loop that draws random rows or windows at every step (sampling with
    replacement, nanoGPT's ``get_batch``): there are no epochs, so the rows must differ from
    batch to batch; whether the seed matters is ``reproducible``'s to check."""
    name = "data_order"
    keyed = [_epoch_keys([batch], convert)[0] for batch in batches]
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


def _call_rebuild(rebuild: Callable[[int], Any], seed: int) -> Any:
    try:
        return rebuild(seed)
    except LmcheckError:
        raise
    except Exception as error:  # the user's code, reported in one line with the traceback chained
        raise InputError(f"'rebuild({seed})' raised {type(error).__name__}: {error}") from error


def _reproducible_loop(rebuild: Callable[[int], Any], seed: int, as_batch: Any, steps: int) -> Result:
    calls = max(3, min(steps, 4))

    def first_losses(value: int) -> list[float]:
        built = _call_rebuild(rebuild, value)
        model: Any
        step: Any
        batches: Any
        if isinstance(built, Mapping):
            model, step, batches = built.get("model"), built.get("train_step"), built.get("batches")
        elif isinstance(built, (tuple, list)) and len(built) >= 3:
            model, step, batches = built[:3]
        else:
            raise InputError(f"'rebuild' must return (model, train_step, batches) or a mapping with those keys "
                             f"(got {describe(built)})")
        check_model(model)
        check_callable(step, "train_step", "the rebuilt step function")
        taken = _take(batches, calls, "the rebuilt batches")
        return [_loss_value(step(taken[i % len(taken)]), f"the rebuilt train_step on batch {i}") for i in range(calls)]

    return _reproducible([first_losses(seed), first_losses(seed), first_losses(seed + 1)], seed, "rebuilt with")


def _reproducible(runs: list[list[float]], seed: int, how: str) -> Result:
    name = "reproducible"
    first, again, other = runs
    metrics: dict[str, Any] = {"seed": seed, "losses": first, "same_seed": again, "other_seed": other}
    for label, losses in ((f"{seed}", first), (f"{seed} again", again), (f"{seed + 1}", other)):
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None:  # NaN != NaN: the comparisons below would blame the seed
            return non_finite_result(name, f"{how} {label}: the loss is {losses[bad]} at call {bad}", **metrics)
    problems = []
    if first != again:
        i = next(i for i, (a, b) in enumerate(zip(first, again, strict=False)) if a != b) if len(first) == len(again) else 0
        problems.append(f"the same seed ({how} {seed}) gave different losses at call {i} ({first[i]:.6g} vs "
                        f"{again[i]:.6g}): something random is not seeded (data order, dropout, initialisation)")
    if first == other:
        problems.append(f"another seed ({how} {seed + 1}) gave the very same losses: the seed reaches neither the "
                        f"initialisation, the data order nor dropout (torchtune #2335)")
    passed = not problems
    return Result(name=name, passed=passed, metrics=metrics,
                  explanation=(f"{how} {seed} twice: the same first {len(first)} losses; {how} {seed + 1}: other "
                               f"ones" if passed else "; ".join(problems)))


def _eval_twice(model: torch.nn.Module, lm_batches: list[dict[str, torch.Tensor]], evaluate: Callable[[], float] | None) -> Result:
    if evaluate is not None:
        losses = [_loss_value(evaluate(), "'evaluate'") for _ in range(2)]
        return _eval_deterministic(losses, "the user's evaluate()")
    batches = [_labels_form(b) for b in lm_batches[:2]]
    losses = []
    device = model_device(model)
    for _ in range(2):
        total = 0.0
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits, _ = model_forward(model, batch["input_ids"], batch.get("attention_mask"), None,
                                          use_cache=False, what="the logits in evaluation")
                value, count, _ = _token_loss_sum(logits, batch)
                total += float(value) / max(count, 1)
        losses.append(total)
    return _eval_deterministic(losses, "lmcheck's evaluation in eval mode")


def _eval_deterministic(losses: list[float], how: str) -> Result:
    name = "eval_deterministic"
    if not all(math.isfinite(v) for v in losses):
        return non_finite_result(name, f"{how} gave a non-finite loss: {losses}")
    passed = losses[0] == losses[1]
    return Result(name=name, passed=passed, metrics={"losses": losses},
                  explanation=(f"{how} twice gives the same loss {losses[0]:.6g}" if passed else
                               f"{how} twice gives {losses[0]:.6g} and {losses[1]:.6g}: dropout is still on in "
                               f"evaluation (model.eval() not called, or F.dropout(..., training=True) in the "
                               f"model's code)"))


# ---------------------------------------------------------------- small helpers


def _loss_value(loss: Any, where: str) -> float:
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return float(loss.detach().float())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise InputError(f"{where} must return the loss, a scalar tensor or a float (got {describe(loss)})")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the Trainer's warnings and logs while lmcheck drives it."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers_logging.set_verbosity(level)
