"""Packed rows must train as their documents would alone: ``packing_equivalence``.

Packing puts several documents into one row to save the padding. It is sound only when each
document sees nothing of the others: its positions restart at 0, the attention keeps it apart,
and no label asks the last token of one document to predict the first of the next. Each of these
fails silently, and the loss still falls:

- a 2-D all-ones ``attention_mask`` beside packed ``position_ids``: transformers builds its
  document mask from the position ids only when there is no attention mask, so SDPA takes the
  plain causal path and later documents attend to earlier ones (transformers PR #46634);
- a model that builds a KV cache while it trains (``config.use_cache=True`` in a loop of one's
  own; the Trainer sets it from ``TrainingArguments.use_cache``, False): transformers builds the
  document mask only without a cache;
- TRL's packing without its ``seq_lengths`` column: no position ids restart (trl #3705); legacy
  wrapped packing: the documents run into each other (trl #3067);
- packed documents attending to each other: 95% accuracy on repeated random documents
  (profam #495).

The probe runs the packed batch through the model as the training step does (the batch's own
``attention_mask`` and ``position_ids``, the model's own cache setting) and each document alone,
and compares logits, loss and gradients within the dtype's tolerance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmcheck._finite import probe
from lmcheck._model import (
    IGNORE_INDEX,
    check_causal_lm,
    configured_cache,
    eval_mode,
    kind,
    model_device,
    model_forward,
    parameter_dtype,
    shifted_loss_sum,
)
from lmcheck._validate import as_ids, as_mask, check_int, describe
from lmcheck.comparison import LOGIT_ATOL, tolerance_for
from lmcheck.errors import InputError, NotApplicableError
from lmcheck.results import Result

__all__ = ["document_starts", "packing_equivalence"]

# the relative tolerance of the loss and of the gradients, by the parameters' dtype
PACKED_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def document_starts(positions: torch.Tensor) -> list[int]:
    """Where a row's documents start, read from its position ids: 0, and every index whose
    position is not one more than the one before (a restart), as transformers reads them.

    Raises:
        InputError: ``positions`` is not a 1-D tensor of integers.
    """
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
        raise InputError(f"'positions' must be one row's position ids, a 1-D integer tensor "
                         f"(got {describe(positions)})")
    positions = as_ids(positions, "positions")[0]
    steps = positions[1:] - positions[:-1]
    return [0] + [i + 1 for i in (steps != 1).nonzero().flatten().tolist()]


@dataclass
class _Row:
    """One packed row: its real length, its documents as (start, end) and where they came from."""

    index: int
    length: int
    documents: list[tuple[int, int]]
    source: str


@dataclass
class _Found:
    problems: list[str] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)


@probe("packing_equivalence")
def packing_equivalence(
    model: torch.nn.Module, packed_batch: Mapping[str, torch.Tensor], *,
    documents: Sequence[Sequence[int]] | None = None, eos_id: int | None = None,
    max_rows: int = 4, max_documents: int = 16, gradients: bool = True,
) -> Result:
    """Each document of a packed row, run alone through ``model``, gives the logits, the loss and
    the gradients it gets inside the row, within the dtype's tolerance.

    Checks, the root cause first, each naming the row and the document:

    - the positions restart at 0 at every document: where the position ids restart, and after
      every ``eos_id`` followed by more of the row (or at each of ``documents``);
    - no label crosses a document boundary: the first token of each document after the first
      is labelled -100, so the last token of the one before is not trained to predict it;
    - the logits of each document inside the row equal its logits alone: a failure names the
      position where the row first sees its neighbour, and the cause where one change of the
      call removes it (the batch's all-ones attention mask, the model's KV cache, positions that
      do not restart);
    - the loss of the row (summed over its supervised tokens) equals the documents' own, and so
      do its gradients (with ``gradients=True``).

    Args:
        model: a Hugging Face causal LM; it is run in eval mode (dropout off) and left as it was.
        packed_batch: the batch as the collator gives it: ``input_ids`` (B, T), and where given
            ``position_ids`` (restarting at each document), ``attention_mask``, ``labels``
            (unshifted, -100 ignored; without them every real token but each document's first
            is supervised).
        documents: each row's document lengths, in order, where the position ids do not say.
        eos_id: the id that ends each document: a document starts after each one too (a packer
            whose position ids do not restart, trl #3705). Leave it None where the eos also ends
            the turns inside one conversation.
        max_rows, max_documents: at most this many packed rows are compared, and this many
            documents of each.
        gradients: compare the gradients of the first packed row too (one more forward and two
            backwards).

    Not applicable for a model that is not a Hugging Face one (lmcheck cannot give a plain
    module the batch's position ids as its step does), or where no row holds two documents.
    """
    check_causal_lm(model)
    if not isinstance(packed_batch, Mapping) or "input_ids" not in packed_batch:
        raise InputError(f"'packed_batch' must be a mapping of tensors with 'input_ids', as a collator "
                         f"returns (got {describe(packed_batch)})")
    check_int(max_rows, "max_rows", 1)
    check_int(max_documents, "max_documents", 2)
    if eos_id is not None and (not isinstance(eos_id, int) or isinstance(eos_id, bool)):
        raise InputError(f"'eos_id' must be a token id, an int (got {describe(eos_id)})")
    if not isinstance(gradients, bool):
        raise InputError(f"'gradients' must be True or False (got {describe(gradients)})")
    ids = as_ids(packed_batch["input_ids"], "packed_batch['input_ids']")
    mask = packed_batch.get("attention_mask")
    mask = None if mask is None else as_mask(mask, ids, "packed_batch['attention_mask']")
    positions = _positions(packed_batch.get("position_ids"), ids)
    labels = packed_batch.get("labels")
    if labels is not None:
        labels = as_ids(labels, "packed_batch['labels']")
        if labels.shape != ids.shape:
            raise InputError(f"'packed_batch['labels']' must have the shape of input_ids {tuple(ids.shape)} "
                             f"(got {tuple(labels.shape)})")
    if kind(model) != "transformers":
        raise NotApplicableError(f"packing_equivalence runs Hugging Face models only: a plain "
                                 f"{type(model).__name__} is called with ids alone, so lmcheck cannot give it "
                                 f"the batch's position ids as the training step does")
    rows = _rows(ids, mask, positions, documents, eos_id)
    packed = [r for r in rows if len(r.documents) > 1][:max_rows]
    if not packed:
        raise NotApplicableError("no row holds two documents: "
                                 + ("the batch has no position_ids" if positions is None
                                    else "the position ids never restart")
                                 + ("" if eos_id is None else f" and no eos (id {eos_id}) sits inside a row")
                                 + ("" if documents is None else " and 'documents' gives one per row"))
    if labels is None:
        labels = _labels_for(ids, mask, rows)
    device = model_device(model)
    ids, labels = ids.to(device), labels.to(device)
    mask = None if mask is None else mask.to(device)
    positions = None if positions is None else positions.to(device)
    found = _Found()
    _check_positions(packed, positions, found)
    _check_labels(packed, labels, found)
    atol = tolerance_for(LOGIT_ATOL, model)
    rtol = PACKED_RTOL.get(parameter_dtype(model), PACKED_RTOL[torch.float32])
    metrics: dict[str, Any] = {"packed_rows": len(packed),
                               "documents": sum(min(len(r.documents), max_documents) for r in packed),
                               "documents_in_rows": sum(len(r.documents) for r in packed),
                               "documents_from": packed[0].source, "atol": atol}
    with eval_mode(model), torch.no_grad():
        call = _Call(model, ids, mask, positions)
        logits = call.logits()
        worst, first = 0.0, None
        alone_total, alone_count = 0.0, 0  # the documents' own summed loss and supervised tokens
        for row in packed:
            for number, (start, end) in enumerate(row.documents[:max_documents]):
                alone = _alone(model, ids[row.index, start:end])
                total, count = shifted_loss_sum(alone[None], labels[row.index:row.index + 1, start:end])
                alone_total, alone_count = alone_total + float(total), alone_count + count
                diff = (logits[row.index, start:end].float() - alone.float()).abs().amax(-1)  # (n,)
                bad = (~(diff <= atol)).nonzero().flatten()  # NaN compares False: a fault
                worst = max(worst, float(diff.nan_to_num(float("inf")).max()))
                if len(bad) and first is None:
                    first = (row, number, start, end, int(bad[0]), float(diff[bad[0]]))
        metrics["max_logit_diff"] = worst
        if first is not None:
            found.problems.append(_contamination(call, first, atol))
            found.details.append({"row": first[0].index, "document": first[1], "start": first[2],
                                  "position": first[2] + first[4], "diff": first[5]})
        loss_problem = _check_loss(logits, labels, packed, max_documents, (alone_total, alone_count), rtol, metrics)
        if loss_problem and not found.problems:
            found.problems.append(loss_problem)
    if gradients and not found.problems:
        problem = _check_gradients(model, call, labels, packed[0], max_documents, rtol, metrics)
        if problem:
            found.problems.append(problem)
    passed = not found.problems
    explanation = (f"{metrics['documents']} documents compared in {len(packed)} packed row(s) (found by "
                   f"{packed[0].source}) each give alone the logits they get in the row (within {atol:g}), "
                   f"the same loss{' and gradients' if gradients else ''}; positions restart and no label "
                   f"crosses a document" if passed else "; ".join(found.problems))
    return Result(name="packing_equivalence", passed=passed, metrics=metrics, threshold=atol,
                  explanation=explanation, details=tuple(found.details))


def _positions(value: object, ids: torch.Tensor) -> torch.Tensor | None:
    if value is None:
        return None
    positions = as_ids(value, "packed_batch['position_ids']")
    if positions.shape[0] == 1 and ids.shape[0] > 1:
        positions = positions.expand(ids.shape[0], -1)
    if positions.shape != ids.shape:
        raise InputError(f"'packed_batch['position_ids']' must have the shape of input_ids {tuple(ids.shape)} "
                         f"(got {tuple(positions.shape)})")
    return positions


def _rows(ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
          documents: Sequence[Sequence[int]] | None, eos_id: int | None) -> list[_Row]:
    """Every row's documents: given, else where the positions restart, else after each eos."""
    if documents is not None and (isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence)
                                  or len(documents) != ids.shape[0]):
        raise InputError(f"'documents' must give each of the {ids.shape[0]} rows its list of document "
                         f"lengths (got {describe(documents)})")
    rows = []
    for r in range(ids.shape[0]):
        length = ids.shape[1] if mask is None else int(mask[r].sum())
        if mask is not None and not bool(mask[r, :length].all()):
            raise InputError(f"row {r} of 'packed_batch' has pads before its last real token: packed rows are "
                             f"right-padded, if at all")
        if documents is not None:
            given: list[Any] = list(documents[r]) if isinstance(documents[r], Sequence) else [None]
            lengths = [n for n in given if isinstance(n, int) and not isinstance(n, bool) and n > 0]
            if len(lengths) != len(given) or sum(lengths) > length:
                raise InputError(f"'documents[{r}]' must be positive lengths summing to at most the row's "
                                 f"{length} real tokens (got {describe(documents[r])})")
            starts, source = [sum(lengths[:i]) for i in range(len(lengths))], "the documents given"
            length = sum(lengths)
        else:
            restarts = document_starts(positions[r, :length]) if positions is not None else [0]
            after_eos = [e + 1 for e in (ids[r, :length - 1] == eos_id).nonzero().flatten().tolist()] \
                if eos_id is not None else []
            starts = sorted(set(restarts) | set(after_eos))
            source = " and ".join(([] if len(restarts) < 2 else ["position ids that restart"])
                                  + ([] if not after_eos else [f"the eos (id {eos_id}) that ends each"])) or "nothing"
        bounds = starts + [length]
        rows.append(_Row(r, length, [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a], source))
    return rows


def _labels_for(ids: torch.Tensor, mask: torch.Tensor | None, rows: list[_Row]) -> torch.Tensor:
    labels = ids.clone()
    if mask is not None:
        labels[mask == 0] = IGNORE_INDEX
    for row in rows:
        for start, _ in row.documents:
            labels[row.index, start] = IGNORE_INDEX
        labels[row.index, row.length:] = IGNORE_INDEX
    return labels


def _check_positions(rows: list[_Row], positions: torch.Tensor | None, found: _Found) -> None:
    for row in rows:
        for number, (start, _) in enumerate(row.documents[1:], start=1):
            value = None if positions is None else int(positions[row.index, start])
            if value != 0:
                said = ("the batch has no position_ids, so the model numbers the whole row from 0" if value is None
                        else f"position_ids[{row.index}, {start}] is {value}, not 0")
                found.problems.append(
                    f"the positions do not restart at document {number} of row {row.index} (token {start}): {said}; "
                    f"the model sees one long sequence and builds no document mask (TRL's packing without its "
                    f"seq_lengths column, trl #3705; wrapped packing, trl #3067); give position ids that restart "
                    f"at each document, as DataCollatorWithFlattening does")
                found.details.append({"row": row.index, "document": number, "start": start, "position_id": value})
                return


def _check_labels(rows: list[_Row], labels: torch.Tensor, found: _Found) -> None:
    for row in rows:
        for number, (start, _) in enumerate(row.documents[1:], start=1):
            label = int(labels[row.index, start])
            if label != IGNORE_INDEX:
                found.problems.append(
                    f"a label crosses a document boundary: labels[{row.index}, {start}] is {label}, not -100, so "
                    f"the last token of document {number - 1} of row {row.index} is trained to predict the first "
                    f"token of document {number}; label each document's first token -100")
                found.details.append({"row": row.index, "document": number, "start": start, "label": label})
                return


class _Call:
    """The packed batch's forward as the training step makes it, and the variants that name a cause."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None,
                 positions: torch.Tensor | None) -> None:
        self.model, self.ids, self.mask, self.positions = model, ids, mask, positions
        self.use_cache = configured_cache(model)

    def logits(self, *, mask: bool = True, use_cache: bool | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        return model_forward(self.model, self.ids, self.mask if mask else None, None,
                             use_cache=self.use_cache if use_cache is None else use_cache,
                             what="the packed batch's logits",
                             positions=self.positions if positions is None else positions)[0]


def _alone(model: torch.nn.Module, document: torch.Tensor) -> torch.Tensor:
    return model_forward(model, document[None], None, None, use_cache=False,
                         what="a document's logits alone")[0][0]


def _contamination(call: _Call, first: tuple[_Row, int, int, int, int, float], atol: float) -> str:
    """The first document whose logits in the row differ from its own, and what removes the difference."""
    row, number, start, end, offset, diff = first
    said = (f"row {row.index} lets its documents see each other: document {number} (tokens {start} to {end - 1}) "
            f"first differs from its logits alone at its token {offset} (row position {start + offset}) by "
            f"{diff:.3g}, above {atol:g}")
    restarted = torch.zeros_like(call.ids)
    restarted[row.index] = torch.cat([torch.arange(b - a) for a, b in row.documents]
                                     + [torch.zeros(call.ids.shape[1] - row.length, dtype=torch.long)]).to(call.ids)
    for other in range(call.ids.shape[0]):
        if other != row.index and call.positions is not None:
            restarted[other] = call.positions[other]
    trials: list[tuple[dict[str, Any], str]] = []
    if call.mask is not None and call.positions is not None and bool((call.mask[row.index, :row.length] == 1).all()):
        trials.append(({"mask": False}, "the batch's 2-D all-ones attention_mask beside packed position_ids: "
                       "transformers builds the document mask from the position ids only when there is no "
                       "attention mask, so SDPA takes the plain causal path (transformers PR #46634); drop the "
                       "attention_mask, as DataCollatorWithFlattening and TRL's padding-free collator do"))
    if call.use_cache:
        trials.append(({"use_cache": False}, "the model builds a KV cache while it trains (config.use_cache is "
                       "True) and transformers builds no document mask beside a cache; set "
                       "model.config.use_cache = False for training (the Trainer does)"))
    trials.append(({"mask": False, "use_cache": False, "positions": restarted},
                   "positions that do not restart at each document: give position ids that restart, as "
                   "DataCollatorWithFlattening does (TRL's packing needs its seq_lengths column: trl #3705)"))
    for options, cause in trials:
        fixed = call.logits(**options)[row.index, start:end].float()
        alone = _alone(call.model, call.ids[row.index, start:end]).float()
        if bool(((fixed - alone).abs() <= atol).all()):
            return f"{said}; the cause: {cause}"
    return (f"{said}; no change lmcheck tried removes it (no attention mask, no cache, restarted positions): the "
            f"model's attention ({_attention(call.model)}) does not keep packed documents apart")


def _attention(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return f"attn_implementation {getattr(config, '_attn_implementation', '?')!r}"


def _check_loss(logits: torch.Tensor, labels: torch.Tensor, rows: list[_Row], max_documents: int,
                alone: tuple[float, int], rtol: float, metrics: dict[str, Any]) -> str | None:
    """The rows' summed token loss over the compared documents against theirs alone (``alone``:
    their summed loss and supervised tokens)."""
    alone_total, alone_count = alone
    packed_total, packed_count = 0.0, 0
    for row in rows:
        end = row.documents[:max_documents][-1][1]
        # the row's loss up to the last compared document: position t predicts labels[t + 1]
        total, count = shifted_loss_sum(logits[row.index:row.index + 1, :end], labels[row.index:row.index + 1, :end])
        packed_total, packed_count = packed_total + float(total), packed_count + count
    metrics.update(packed_loss=packed_total / max(packed_count, 1), documents_loss=alone_total / max(alone_count, 1))
    if packed_count != alone_count:
        return (f"the packed rows supervise {packed_count} tokens where their documents alone supervise "
                f"{alone_count}: a label crosses a document boundary")
    if not abs(packed_total - alone_total) <= rtol * abs(alone_total) + 1e-6:
        return (f"the packed rows' loss {metrics['packed_loss']:.6g} differs from their documents' alone "
                f"{metrics['documents_loss']:.6g} by more than {rtol:g} of it")
    return None


def _check_gradients(model: torch.nn.Module, call: _Call, labels: torch.Tensor, row: _Row, max_documents: int,
                     rtol: float, metrics: dict[str, Any]) -> str | None:
    """The gradient of the row's summed loss against the sum of its documents' alone."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return None
    parameters = [p for _, p in named]
    documents = row.documents[:max_documents]
    with eval_mode(model):
        reference = [torch.zeros_like(p, dtype=torch.float32) for p in parameters]
        for start, stop in documents:
            logits = model_forward(model, call.ids[row.index:row.index + 1, start:stop], None, None,
                                   use_cache=False, what="a document's logits alone")[0]
            total, _ = shifted_loss_sum(logits, labels[row.index:row.index + 1, start:stop])
            for kept, grad in zip(reference, torch.autograd.grad(total, parameters, allow_unused=True), strict=True):
                if grad is not None:
                    kept += grad.float()
        end = documents[-1][1]
        logits = call.logits()
        total, _ = shifted_loss_sum(logits[row.index:row.index + 1, :end], labels[row.index:row.index + 1, :end])
        packed = torch.autograd.grad(total, parameters, allow_unused=True)
    worst, where, scale = 0.0, "", 0.0
    error_sq, norm_sq = 0.0, 0.0
    for (name, _), ref, grad in zip(named, reference, packed, strict=True):
        got = torch.zeros_like(ref) if grad is None else grad.float()
        error = float((got - ref).norm())
        error_sq, norm_sq = error_sq + error ** 2, norm_sq + float(ref.norm()) ** 2
        if not error <= worst:  # NaN is the worst of all
            worst, where, scale = error, name, float(ref.norm())
    relative = (error_sq ** 0.5) / max(norm_sq ** 0.5, 1e-12)
    metrics["gradient_rel_error"] = relative
    if not relative <= rtol:
        return (f"the gradient of row {row.index}'s loss differs from the sum of its documents' alone by "
                f"{relative:.3g} of its norm (above {rtol:g}), most in {where} ({worst:.3g} against a norm of "
                f"{scale:.3g})")
    return None
