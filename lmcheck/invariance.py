"""Invariance probes: padding and batching must not change what a causal LM computes.

Users of hand-written greedy loops keep reporting outputs that change when a prompt is left-padded
or batched with others (transformers #2401, #41060). :func:`padding_invariance` runs each prompt
alone and behind masked left pads; :func:`batch_invariance` runs the prompts alone and as one
left-padded batch. Both compare the logits within :data:`~lmcheck.comparison.LOGIT_ATOL` and let
the greedy tokens part only at a tie (:func:`~lmcheck.comparison.compare_greedy_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from lmcheck._finite import in_context, probe
from lmcheck._greedy import compare_greedy_rows
from lmcheck._model import (
    check_causal_lm,
    check_context,
    eval_mode,
    model_device,
    model_forward,
    recurrent_note,
    takes_mask,
)
from lmcheck._validate import (
    check_int,
    check_max_new_tokens,
    check_number,
    check_tokenizer,
    count_phrase,
    encode_batch,
    pad_id,
    prompt_list,
)
from lmcheck.comparison import LOGIT_ATOL, TIE_ATOL, tolerance_for
from lmcheck.decoding import GreedyOutput, greedy_decode
from lmcheck.errors import InputError, NotApplicableError
from lmcheck.results import Result, headroom_below

__all__ = ["batch_invariance", "padding_invariance"]


@probe("padding_invariance")
def padding_invariance(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: str | Sequence[str], *,
    pad_tokens: int = 8, max_new_tokens: int = 4, atol: float | None = None,
) -> Result:
    """Check that ``pad_tokens`` left pads change neither the logits nor the greedy tokens.

    Each prompt runs alone, then with the pads in front (masked out); the logits at every step
    until the tokens part must be within ``atol`` (default :data:`LOGIT_ATOL` for the dtype),
    and the tokens may part only at a tie: a top-2 gap within ``max(TIE_ATOL, 2 * atol)``,
    since logits that may each move by ``atol`` can flip two tokens that far apart.
    """
    check_causal_lm(model)
    _require_mask(model, "padding_invariance compares each prompt alone with the prompt behind left pads")
    check_int(pad_tokens, "pad_tokens", 1)
    check_max_new_tokens(max_new_tokens)
    if atol is not None:
        check_number(atol, "atol", low=0)
    items = prompt_list(prompts)
    check_tokenizer(tokenizer)
    pad = pad_id(tokenizer, required_for=f"padding_invariance (pad_tokens={pad_tokens})")
    pairs = []
    for index, text in enumerate(items):
        ids, _ = encode_batch(tokenizer, [text])
        check_context(model, ids.shape[1] + pad_tokens, max_new_tokens, pads=f"pad_tokens={pad_tokens}")
        padded = torch.cat([torch.full((1, pad_tokens), pad), ids], dim=1)
        mask = torch.cat([torch.zeros(1, pad_tokens, dtype=torch.long), torch.ones_like(ids)], dim=1)
        with in_context(f"prompt {index} alone"):
            alone = greedy_decode(model, ids, max_new_tokens=max_new_tokens)
        with in_context(f"prompt {index} with {pad_tokens} left pads"):
            padded_run = greedy_decode(model, padded, max_new_tokens=max_new_tokens, attention_mask=mask)
        pairs.append((alone, padded_run, 0))
    return _invariance("padding_invariance", f"with {pad_tokens} left pads", "padded", pairs, model,
                       tokenizer, atol)


@probe("batch_invariance")
def batch_invariance(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
    max_new_tokens: int = 4, atol: float | None = None,
) -> Result:
    """Check that a left-padded batch of prompts gives each prompt's logits and tokens alone.

    Logits must agree within ``atol`` (default :data:`LOGIT_ATOL` for the dtype) until the
    tokens part, and they may part only at a tie: a top-2 gap within ``max(TIE_ATOL, 2 * atol)``.
    """
    check_causal_lm(model)
    _require_mask(model, "batch_invariance runs prompts of different lengths as one left-padded batch")
    check_max_new_tokens(max_new_tokens)
    if atol is not None:
        check_number(atol, "atol", low=0)
    items = prompt_list(prompts)
    if len(items) < 2:
        raise InputError(f"'prompts' must hold at least 2 prompts to batch (got {len(items)})")
    ids, mask = encode_batch(tokenizer, items)
    with in_context(f"the batch of {len(items)} prompts (row = prompt)"):
        batched = greedy_decode(model, ids, max_new_tokens=max_new_tokens, attention_mask=mask)
    pairs = []
    for row, text in enumerate(items):
        alone_ids, _ = encode_batch(tokenizer, [text])
        with in_context(f"prompt {row} alone"):
            alone = greedy_decode(model, alone_ids, max_new_tokens=max_new_tokens)
        pairs.append((alone, batched, row))
    return _invariance("batch_invariance", f"in a left-padded batch of {len(items)}", "batched",
                       pairs, model, tokenizer, atol)


def _mask_effect(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> str:
    """A clause saying that the attention mask has no effect on the logits, where that is so:
    ``ids`` run with ``mask`` (pads in it) and with every position attended give equal logits,
    so the model takes the mask and ignores it (RWKV, RecurrentGemma, YOSO's rounded mask).
    Empty where the mask does change them, or there are no pads."""
    if bool(mask.all()):
        return ""
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        masked, _ = model_forward(model, ids.to(device), mask.to(device), None, use_cache=False)
        attended, _ = model_forward(model, ids.to(device), torch.ones_like(mask).to(device), None,
                                    use_cache=False)
    real = mask[0].bool()
    if not torch.equal(masked[0, real.to(device)], attended[0, real.to(device)]):
        return ""
    return ("; the attention mask has no effect on the logits: with the pads masked they equal the "
            "logits with the pads attended, so the model takes the mask and ignores it")


def _require_mask(model: torch.nn.Module, what: str) -> None:
    if not takes_mask(model):
        raise NotApplicableError(f"{what}, which needs a model that takes an attention mask; the "
                                 f"forward of the {type(model).__name__} names no 'attention_mask'")


def _invariance(name: str, condition: str, side: str,
                pairs: list[tuple[GreedyOutput, GreedyOutput, int]], model: torch.nn.Module,
                tokenizer: PreTrainedTokenizerBase, atol: float | None) -> Result:
    """Compare each (alone, other, row of other) pair: logits until the tokens part, and tokens.

    ``side`` names the other computation in the details (``"padded"``: ``padded_token``). A
    parting is a tie within ``max(TIE_ATOL, 2 * atol)``: the noise allowed may flip that much.
    """
    tol = tolerance_for(LOGIT_ATOL, model) if atol is None else atol
    tie = max(tolerance_for(TIE_ATOL, model), 2 * tol)
    rows = []
    for index, (alone, other, row) in enumerate(pairs):
        (compared,), diff = compare_greedy_rows(alone.new_tokens[:1], alone.logits[:1],
                                                other.new_tokens[row: row + 1],
                                                other.logits[row: row + 1], tie, sides=("alone", side))
        last_token_diff = float((alone.logits[0, 0] - other.logits[row, 0]).abs().max())
        rows.append({**compared, "row": index, "max_logit_diff": diff,
                     "last_token_logit_diff": last_token_diff})
    worst = max(rows, key=lambda r: r["max_logit_diff"])
    bad = [r for r in rows if r["max_logit_diff"] > tol or r["verdict"] == "mismatch"]
    steps = pairs[0][0].logits.shape[1]
    if bad:
        first = bad[0]
        above = "above" if first["max_logit_diff"] > tol else "within"
        explanation = (f"prompt {first['row']} {condition}: logits differ from the prompt alone by "
                       f"{first['max_logit_diff']:.3g} (at the last prompt token "
                       f"{first['last_token_logit_diff']:.3g}), {above} the tolerance {tol:g}")
        if first["verdict"] == "mismatch":
            explanation += (f"; greedy tokens part at step {first['step']}, a top-2 gap of "
                            f"{first['gap']:.3g} (more than the tie tolerance {tie:g}): "
                            f"{tokenizer.decode([first['alone_token']])!r} alone, "
                            f"{tokenizer.decode([first[side + '_token']])!r} {condition}")
        _, other, row = pairs[first["row"]]
        explanation += _mask_effect(model, other.sequences[row:row + 1, :other.prompt_length],
                                   other.attention_mask[row:row + 1, :other.prompt_length])
        explanation += recurrent_note(model, cached=False)
    else:
        explanation = (f"{count_phrase(rows, 'prompt')} {condition}: logits within {tol:g} of each prompt alone "
                       f"(largest {worst['max_logit_diff']:.3g}) and the same {steps} greedy tokens")
    return Result(name=name, passed=not bad,
                  metrics={"prompts": len(rows), "max_logit_diff": worst["max_logit_diff"], "tie_atol": tie,
                           "greedy_steps": steps, "mismatches": sum(r["verdict"] == "mismatch" for r in rows)},
                  # a mismatch's gap > 2 * tol implies a logit difference > tol; the gaps are
                  # kept so that the headroom is negative on every failure regardless
                  threshold=tol, headroom=min([headroom_below(worst["max_logit_diff"], tol)]
                                              + [headroom_below(r["gap"], tie) for r in bad
                                                 if r["verdict"] == "mismatch"]),
                  explanation=explanation,
                  details=tuple(rows))
