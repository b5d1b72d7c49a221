"""Causal-LM probes: what must agree with the tutorial's greedy loop.

The loop itself, :func:`~lmcheck.decoding.greedy_decode`, lives in :mod:`lmcheck.decoding`. The
probes check the mismatches that users of such loops keep reporting (transformers #15206,
#36536, #2401, #41060): a loop that differs from ``generate`` because the model's generation_config injects
sampling or a penalty (:func:`greedy_matches_generate`), a cache that differs from full
recomputation (:func:`kv_cache_matches_full`), and an attention mask that lets a position see the
future (:func:`causality`). Padding or batching that changes outputs is checked in
:mod:`lmcheck.invariance`.

Tolerances depend on the dtype of the logits (:data:`~lmcheck.comparison.LOGIT_ATOL`,
:data:`~lmcheck.comparison.TIE_ATOL`); greedy comparisons are tie-tolerant the way the
transformers test suite is: two sequences may part only where the two top logits are within
``TIE_ATOL`` of each other. Both live in :mod:`lmcheck.comparison`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from lmcheck._finite import in_context, probe, require_finite
from lmcheck._greedy import compare_greedy_rows
from lmcheck._model import (
    can_generate,
    check_causal_lm,
    check_context,
    eval_mode,
    has_cache,
    input_vocabulary,
    model_device,
    model_forward,
    parameter_dtype,
    recurrent_note,
    token_embedding,
)
from lmcheck._validate import (
    as_ids,
    check_max_new_tokens,
    check_number,
    check_seed,
    count_phrase,
    encode_batch,
)
from lmcheck.comparison import LOGIT_ATOL, TIE_ATOL, tolerance_for
from lmcheck.decoding import greedy_decode
from lmcheck.errors import InputError, NotApplicableError
from lmcheck.results import Result, headroom_below

__all__ = [
    "causality",
    "greedy_matches_generate",
    "kv_cache_matches_full",
]

# generation_config fields that change what greedy decoding picks or when it stops, and the
# value that makes them inert. generate fills every argument left at None from the model's own
# generation_config (seen with SmolLM2: its repetition_penalty=1.3 survives do_sample=False, and
# even generation_config=GenerationConfig(do_sample=False); only an explicit 1.0 removes it), so
# greedy_matches_generate passes each of these explicitly.
NEUTRAL_GENERATION: dict[str, Any] = {
    "do_sample": False, "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None,
    "dola_layers": None, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
    "min_length": 0, "min_new_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "sequence_bias": None, "exponential_decay_length_penalty": None, "guidance_scale": None,
    "watermarking_config": None, "eos_token_id": None, "stop_strings": None, "max_time": None,
    "num_return_sequences": 1, "prompt_lookup_num_tokens": None, "cache_implementation": None,
    # sampling-only settings: inert once do_sample is False, reported when set
    "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "typical_p": 1.0,
}


@probe("greedy_matches_generate")
def greedy_matches_generate(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: str | Sequence[str], *,
    max_new_tokens: int = 20, neutralize: bool = True, tie_atol: float | None = None,
) -> Result:
    """Check that the hand loop and ``generate(do_sample=False, num_beams=1)`` pick the same tokens.

    Prompts of different lengths run as one left-padded batch. With ``neutralize`` (default),
    every generation_config setting that could change greedy output (sampling, penalties,
    minimum length, eos stop, ...) is overridden explicitly and listed in the explanation; with
    ``neutralize=False``, generate runs as the model's generation_config configures it, so such a
    setting shows up as a mismatch that the explanation names.

    Args:
        tie_atol: two top logits this close are a tie that may part the sequences; default
            :data:`TIE_ATOL` for the logits' dtype.
    """
    check_causal_lm(model)
    if not can_generate(model):
        raise NotApplicableError(f"the check compares the greedy loop with Hugging Face's generate(), "
                                 f"and the {type(model).__name__} has no generate()")
    generate: Callable[..., Any] = model.generate  # type: ignore[assignment]
    if tie_atol is not None:
        check_number(tie_atol, "tie_atol", low=0)
    ids, mask = encode_batch(tokenizer, prompts)
    check_max_new_tokens(max_new_tokens)
    check_context(model, ids.shape[1], max_new_tokens)
    with in_context("the hand loop (row = prompt)"):
        hand = greedy_decode(model, ids, max_new_tokens=max_new_tokens, attention_mask=mask)
    tol = tolerance_for(TIE_ATOL, model) if tie_atol is None else tie_atol
    overrides = _generation_overrides(getattr(model, "generation_config", None))
    # generate wants a pad id even where nothing is padded (rows of equal length)
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad}
    if neutralize:
        settings.update(NEUTRAL_GENERATION)
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        generated = generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), return_dict_in_generate=True,
            output_logits=True, **settings)
    gen_tokens = generated.sequences[:, ids.shape[1]:].cpu()  # (B, <= N)
    gen_logits = torch.stack(generated.logits, dim=1).float().cpu()  # (B, <= N, V)
    require_finite(gen_logits, "generate's logits", ("row", "step", "token id"))
    # a row that met eos is padded with the pad id while the batch goes on
    eos = () if neutralize else _eos_ids(getattr(model, "generation_config", None))
    rows, max_diff = compare_greedy_rows(hand.new_tokens, hand.logits, gen_tokens, gen_logits, tol,
                                         sides=("hand", "generate"), eos_ids=eos, pad=pad)
    named = ", ".join(overrides) or "none"
    failures = [r for r in rows if r["verdict"] == "mismatch"]
    ties = [r for r in rows if r["verdict"] == "tie"]
    passed = not failures
    where = "neutralised" if neutralize else "left in force"
    if passed:
        tied = ""
        if ties:
            t = ties[0]
            tied = (f" ({count_phrase(ties, 'row')} part at a tie; the first: row {t['row']}, step "
                    f"{t['step']}, the hand loop {_token(tokenizer, t['hand_token'])}, generate "
                    f"{_token(tokenizer, t['generate_token'])}, top-2 gap {t['gap']:.3g} <= {tol:g})")
        explanation = (f"{count_phrase(rows, 'prompt')} x {max_new_tokens} tokens: the hand loop equals "
                       f"generate{tied}; generation_config overrides {where}: {named}")
    else:
        first = failures[0]
        chosen = _token(tokenizer, first["hand_token"])
        if first["generate_token"] < 0:
            what = f"generate stopped (eos) where the hand loop went on with {chosen}"
        else:
            what = (f"generate chose {_token(tokenizer, first['generate_token'])}, the hand loop "
                    f"{chosen}; the "
                    f"hand loop's logits for the two differ by {first['gap']:.3g}, more than the tie "
                    f"tolerance {tol:g}")
        explanation = (
            f"row {first['row']}, step {first['step']} (from 0) of {max_new_tokens}: {what}; "
            f"generation_config overrides {where}: {named}"
            + ("" if neutralize or not overrides else " (pass them explicitly to generate, or use "
               "neutralize=True)"))
        if first["step"] > 0 and not has_cache(model):
            explanation += ("; the hand loop recomputes the whole sequence at every step (the model "
                            "returns no cache lmcheck can take back), while generate decodes from the "
                            "model's own cached state: steps 0 to "
                            f"{first['step'] - 1} agree, so the model's cached step is what differs")
    # How close it came to failing, in [0, 1] on a pass:
    # - a row that parted at a tie: headroom_below(its gap, tol), how near the gap came to tol;
    # - elsewhere only steps whose top-2 gap exceeds tol count (a flip there is a failure; one
    #   at or below tol is a tie). A flip needs the two paths' logits to differ by about half
    #   the gap, so the margin is max(0, headroom_below(2 * max_logit_diff, closest such gap)),
    #   1.0 where there is no such step;
    # - the headroom is the least of these. On failure: how far the parting step's gap went
    #   past the tie tolerance (-inf for an eos stop).
    top2 = hand.logits.topk(2, dim=-1).values  # (B, N, 2)
    gaps = top2[..., 0] - top2[..., 1]  # (B, N)
    closest_gap = float(gaps.min())
    shared = torch.ones_like(gaps, dtype=torch.bool)  # (B, N): steps both paths reach alike
    for r in ties:
        shared[r["row"], r["step"]:] = False
    decisive = gaps[shared & (gaps > tol)]
    closest_decisive = float(decisive.min()) if decisive.numel() else None
    margin = 1.0 if closest_decisive is None else max(0.0, headroom_below(2 * max_diff, closest_decisive))
    if passed:
        headroom = min([margin] + [headroom_below(r["gap"], tol) for r in ties])
    else:
        headroom = headroom_below(max(r["gap"] for r in failures), tol)
    return Result(
        name="greedy_matches_generate", passed=passed,
        metrics={"prompts": len(rows), "max_new_tokens": max_new_tokens, "ties": len(ties),
                 "mismatches": len(failures), "max_logit_diff": max_diff,
                 "closest_top2_gap": closest_gap, "closest_decisive_top2_gap": closest_decisive,
                 "headroom_rule": "min(1 - gap/tie_atol per tie, max(0, 1 - 2 * max_logit_diff / "
                                  "closest_decisive_top2_gap)); the latter is 1 if no gap > tie_atol",
                 "generation_config_overrides": overrides, "neutralized": neutralize},
        threshold=tol, headroom=headroom, explanation=explanation, details=tuple(rows))


@probe("kv_cache_matches_full")
def kv_cache_matches_full(
    model: torch.nn.Module, input_ids: torch.Tensor | Sequence[Any], *, max_new_tokens: int = 8,
    attention_mask: torch.Tensor | None = None, atol: float | None = None,
) -> Result:
    """Check, step by step, that logits computed with the KV cache equal full recomputation.

    The cached greedy loop runs first; then at each step the sequence so far is run again
    without a cache. Step 0 is the prompt pass (no cache read yet); later steps read the cache.
    A model that returns no cache fails: the loop would re-feed the whole sequence, and the two
    sides would be one computation.
    """
    check_causal_lm(model)
    if atol is not None:
        check_number(atol, "atol", low=0)
    if not has_cache(model):
        raise NotApplicableError(f"lmcheck drives a KV cache through Hugging Face's interface "
                                 f"(past_key_values or cache), and the {type(model).__name__} has none")
    with in_context("the loop with the cache"):
        cached = greedy_decode(model, input_ids, max_new_tokens=max_new_tokens,
                               attention_mask=attention_mask, use_cache=True)
    tol = tolerance_for(LOGIT_ATOL, model) if atol is None else atol
    if not cached.cache_used:  # the loop fell back to full recomputation: both sides are one
        return Result(
            name="kv_cache_matches_full", passed=False,
            metrics={"cache_used": False, "steps": max_new_tokens, "dtype": str(parameter_dtype(model))},
            threshold=tol, headroom=None,
            explanation="the model returned no KV cache (neither `cache` nor `past_key_values`): "
                        "there is nothing to compare")
    rows = []
    with eval_mode(model), torch.no_grad():
        for step in range(max_new_tokens):
            end = cached.prompt_length + step
            full, _ = model_forward(model, cached.sequences[:, :end].to(model_device(model)),
                                    cached.attention_mask[:, :end].to(model_device(model)), None,
                                    use_cache=False,
                                    what=f"the logits of full recomputation at step {step} (from 0)")
            diff = (full[:, -1, :].float().cpu() - cached.logits[:, step]).abs()  # (B, V)
            row = int(diff.amax(dim=-1).argmax())
            rows.append({"step": step, "max_abs_diff": float(diff.max()), "row": row,
                         "token": int(diff[row].argmax())})
    worst = max(rows, key=lambda r: r["max_abs_diff"])
    bad = [r for r in rows if r["max_abs_diff"] > tol]
    if bad:
        first = bad[0]
        explanation = (f"step {first['step']} (from 0) of {max_new_tokens}, row {first['row']}: logits with "
                       f"the cache differ from full recomputation by {first['max_abs_diff']:.3g} "
                       f"(token id {first['token']}), above {tol:g}; the worst is step "
                       f"{worst['step']} ({worst['max_abs_diff']:.3g})" + recurrent_note(model, cached=True))
    else:
        explanation = (f"{max_new_tokens} steps: logits with the cache are within {tol:g} of full "
                       f"recomputation (largest difference {worst['max_abs_diff']:.3g}, step {worst['step']})")
    return Result(
        name="kv_cache_matches_full", passed=not bad,
        metrics={"max_abs_diff": worst["max_abs_diff"], "worst_step": worst["step"],
                 "steps": max_new_tokens, "dtype": str(parameter_dtype(model)), "cache_used": True},
        threshold=tol, headroom=headroom_below(worst["max_abs_diff"], tol),
        explanation=explanation, details=tuple(rows))


@probe("causality")
def causality(
    model: torch.nn.Module, input_ids: torch.Tensor | Sequence[Any], *, atol: float | None = None,
    seed: int = 0,
) -> Result:
    """Check that no position's output depends on a later input, two ways.

    1. For each t, the tokens after t are replaced by random ones: logits at positions 0..t
       must stay within ``atol`` (default :data:`LOGIT_ATOL` for the dtype).
    2. Karpathy's "use backprop to chart dependencies": the gradient of (a random projection
       of) the logits at t with respect to the input embeddings after t must be zero.

    Cost: T - 1 forward and T - 1 backward passes, so a short ``input_ids`` (8-32 tokens) is enough.
    """
    check_causal_lm(model)
    if atol is not None:
        check_number(atol, "atol", low=0)
    check_seed(seed)
    ids = as_ids(input_ids, "input_ids", vocab=input_vocabulary(model)).to(model_device(model))
    length = ids.shape[1]
    if length < 2:
        raise InputError(f"'input_ids' must hold at least 2 tokens to test causality (got {length})")
    vocab = input_vocabulary(model) or 0
    generator = torch.Generator().manual_seed(seed)
    with eval_mode(model):
        with torch.no_grad():
            base, _ = model_forward(model, ids, None, None, use_cache=False,
                                    what="the logits of input_ids")  # (B, T, V)
            vocab = vocab or base.shape[-1]
            change = []
            for t in range(length - 1):
                shift = torch.randint(1, vocab, ids[:, t + 1:].shape, generator=generator)
                perturbed = ids.clone()
                perturbed[:, t + 1:] = (ids[:, t + 1:] + shift.to(ids.device)) % vocab
                logits, _ = model_forward(model, perturbed, None, None, use_cache=False,
                                          what=f"the logits with the tokens after position {t} changed")
                change.append(float((logits[:, : t + 1] - base[:, : t + 1]).abs().max()))
        # per position: the future gradient's share, and the future position it is largest at
        ratios: list[tuple[float, int]] = [(0.0, t + 1) for t in range(length - 1)]
        unread = ""
        try:
            logits, embeds = _logits_from_leaf_embeddings(model, ids)  # (B, T, V), (B, T, D)
        except _NoLeaf as error:  # the logit criterion alone; the reason is said
            unread = str(error)
        if not unread:
            projection = torch.randn(logits.shape[-1], generator=generator).to(logits)
            for t in range(length - 1):
                (grad,) = torch.autograd.grad((logits[:, t] * projection).sum(), embeds, retain_graph=True)
                require_finite(grad, f"the gradients of the output at position {t} with respect to the "
                               f"input embeddings", ("row", "position", "feature"))
                past = float(grad[:, : t + 1].abs().max())
                future = grad[:, t + 1:].abs().amax(dim=(0, 2))  # (T - t - 1,)
                ratios[t] = (float(future.max()) / past if past > 0 else float(future.max()),
                             t + 1 + int(future.argmax()))
    tol = tolerance_for(LOGIT_ATOL, model) if atol is None else atol
    grad_tol = 1e-6  # masked attention weights are exactly 0, so a causal model gives exactly 0
    leaks = [t for t in range(length - 1) if change[t] > tol or ratios[t][0] > grad_tol]
    rows = tuple({"position": t, "logit_change": change[t], "future_gradient_ratio": ratios[t][0],
                  "most_influential_future_position": ratios[t][1]} for t in range(length - 1))
    worst = max(change)
    if leaks:
        t = leaks[0]
        explanation = (f"position {t} of {length} sees the future: its logits change by "
                       f"{change[t]:.3g} (tolerance {tol:g}) when the tokens after it change"
                       + ("" if unread else
                          f", and its gradient with respect to the input embedding at position "
                          f"{ratios[t][1]} is {ratios[t][0]:.3g} of the largest one at or before it"))
    else:
        explanation = (f"{length} positions: changing later tokens moves earlier logits by at most "
                       f"{worst:.3g} (tolerance {tol:g})"
                       + ("" if unread else
                          f" and their gradients with respect to later inputs are "
                          f"{max(r for r, _ in ratios):.3g} of the largest (tolerance {grad_tol:g})"))
    if unread:
        explanation += f"; the gradient criterion was not read: {unread}"
    max_ratio = max(r for r, _ in ratios)
    return Result(
        name="causality", passed=not leaks,
        metrics={"max_logit_change": worst, "max_future_gradient_ratio": max_ratio,
                 "first_leaking_position": leaks[0] if leaks else None, "positions": length,
                 "grad_tol": grad_tol, "gradient_criterion": not unread},
        # threshold: the logit criterion's; the headroom is the nearer of the two criteria
        threshold=tol, headroom=min(headroom_below(worst, tol), headroom_below(max_ratio, grad_tol)),
        explanation=explanation, details=rows)



def _logits_from_leaf_embeddings(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of ``ids`` computed from token embeddings that are a leaf requiring grad, so
    the gradient of an output with respect to each input position can be read. A forward hook on
    the token embedding swaps in the leaf: the same path for every kind of model."""
    table = token_embedding(model)
    if table is None:
        raise NotApplicableError(f"the gradient criterion needs the token embedding, and the "
                                 f"{type(model).__name__} has no get_input_embeddings() and no nn.Embedding")
    leaves: list[torch.Tensor] = []

    def swap(module: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if leaves or not (inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].shape == ids.shape):
            return None  # another call of the table (a tied output head, ...) is left alone
        leaves.append(output.detach().requires_grad_(True))
        return leaves[0].clone()  # the model may scale it in place (CTRL does): never the leaf itself

    handle = table.register_forward_hook(swap)
    try:
        logits, _ = model_forward(model, ids, None, None, use_cache=False,
                                  what="the logits from input embeddings")
    finally:
        handle.remove()
    if not leaves:
        raise _NoLeaf(f"the token embedding ({type(table).__name__}) was not called with the "
                      f"{tuple(ids.shape)} input ids themselves (the model embeds more tokens than it "
                      f"is given, as CPM-Ant, which prepends its prompt, does), so no input "
                      f"position's gradient can be told apart")
    return logits, leaves[0]


class _NoLeaf(Exception):
    """The token embedding was not called with the input ids: no gradient per input position."""


# --- helpers of greedy_matches_generate ------------------------------------------------------

def _eos_ids(config: GenerationConfig | None) -> tuple[int, ...]:
    """The eos ids a generation_config stops at (an int, a list, or None)."""
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return (int(eos),) if isinstance(eos, int) else tuple(int(i) for i in eos)


def _token(tokenizer: PreTrainedTokenizerBase, token: int) -> str:
    return f"{token} ({tokenizer.decode([token])!r})"


def _generation_overrides(config: GenerationConfig | None) -> list[str]:
    """Settings of a generation_config that differ from plain greedy decoding, as 'name=value'."""
    if config is None:
        return []
    found = []
    for key, neutral in NEUTRAL_GENERATION.items():
        value = getattr(config, key, None)
        if value is not None and value != neutral and not (key == "min_length" and value == 0):
            found.append(f"{key}={value!r}")
    return found
