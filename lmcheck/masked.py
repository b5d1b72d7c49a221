"""Masked language models: fill the mask, measure cloze accuracy, check the loss at init.

The probes work on any Hugging Face masked LM (a ``*ForMaskedLM`` model) with its tokenizer:
the mask token always comes from ``tokenizer.mask_token_id`` ([MASK] for BERT, <mask> for
RoBERTa), never from a literal. The validation helpers at the end are shared with
``lmcheck.loops.masked``, which trains a masked LM from scratch.

Example:
    >>> predictions = fill_mask(model, tokenizer, "Life is like a [MASK] of chocolates.")
    >>> predictions[0].tokens
    ('box', 'bag', 'bowl', 'jar', 'cup')
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from lmcheck._finite import probe, require_finite
from lmcheck._model import (
    encoder_logits,
    eval_mode,
    input_vocabulary,
    model_context,
    model_device,
    takes_mask,
)
from lmcheck._validate import (
    check_fraction,
    check_int,
    check_model,
    check_number,
    check_seed,
    check_texts,
    check_tokenizer,
    describe,
)
from lmcheck.cloze import ClozeCase
from lmcheck.comparison import LOGIT_ATOL, tolerance_for
from lmcheck.errors import InputError, ModelError
from lmcheck.results import Result, headroom_above, headroom_below

__all__ = [
    "MaskPrediction",
    "bidirectionality",
    "encoder_padding_invariance",
    "fill_mask",
    "mask_fill_accuracy",
    "masked_loss_at_init",
]

_MASKED_LM_CLASSES = frozenset(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())
_CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@dataclass(frozen=True)
class MaskPrediction:
    """The model's top-k at one mask position of one text."""

    text_index: int  # which of the texts given to fill_mask
    position: int  # index of the mask in that text's input_ids (special tokens included)
    ids: tuple[int, ...]
    tokens: tuple[str, ...]  # each id decoded on its own, surrounding spaces stripped
    probabilities: tuple[float, ...]  # softmax over the whole vocabulary at this position


def fill_mask(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, text_or_texts: str | Sequence[str],
    *, top_k: int = 5, batch_size: int = 32,
) -> tuple[MaskPrediction, ...]:
    """The top-k tokens and probabilities at every mask position of every text.

    Args:
        model: any Hugging Face masked LM (``BertForMaskedLM``, ``RobertaForMaskedLM``, ...).
        tokenizer: its tokenizer; its ``mask_token`` marks the positions to fill.
        text_or_texts: one text or a list; each holds one or more mask tokens.
        top_k: how many candidates per mask (default 5), at most the vocabulary size.
        batch_size: texts per forward pass (padded with the tokenizer's pad token).

    Returns:
        One :class:`MaskPrediction` per mask, in text order, then position order.

    Raises:
        ModelError: the model has no MLM head, is causal, or does not fit the tokenizer.
        InputError: a text without the mask token, or ``top_k`` out of range.
        NonFiniteError: the logits are NaN or Inf; the message names the text, position and
            token id.
    """
    texts = check_texts(text_or_texts, "text_or_texts")
    vocab = check_masked_lm(model, tokenizer)
    check_int(top_k, "top_k", 1, vocab, "the vocabulary size")
    predictions = []
    for index, position, probs in _mask_probabilities(model, tokenizer, texts, batch_size, "text_or_texts"):
        top = probs.topk(top_k)
        ids = tuple(int(i) for i in top.indices)
        predictions.append(MaskPrediction(
            index, position, ids, tuple(_decode(tokenizer, i) for i in ids),
            tuple(float(p) for p in top.values),
        ))
    return tuple(predictions)


@probe("mask_fill_accuracy")
def mask_fill_accuracy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[ClozeCase | tuple[str, str | Sequence[str]]],
    *, top_k: int = 1, threshold: float = 0.9, expect: str = "at_least",
    batch_size: int = 32, name: str = "mask_fill_accuracy",
) -> Result:
    """Share of cloze cases whose expected word is among the model's top-k at the mask.

    Args:
        cases: :class:`ClozeCase` items (or ``(text, answer_or_answers)`` pairs), one mask each.
        top_k: a case counts as right when an answer is among the top ``top_k`` (default 1).
        threshold: the accuracy bound (default 0.9).
        expect: ``"at_least"`` (default: the model knows these, e.g. memorized training text)
            or ``"at_most"`` (it must not, e.g. held-out text after overfitting).
        name: the result's name, to tell several runs apart in a report.

    Returns:
        A Result with ``accuracy``; per case in ``details`` the text, expected word, prediction,
        and the rank (1 = top) and probability of the best-ranked expected word. A failure
        names the cases that decided it.
    """
    vocab = check_masked_lm(model, tokenizer)
    check_int(top_k, "top_k", 1, vocab, "the vocabulary size")
    check_fraction(threshold, "threshold")
    if expect not in ("at_least", "at_most"):
        raise InputError(f"'expect' must be 'at_least' or 'at_most' (got {describe(expect)})")
    items = [_cloze_case(case, i) for i, case in enumerate(_sequence(cases, "cases"))]
    answer_ids = [_answer_ids(tokenizer, case, i) for i, case in enumerate(items)]
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    for index, position, probs in _mask_probabilities(model, tokenizer, [c.text for c in items], batch_size,
                                                      "cases"):
        if index in seen:
            raise InputError(f"'cases[{index}]' must hold exactly one mask token "
                             f"{tokenizer.mask_token!r} (got several in {_excerpt(items[index].text, tokenizer)!r})")
        seen.add(index)
        expected = max(answer_ids[index], key=lambda i: float(probs[i]))
        p_expected = float(probs[expected])
        predicted = int(probs.argmax())
        rank = int((probs > probs[expected]).sum()) + 1  # 1 = the model's first choice
        rows.append({
            "case": index, "text": items[index].text, "expected": "/".join(items[index].answers),
            "prediction": _decode(tokenizer, predicted), "rank": rank, "probability": p_expected,
            "correct": rank <= top_k, "position": position,
        })
    correct = sum(row["correct"] for row in rows)
    accuracy = correct / len(rows)
    at_least = expect == "at_least"
    passed = accuracy >= threshold if at_least else accuracy <= threshold
    headroom = headroom_above(accuracy, threshold) if at_least else headroom_below(accuracy, threshold)
    kind = f"top-{top_k}"
    summary = f"accuracy {accuracy:.3g} ({kind}, {correct} of {len(rows)} cases)"
    if at_least:
        deciding = [row for row in rows if not row["correct"]]
        verdict = f"reaches {threshold:g}" if passed else f"is below {threshold:g}"
        label = "missed" if passed else "failing"
    else:
        deciding = [row for row in rows if row["correct"]]
        verdict = f"stays at or below {threshold:g}" if passed else f"exceeds {threshold:g}"
        label = "filled" if passed else "unexpectedly filled"
    explanation = f"{summary} {verdict}"
    if deciding:
        shown = "; ".join(_describe_case(row, tokenizer) for row in deciding[:3])
        more = f"; and {len(deciding) - 3} more" if len(deciding) > 3 else ""
        explanation += f"; {label}: {shown}{more}"
    return Result(
        name=name, passed=passed,
        metrics={"accuracy": accuracy, "correct": correct, "cases": len(rows), "top_k": top_k,
                 "expect": expect},
        threshold=float(threshold), headroom=headroom, explanation=explanation, details=tuple(rows),
    )


@probe("masked_loss_at_init")
def masked_loss_at_init(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Any, *,
    tolerance: float = 0.1, mlm_probability: float = 0.15, seed: int = 0, batch_size: int = 8,
) -> Result:
    """Check that an untrained masked LM's loss is close to ln(V), the loss of a uniform guess.

    Far above means the initialization is too confident (scale of the embeddings or the output
    layer); far below means the model already knows something, or the labels leak the answer.

    Args:
        examples: as for :func:`~lmcheck.loops.masked.train_masked_lm`; masked with a seeded collator.
        tolerance: allowed relative distance from ln(V) (default 0.1, i.e. 10%).
    """
    vocab = check_masked_lm(model, tokenizer)
    check_int(batch_size, "batch_size", 1)
    check_number(tolerance, "tolerance", low=0)
    check_fraction(mlm_probability, "mlm_probability")
    check_seed(seed)
    rows = example_ids(tokenizer, examples, model)
    if not takes_mask(model):
        batch_size = 1  # a model that takes no attention mask (FNet) gets unpadded examples
    # the collator's own seed= raises in any multiprocessing child that is not a DataLoader
    # worker; a seeded, forked generator masks alike and leaves the caller's generator alone
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)
    device = model_device(model)
    total, count = 0.0, 0
    with eval_mode(model), torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in
                     collate([{"input_ids": r} for r in rows[start:start + batch_size]]).items()}
            labels = batch.pop("labels")  # (B, T)
            logits = encoder_logits(model, batch).float()  # (B, T, V)
            valid = batch["attention_mask"] if "attention_mask" in batch else None
            require_finite(logits, f"the logits of examples {start} to {start + len(labels) - 1}",
                           ("example", "position", "token id"), valid=valid, offsets=(start,))
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, vocab), labels.reshape(-1), reduction="sum"))
            count += int((labels != -100).sum())
    loss, expected = total / max(count, 1), math.log(vocab)
    distance = abs(loss - expected) / expected
    passed = distance <= tolerance
    if passed:
        explanation = f"loss at init {loss:.4f} is within {tolerance:.0%} of ln({vocab}) = {expected:.4f}"
    else:
        side = ("above: the initial predictions are too confident; check the scale of the "
                "embeddings and the output layer's initialization") if loss > expected else (
                "below: an untrained model should not do better than a uniform guess; check "
                "that the labels do not leak into the inputs")
        explanation = (f"loss at init {loss:.4f} is {distance:.1%} {side} (ln({vocab}) = "
                       f"{expected:.4f}, tolerance {tolerance:.0%})")
    return Result(
        name="masked_loss_at_init", passed=passed,
        metrics={"loss": loss, "ln_vocab": expected, "relative_distance": distance, "scored_tokens": count},
        threshold=tolerance, headroom=headroom_below(distance, tolerance), explanation=explanation,
    )


@probe("bidirectionality")
def bidirectionality(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
    text: str = "Life is like a [MASK] of chocolates, you never know what you are going to get.", *,
    trials: int = 3, atol: float | None = None, seed: int = 0,
) -> Result:
    """The prediction at a mask changes when only the tokens to its right change.

    A masked LM fills a blank from both sides; one that attends causally by mistake (a decoder
    config, a causal mask left in the attention) predicts from the left alone, so changing the
    right context moves nothing. The tokens after the first mask (special tokens aside) are
    replaced by random ones ``trials`` times; the largest change of the logits at the mask must
    exceed ``atol`` (default :data:`~lmcheck.comparison.LOGIT_ATOL` for the model's dtype).
    ``[MASK]`` in ``text`` stands for the tokenizer's own mask token.
    """
    check_masked_lm(model, tokenizer)
    check_int(trials, "trials", 1, 100, "100 trials (each is one forward pass)")
    check_seed(seed)
    if atol is not None:
        check_number(atol, "atol", low=0)
    check_texts(text, "text")
    encoded = tokenizer(text.replace("[MASK]", tokenizer.mask_token), return_tensors="pt")
    ids = encoded["input_ids"]  # (1, T)
    masks = (ids[0] == tokenizer.mask_token_id).nonzero()
    if not len(masks):
        raise InputError(f"'text' must contain [MASK] or the tokenizer's mask token {tokenizer.mask_token!r} "
                         f"(got {_excerpt(text, tokenizer)!r})")
    position = int(masks[0])
    special = set(tokenizer.all_special_ids)
    right = [t for t in range(position + 1, ids.shape[1]) if int(ids[0, t]) not in special]
    if not right:
        raise InputError(f"'text' must have words after its mask to change (got {_excerpt(text, tokenizer)!r})")
    tol = tolerance_for(LOGIT_ATOL, model) if atol is None else atol
    generator = torch.Generator().manual_seed(seed)
    ordinary = torch.tensor([i for i in range(min(len(tokenizer), 30000)) if i not in special])
    changes = []
    with eval_mode(model), torch.no_grad():
        base = encoder_logits(model, encoded)[0, position].float()  # (V,)
        require_finite(base, "the logits at the mask", ("token id",))
        for trial in range(trials):
            changed = {k: v.clone() for k, v in encoded.items()}
            picks = torch.randint(len(ordinary), (len(right),), generator=generator)
            changed["input_ids"][0, right] = ordinary[picks]
            logits = encoder_logits(model, changed)[0, position].float()
            require_finite(logits, f"the logits at the mask with the right context changed (trial {trial})",
                           ("token id",))
            changes.append(float((logits - base).abs().max()))
    largest = max(changes)
    passed = largest > tol
    left_change = None
    left = [t for t in range(position) if int(ids[0, t]) not in special]
    if not passed and left:  # does the left side move it? If not, the model mixes no tokens at all
        with eval_mode(model), torch.no_grad():
            changed = {k: v.clone() for k, v in encoded.items()}
            changed["input_ids"][0, left] = ordinary[torch.randint(len(ordinary), (len(left),), generator=generator)]
            left_logits = encoder_logits(model, changed)[0, position].float()
        require_finite(left_logits, "the logits at the mask with the left context changed", ("token id",))
        left_change = float((left_logits - base).abs().max())
    words = f"{len(right)} token{'s' if len(right) > 1 else ''} to its right"
    explanation = (f"the logits at the mask (position {position}) move by up to {largest:.3g} when the "
                   f"{words} change ({trials} trials; more than {tol:g}): the model reads both sides"
                   if passed else
                   f"the logits at the mask (position {position}) move by at most {largest:.3g} (tolerance "
                   f"{tol:g}) when the {words} change: the model does not read the right context; "
                   + (f"nor the left one (changing the {len(left)} tokens to its left moves them by "
                      f"{left_change:.3g}): at this input of {ids.shape[1]} tokens the prediction at a "
                      f"mask depends on no other token, so the model mixes nothing across positions "
                      f"(attention that never reaches them, or blocks or patches longer than the input)"
                      if left_change is not None and left_change <= tol else
                      "it attends causally (a decoder config or a causal attention mask), so it cannot "
                      "fill a blank from both sides"))
    return Result(name="bidirectionality", passed=passed,
                  metrics={"max_logit_change": largest, "mask_position": position, "changed_tokens": len(right),
                           "trials": trials, "left_context_change": left_change},
                  threshold=tol, headroom=headroom_above(largest, tol) if tol > 0 else (1.0 if passed else -1.0),
                  explanation=explanation, details=tuple({"trial": i, "max_logit_change": c}
                                                         for i, c in enumerate(changes)))


@probe("encoder_padding_invariance")
def encoder_padding_invariance(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *,
    atol: float | None = None,
) -> Result:
    """Each text's logits alone equal its logits in a padded batch of texts of other lengths.

    The encoder's padding and batch invariance: the tokenizer pads the batch on its own side
    (right for BERT) and the attention mask must hide the pads from every real token. Logits at
    the real positions must agree within ``atol`` (default :data:`~lmcheck.comparison.LOGIT_ATOL`).
    """
    check_masked_lm(model, tokenizer)
    items = check_texts(texts, "texts", single=False)
    if len(items) < 2:
        raise InputError(f"'texts' must hold at least 2 texts to batch (got {len(items)})")
    if tokenizer.pad_token_id is None:
        raise InputError("'tokenizer' must have a pad token to batch texts of different lengths")
    if atol is not None:
        check_number(atol, "atol", low=0)
    tol = tolerance_for(LOGIT_ATOL, model) if atol is None else atol
    rows = []
    with eval_mode(model), torch.no_grad():
        batch = tokenizer(items, padding=True, return_tensors="pt")
        batched = encoder_logits(model, batch).float().cpu()  # (B, T, V)
        real = batch["attention_mask"].bool()
        require_finite(batched, "the logits of the padded batch", ("text", "position", "token id"), valid=real)
        for index, text in enumerate(items):
            alone_inputs = tokenizer([text], return_tensors="pt")
            alone = encoder_logits(model, alone_inputs).float().cpu()[0]  # (t, V)
            require_finite(alone, f"the logits of text {index} alone", ("position", "token id"))
            in_batch = batched[index][real[index]]  # (t, V)
            diff = (alone - in_batch).abs()
            rows.append({"text": index, "tokens": alone.shape[0], "pads": int((~real[index]).sum()),
                         "max_logit_diff": float(diff.max()), "position": int(diff.amax(-1).argmax())})
    worst = max(rows, key=lambda r: r["max_logit_diff"])
    bad = [r for r in rows if r["max_logit_diff"] > tol]
    if bad:
        first = bad[0]
        explanation = (f"text {first['text']} in a padded batch of {len(items)} ({first['pads']} pads): its "
                       f"logits differ from the text alone by {first['max_logit_diff']:.3g} at position "
                       f"{first['position']}, above {tol:g}: the pads reach the real tokens (check the "
                       f"attention mask)")
    else:
        explanation = (f"{len(items)} texts in a padded batch: logits within {tol:g} of each text alone "
                       f"(largest {worst['max_logit_diff']:.3g})")
    return Result(name="encoder_padding_invariance", passed=not bad,
                  metrics={"texts": len(items), "max_logit_diff": worst["max_logit_diff"]}, threshold=tol,
                  headroom=headroom_below(worst["max_logit_diff"], tol), explanation=explanation,
                  details=tuple(rows))


# --- helpers -------------------------------------------------------------------------------

def _check_tokenizer(tokenizer: object) -> None:
    tokenizer = cast(PreTrainedTokenizerBase, check_tokenizer(tokenizer))
    if tokenizer.mask_token_id is None:
        raise ModelError(f"'tokenizer' must have a mask token for masked-LM probes "
                         f"({type(tokenizer).__name__} {tokenizer.name_or_path!r} has none)")


def check_masked_lm(model: object, tokenizer: object) -> int:
    """Raise unless model is a bidirectional masked LM that fits tokenizer; return vocab size."""
    _check_tokenizer(tokenizer)
    tokenizer = cast(PreTrainedTokenizerBase, tokenizer)
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None:
        raise ModelError(f"'model' must be a Hugging Face masked LM such as BertForMaskedLM (got {describe(model)})")
    check_model(model)
    cls = type(model).__name__
    if cls not in _MASKED_LM_CLASSES and not cls.endswith("ForMaskedLM"):
        what = "a causal LM" if cls in _CAUSAL_LM_CLASSES else "a model without a masked-LM head"
        raise ModelError(f"'model' must be a masked LM with its MLM head (a *ForMaskedLM class such "
                         f"as BertForMaskedLM); got {cls}, {what}")
    if getattr(config, "is_decoder", False):
        raise ModelError(f"'model' must attend in both directions; {cls} has config.is_decoder=True "
                         f"(causal attention), so it cannot fill a mask from the right context")
    embeddings = input_vocabulary(model) or len(tokenizer)
    if len(tokenizer) > embeddings:
        raise ModelError(f"'tokenizer' has {len(tokenizer):,} tokens but the model's input embeddings "
                         f"hold {embeddings:,}: ids from {embeddings} up would index past the table "
                         f"(use the model's own tokenizer, or resize_token_embeddings)")
    output = model.get_output_embeddings()  # type: ignore[operator]
    return int(getattr(output, "out_features", None) or getattr(config, "vocab_size", None) or embeddings)


def _sequence(value: object, argument: str) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise InputError(f"'{argument}' must be a non-empty list (got {describe(value)})")
    return list(value)


def _cloze_case(case: object, index: int) -> ClozeCase:
    if isinstance(case, tuple) and len(case) == 2 and not isinstance(case, ClozeCase):
        text, answers = case
        case = ClozeCase(text, (answers,) if isinstance(answers, str) else tuple(answers))
    if not isinstance(case, ClozeCase) or not isinstance(case.text, str) or not case.answers \
            or not all(isinstance(a, str) and a.strip() for a in case.answers):
        raise InputError(f"'cases[{index}]' must be a ClozeCase(text, answers) with at least one "
                         f"non-empty answer, or a (text, answer) pair (got {describe(case)})")
    return case


def _answer_ids(tokenizer: PreTrainedTokenizerBase, case: ClozeCase, index: int) -> list[int]:
    """Vocabulary ids that spell each answer as one token, with or without a leading space."""
    ids: set[int] = set()
    for answer in case.answers:
        for spelling in (answer.strip(), " " + answer.strip()):
            encoded = tokenizer.encode(spelling, add_special_tokens=False)
            if len(encoded) == 1 and _decode(tokenizer, encoded[0]).lower() == answer.strip().lower():
                ids.add(encoded[0])
    if not ids:
        pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(case.answers[0], add_special_tokens=False))
        raise InputError(f"'cases[{index}]': answer {case.answers[0]!r} must be one token of the "
                         f"vocabulary to fit one mask (it is {pieces})")
    return sorted(ids)


def _mask_probabilities(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int,
    argument: str,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (text index, mask position, probabilities over the vocabulary (V,)) per mask."""
    check_int(batch_size, "batch_size", 1, None, "")
    if tokenizer.pad_token_id is None:
        batch_size = 1  # nothing to pad with: one text per forward pass
    found = model_context(model)
    limit, where = (None, "") if found is None else found
    with eval_mode(model):  # dropout off: predictions must not be random
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start:start + batch_size], padding=True, return_tensors="pt")
            ids = encoded["input_ids"]  # (B, T)
            for row in range(ids.shape[0]):
                index = start + row
                if not bool((ids[row] == tokenizer.mask_token_id).any()):
                    raise InputError(f"'{argument}[{index}]' must contain the tokenizer's mask token "
                                     f"{tokenizer.mask_token!r} (got {_excerpt(texts[index], tokenizer)!r})")
            if limit is not None and ids.shape[1] > limit:
                raise InputError(f"texts {start} to {start + len(ids) - 1} encode to {ids.shape[1]} tokens, "
                                 f"more than the model's {limit} positions ({where})")
            with torch.inference_mode():
                logits = encoder_logits(model, encoded)  # (B, T, V)
            require_finite(logits, f"the logits of texts {start} to {start + len(ids) - 1}",
                           ("text", "position", "token id"), valid=encoded["attention_mask"].bool(),
                           offsets=(start,))
            left_pads = (1 - encoded["attention_mask"]).cumprod(-1).sum(-1)  # (B,) 0 unless left-padded
            for row, column in (ids == tokenizer.mask_token_id).nonzero().tolist():
                probs = logits[row, column].float().softmax(-1)  # (V,)
                yield start + row, column - int(left_pads[row]), probs


def example_ids(tokenizer: PreTrainedTokenizerBase, examples: Any, model: torch.nn.Module) -> list[list[int]]:
    """Training or scoring examples (texts, id rows or a dataset of chunks) as lists of ids."""
    column = examples["input_ids"] if hasattr(examples, "column_names") and \
        "input_ids" in examples.column_names else examples
    if not isinstance(column, (list, tuple)) and hasattr(column, "__iter__") \
            and not isinstance(column, (str, bytes, Mapping, torch.Tensor)):
        column = list(column)  # a datasets column
    rows = _sequence(column, "examples")
    if all(isinstance(r, str) for r in rows):
        found = model_context(model)
        limit = found[0] if found is not None else tokenizer.model_max_length
        return [list(ids) for ids in tokenizer(rows, truncation=True, max_length=limit)["input_ids"]]
    vocab = input_vocabulary(model) or len(tokenizer)
    for index, row in enumerate(rows):
        if isinstance(row, str) or not isinstance(row, Sequence) or not row \
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in row):
            raise InputError(f"'examples[{index}]' must be a non-empty list of token ids or a str "
                             f"(got {describe(row)})")
        bad = next((i for i in row if not 0 <= i < vocab), None)
        if bad is not None:
            raise InputError(f"'examples[{index}]' must hold token ids from 0 to {vocab - 1}, the "
                             f"model's vocabulary (got id {bad}); tokenize with the model's tokenizer")
    return [list(r) for r in rows]


def _decode(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return str(tokenizer.decode([token_id])).strip()


def _excerpt(text: str, tokenizer: PreTrainedTokenizerBase, width: int = 30) -> str:
    """The text around its first mask token, shortened to about 2 * width characters."""
    at = text.find(tokenizer.mask_token) if tokenizer.mask_token else -1
    at = max(at, 0)
    start, end = max(0, at - width), at + len(tokenizer.mask_token or "") + width
    return ("..." if start > 0 else "") + text[start:end] + ("..." if end < len(text) else "")


def _describe_case(row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> str:
    return (f"case {row['case']} {_excerpt(row['text'], tokenizer)!r}: expected {row['expected']!r}, "
            f"predicted {row['prediction']!r} (rank {row['rank']}, p={row['probability']:.3g})")


