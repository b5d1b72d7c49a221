"""Before the first update, the importance ratio of an RL step is 1: ``importance_ratio``.

An RL trainer samples completions with some settings (temperature, top-k, top-p) and then
computes the log-probs of the same tokens for the update. Before any update both describe the
same policy, so at every sampled token ``ratio = exp(update log-prob - sampler log-prob)`` must
be 1. Where the two sides compute different distributions, every step is silently off-policy:

- the two sides disagree on the temperature: one side's log-probs at temperature 1, the
  completions sampled at 0.6, and the first-token ratio read 2.0 (trl #4159); GRPOTrainer's
  own log-probs left the logits undivided by the temperature until trl PR #3029;
- the sampler draws from the top-p nucleus (or the top-k tokens, or what min-p keeps), and
  the update's log-prob is the full tempered distribution's: each ratio is the kept mass,
  below 1 (trl #6789);
- a sequence-level ratio whose mean read 0.569 although the per-token log-probs agreed: the
  per-token log-ratios were summed rather than averaged (trl #5814). This check compares
  tokens, the level at which the ratio must be 1 whatever the aggregation.

The probe samples with transformers' ``generate`` and takes the sampler's log-prob of each
token from its processed scores (after the temperature and the top-k and top-p warpers), then
asks the training side for its log-probs of the same sequences. Where they differ it names the
cause: it computes the model's log-probs at temperature 1, at the sampling temperature alone,
and the sampler's, and says which of them the training side matches.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmcheck._finite import non_finite_result, probe, require_finite, weights_problem
from lmcheck._model import (
    can_generate,
    eval_mode,
    has_dropout,
    in_mode,
    input_vocabulary,
    model_device,
    parameter_dtype,
)
from lmcheck._validate import (
    as_ids,
    as_mask,
    check_callable,
    check_int,
    check_max_new_tokens,
    check_model,
    check_number,
    check_seed,
    describe,
)
from lmcheck.errors import InputError, NonFiniteError, NotApplicableError
from lmcheck.results import Result, headroom_below

# trainer_importance_ratio is check_trainer's on an RL trainer, which is its public face
__all__ = ["importance_ratio"]

NAME = "importance_ratio"

# The bound on max |log ratio| over the completion tokens, by the dtype the two sides compute in.
# fp32: generate's cached decoding and a full forward of a 2-layer Llama agree to 2e-7 in the
# logits; SmolLM2-135M's differ by up to 7.4e-5 (lmcheck.comparison.LOGIT_ATOL), and a log-prob
# moves by at most twice the largest logit difference, so 1e-3 leaves a margin of 7. Half
# precision: twice the rounding step at a logit of 32 (a log-prob takes the rounding of its own
# logit and of the log-sum-exp): 0.25 in bf16's 8 significant bits, so 0.5 (a ratio from 0.61 to
# 1.65); 0.03125 in fp16's 11, so 0.0625. Not measured on a pretrained model. A small bias within
# these bounds (a top-p of 0.9: a log ratio of -0.1) is caught on average (_nearer_elsewhere).
RATIO_TOL: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 0.0625, torch.bfloat16: 0.5}

# Logits processors set to do nothing, so that the sampler applies only the settings given:
# transformers fills every setting a GenerationConfig leaves None from the model's own.
NEUTRAL = dict(repetition_penalty=1.0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
               no_repeat_ngram_size=0, min_new_tokens=0)

# why the two sides differ where the model has dropout on in training mode (the trainer's mode)
DROPOUT = ("dropout is on in training mode, so each forward draws its own masks: set every dropout to 0 "
           "(GRPOConfig(disable_dropout=True) zeroes torch.nn.Dropout modules, not an attention layer's "
           "attention_dropout)")

LOGPROBS_EXPECTED = ("a function logprobs(sequences, attention_mask, completion_length) returning the "
                     "(B, completion_length) log-probs of the last completion_length tokens")


@dataclass
class _Rollout:
    """Sampled completions and the log-probs of their tokens, C = the completion length."""

    sequences: torch.Tensor  # (B, T + C) prompt and completion ids
    attention_mask: torch.Tensor  # (B, T + C) the prompt's mask, then 1 through the first eos
    compared: torch.Tensor  # (B, C) bool: the completion tokens through the first eos
    sampler: torch.Tensor  # (B, C) the sampler's log-prob: log_softmax of the processed scores
    plain: torch.Tensor  # (B, C) the model's log-prob at temperature 1
    tempered: torch.Tensor  # (B, C) at the sampling temperature, nothing else applied

    @property
    def steps(self) -> int:
        return int(self.sampler.shape[1])


@dataclass
class _Settings:
    """What the sampler applied: the generation config's values, the model's where it left one None."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float

    @classmethod
    def read(cls, config: Any, model: torch.nn.Module) -> _Settings:
        own = getattr(model, "generation_config", None)

        def value(name: str, default: float) -> float:
            found = getattr(config, name, None)
            found = getattr(own, name, None) if found is None else found
            return default if found is None else float(found)

        return cls(value("temperature", 1.0), int(value("top_k", 0)), value("top_p", 1.0), value("min_p", 0.0),
                   value("repetition_penalty", 1.0))

    def words(self) -> str:
        parts = [f"temperature {self.temperature:g}", f"top-k {self.top_k or 'off'}", f"top-p {self.top_p:g}"]
        parts += [f"min-p {self.min_p:g}"] if self.min_p else []
        parts += [f"repetition_penalty {self.repetition_penalty:g}"] if self.repetition_penalty != 1 else []
        return ", ".join(parts)

    def truncation(self) -> list[str]:
        """The settings that leave tokens out of the sampling distribution, as words."""
        kept = [f"the top-p={self.top_p:g} nucleus"] if self.top_p < 1 else []
        kept += [f"the top-k={self.top_k} most likely tokens"] if self.top_k > 0 else []
        kept += [f"the tokens min-p={self.min_p:g} keeps"] if self.min_p > 0 else []
        return kept


@probe(NAME)
def importance_ratio(
    model: torch.nn.Module, prompt_ids: torch.Tensor, logprobs: Callable[..., torch.Tensor], *,
    attention_mask: torch.Tensor | None = None, temperature: float = 1.0, top_k: int | None = None,
    top_p: float = 1.0, max_new_tokens: int = 8, eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None, seed: int = 0, tol: float | None = None,
) -> Result:
    """Before any update, the training side's log-probs equal the sampler's at every token.

    Samples ``max_new_tokens`` from each prompt with ``generate`` (seeded, in eval mode, the
    model's mode and torch's random state put back after) under exactly the settings given (no
    repetition penalty, min-p or other processor from the model's generation config), then
    calls ``logprobs`` on the sequences, in the model's own mode, without gradients. Compares
    each completion token through the first eos; tokens after it are ignored.

    Args:
        model: a Hugging Face causal LM (it has ``generate``).
        prompt_ids: (B, T) prompt ids, left-padded.
        logprobs: the training side, ``logprobs(sequences, attention_mask, completion_length)``
            returning the (B, completion_length) log-probs of the completion tokens, the last
            ``completion_length`` of ``sequences``; the mask is 0 at left pads and after an eos.
        attention_mask: (B, T), 0 at the pads; all ones by default.
        temperature: the sampler's temperature, above 0.
        top_k: the sampler's top-k (None or 0: off).
        top_p: the sampler's nucleus, in (0, 1].
        max_new_tokens: the completion length sampled (shorter when every row ends).
        eos_token_id: the id (or ids) that end a completion; the model's generation config's by default.
        pad_token_id: the id that pads a finished row; the model's generation config's by default.
        seed: the sampling seed.
        tol: the bound on max |log ratio|; by default :data:`RATIO_TOL` for the parameters' dtype.

    Returns:
        A Result with the mean, min and max ratio, the max |log ratio| and the tokens compared;
        on failure the explanation names the worst token and what the training side matches.

    Raises:
        InputError: an argument of the wrong type or value, or ``logprobs`` returning another shape.
    """
    check_model(model)
    if not can_generate(model):
        raise NotApplicableError(f"the model has no Hugging Face generate to sample with "
                                 f"({type(model).__name__})")
    ids = as_ids(prompt_ids, "prompt_ids", vocab=input_vocabulary(model)).to(model_device(model))
    mask = torch.ones_like(ids) if attention_mask is None else as_mask(attention_mask, ids)
    function = check_callable(logprobs, "logprobs", LOGPROBS_EXPECTED)
    check_number(temperature, "temperature")
    if temperature <= 0:
        raise InputError(f"'temperature' must be a finite number > 0 (got {describe(temperature)}): at "
                         f"temperature 0 sampling is greedy, which has no log-probs to compare")
    top_k = 0 if top_k is None else check_int(top_k, "top_k", 0)
    if check_number(top_p, "top_p", low=0, high=1) == 0:
        raise InputError(f"'top_p' must be a number > 0 and <= 1 (got {describe(top_p)})")
    check_max_new_tokens(max_new_tokens)
    check_seed(seed)
    own = getattr(model, "generation_config", None)
    eos = _token_ids(getattr(own, "eos_token_id", None) if eos_token_id is None else eos_token_id, "eos_token_id")
    pad = getattr(own, "pad_token_id", None) if pad_token_id is None else pad_token_id
    pad = (eos[0] if eos else 0) if pad is None else _token_ids(pad, "pad_token_id")[0]
    tolerance = _tolerance(tol, parameter_dtype(model))

    from transformers import GenerationConfig  # heavy: imported where first needed

    config = GenerationConfig(do_sample=True, temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                              max_new_tokens=max_new_tokens, eos_token_id=eos or None, pad_token_id=pad, **NEUTRAL)
    with eval_mode(model):
        rollout = _sample(model, ids, mask, config, seed, eos)
    with torch.no_grad():
        train = function(rollout.sequences, rollout.attention_mask, rollout.steps)
    note = DROPOUT if model.training and has_dropout(model) else ""
    return _verdict(rollout, train, "'logprobs'", _Settings.read(config, model), tolerance, note)


@probe(NAME)
def trainer_importance_ratio(trainer: Any, *, tol: float | None = None) -> Result:
    """:func:`importance_ratio` on a TRL ``GRPOTrainer`` (or another trainer built as it is),
    with the trainer's own prompts, sampler and log-probs.

    The prompts are the first ``per_device_train_batch_size`` rows of its train dataset,
    tokenized by the trainer's ``_tokenize_prompts`` (a chat template with the generation
    prompt for conversational ones), left-padded as it pads them; the sampler is ``generate``
    with ``trainer.generation_config``; the training side is the trainer's
    ``_get_per_token_logps_and_entropies``. Both run in training mode, as the trainer runs
    them (``Trainer.training_step`` calls ``model.train()`` before it samples), seeded with
    ``args.seed``; the model's mode and torch's random state are put back after.

    ``tol`` bounds max |log ratio| as in :func:`importance_ratio`; by default :data:`RATIO_TOL`
    for the dtype the update computes in: bf16 under ``args.bf16`` (GRPOConfig's default), whose
    bound of 0.5 is wide token by token; a bias within it (a top-p of 0.9: a log ratio of -0.1)
    fails all the same where the update's log-probs lie on average twice as near another
    distribution of the model's as the sampler's.

    Not applicable where trl is not installed, the trainer is not GRPO-style, or it samples
    elsewhere than with transformers' ``generate`` in this process (vLLM, continuous batching,
    a ``rollout_func``, environments).
    """
    try:
        import trl  # noqa: F401  (only to say that it is missing)
    except ImportError:
        return Result.not_applicable(NAME, "trl is not installed: this check reads a TRL GRPOTrainer")
    missing = [a for a in ("_get_per_token_logps_and_entropies", "_tokenize_prompts", "generation_config", "args")
               if not hasattr(trainer, a)]
    if missing:
        return Result.not_applicable(NAME, f"{type(trainer).__name__} is not a GRPO-style TRL trainer: it has no "
                                           f"{', '.join(missing)}")
    elsewhere = [reason for flag, reason in (
        ("use_vllm", "it samples with vLLM (use_vllm=True)"),
        ("use_transformers_continuous_batching", "it samples with transformers' continuous batching"),
        ("rollout_func", "it samples with its own rollout_func"),
        ("environment_factories", "its environments shape the prompts and completions"),
    ) if getattr(trainer, flag, None) not in (None, False)]
    if elsewhere:
        return Result.not_applicable(NAME, f"{elsewhere[0]}; this check samples in-process with transformers' "
                                           f"generate, so it would not test the trainer's sampler")
    if tol is not None:
        check_number(tol, "tol", low=0)
    config = trainer.generation_config
    if config is None or not getattr(config, "do_sample", False):
        return Result.not_applicable(NAME, "the trainer's generation_config does not sample (do_sample is not True)")
    model = check_model(trainer.model, "trainer.model")
    problem = weights_problem(model)
    if problem is not None:
        return non_finite_result(NAME, problem[0], details=problem[1], non_finite_parameters=len(problem[1]))
    args = trainer.args
    prompts = _first_prompts(trainer.train_dataset, args.per_device_train_batch_size)
    prompt_rows, _, extra = trainer._tokenize_prompts(prompts)
    if extra:
        return Result.not_applicable(NAME, f"the prompts carry multimodal inputs ({', '.join(extra)}), which this "
                                           f"check does not pass to the model")
    tokenizer = getattr(trainer, "_tokenizer", None) or trainer.processing_class
    ids, mask = _left_pad([list(row) for row in prompt_rows], tokenizer.pad_token_id,
                          getattr(trainer, "pad_to_multiple_of", None), trainer.accelerator.device)
    eos = _token_ids(getattr(trainer, "eos_token_ids", None) or config.eos_token_id, "trainer.eos_token_ids")
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else parameter_dtype(model)
    with in_mode(model, True), _generation_model(trainer) as sampler:
        rollout = _sample(sampler, ids, mask, config, args.seed, eos)
    if getattr(trainer, "mask_truncated_completions", False):
        # the trainer masks completions that reach max_completion_length without an eos out of the
        # attention and the loss; so does the comparison
        last = rollout.compared.long().sum(1, keepdim=True) - 1  # (B, 1) each row's last compared token
        ends = torch.tensor(eos + [tokenizer.pad_token_id], device=ids.device)
        ended = torch.isin(rollout.sequences[:, ids.shape[1]:].gather(1, last), ends).squeeze(1)  # (B,)
        rollout.compared &= ended[:, None]
        rollout.attention_mask[:, ids.shape[1]:] *= ended[:, None].long()
        if not bool(rollout.compared.any()):
            return Result.not_applicable(NAME, "every sampled completion was cut at max_completion_length, and "
                                               "mask_truncated_completions leaves them all out of the loss")
    with in_mode(model, True), torch.no_grad(), torch.random.fork_rng(devices=_cuda(ids.device)):
        torch.manual_seed(args.seed)
        output = trainer._get_per_token_logps_and_entropies(model, rollout.sequences, rollout.attention_mask,
                                                             rollout.steps)
    train = output[0] if isinstance(output, tuple) else output
    note = DROPOUT if has_dropout(model) else ""
    return _verdict(rollout, train, f"{type(trainer).__name__}._get_per_token_logps_and_entropies",
                    _Settings.read(config, model), _tolerance(tol, dtype), note)


# ---------------------------------------------------------------- sampling


def _sample(model: Any, ids: torch.Tensor, mask: torch.Tensor, config: Any, seed: int,
            eos: list[int]) -> _Rollout:
    """Sample under ``config`` with torch seeded by ``seed`` (its random state put back after),
    and read each sampled token's log-probs from generate's own scores and logits."""
    config = copy.deepcopy(config)
    config.output_scores = config.output_logits = config.return_dict_in_generate = True
    with torch.no_grad(), torch.random.fork_rng(devices=_cuda(ids.device)):
        torch.manual_seed(seed)
        try:
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        except RuntimeError as error:  # torch.multinomial refuses NaN or Inf probabilities
            if "probability tensor contains" in str(error):
                raise NonFiniteError(f"the sampling distribution is not finite: generate raised {error}") from error
            raise
    completion = output.sequences[:, ids.shape[1]:]  # (B, C)
    temperature = _Settings.read(config, model).temperature
    columns: dict[str, list[torch.Tensor]] = {"sampler": [], "plain": [], "tempered": []}
    for step, (scores, logits) in enumerate(zip(output.scores, output.logits, strict=True)):
        token = completion[:, step : step + 1]  # (B, 1)
        raw = logits.float()  # (B, V) the model's logits before any processor
        require_finite(raw, f"the model's logits at completion position {step}", ("row", "token id"))
        columns["sampler"].append(torch.log_softmax(scores.float(), -1).gather(1, token))
        columns["plain"].append(torch.log_softmax(raw, -1).gather(1, token))
        columns["tempered"].append(torch.log_softmax(raw / temperature, -1).gather(1, token))
    is_eos = torch.isin(completion, torch.tensor(eos, device=completion.device, dtype=completion.dtype))
    # the first eos is a completion token; what comes after it is padding
    compared = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # (B, C)
    return _Rollout(sequences=output.sequences, attention_mask=torch.cat([mask, compared.long()], 1),
                    compared=compared, **{k: torch.cat(v, 1) for k, v in columns.items()})


def _cuda(device: torch.device) -> list[int]:
    """The CUDA device whose random state fork_rng must save (none on the CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def _generation_model(trainer: Any) -> Iterator[torch.nn.Module]:
    """The model the trainer samples with, unwrapped as it unwraps it (gradient checkpointing off)."""
    try:
        from trl.models.utils import unwrap_model_for_generation
    except ImportError:  # another trl: the model itself
        yield trainer.model
        return
    args = trainer.args
    with unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator,
            gather_deepspeed3_params=getattr(args, "ds3_gather_for_generation", True),
            generation_kwargs=getattr(trainer, "generation_kwargs", None),
            gradient_checkpointing_kwargs=getattr(args, "gradient_checkpointing_kwargs", None)) as model:
        yield model


# ---------------------------------------------------------------- the verdict


def _verdict(rollout: _Rollout, train: object, source: str, settings: _Settings, tol: float, note: str) -> Result:
    """Compare the update's log-probs with the sampler's and, where they differ, name the cause."""
    rows, steps = rollout.sampler.shape
    if not isinstance(train, torch.Tensor) or tuple(train.shape) != (rows, steps) or not train.is_floating_point():
        raise InputError(f"{source} must return a ({rows}, {steps}) float tensor: the log-probs of the {steps} "
                         f"completion tokens of {rows} rows (got {describe(train)})")
    valid = rollout.compared
    require_finite(train, f"the update's log-probs ({source})", ("row", "completion position"), valid=valid)
    require_finite(rollout.sampler, "the sampler's log-probs", ("row", "completion position"), valid=valid)
    train = train.detach().to(rollout.sampler.device, torch.float64)
    sampler = rollout.sampler.double()
    log_ratio = (train - sampler).masked_fill(~valid, 0.0)  # (B, C)
    worst = int(log_ratio.abs().flatten().argmax())
    row, position = divmod(worst, steps)
    values = log_ratio[valid]
    largest = float(values.abs().max())
    metrics = {"mean_ratio": float(values.exp().mean()), "min_ratio": float(values.exp().min()),
               "max_ratio": float(values.exp().max()), "max_abs_log_ratio": largest,
               "mean_log_ratio": float(values.mean()), "tokens": int(valid.sum()), "rows": rows,
               "worst_row": row, "worst_position": position, "settings": settings.words()}
    details = tuple({"row": r, "tokens": int(valid[r].sum()),
                     "max_abs_log_ratio": float(log_ratio[r].abs().max()),
                     "mean_ratio": float(log_ratio[r][valid[r]].exp().mean())} for r in range(rows)
                    if bool(valid[r].any()))
    passed = largest <= tol
    nearer = _nearer_elsewhere(train, sampler, rollout, settings) if passed and tol > RATIO_TOL[torch.float32] else ""
    if nearer:  # within a half-precision bound, but biased: the update computes another distribution
        passed = False
        explanation = (f"the importance ratio is biased before any update: max |log ratio| {largest:.3g} is within "
                       f"the {tol:g} of half precision, but the update's log-probs lie {nearer}; "
                       + _cause(train, rollout, settings, tol, note))
    elif passed:
        explanation = (f"the update's log-probs equal the sampler's on all {metrics['tokens']} completion "
                       f"tokens of {rows} rows ({settings.words()}): max |log ratio| {largest:.2e}, within "
                       f"{tol:g}; mean ratio {metrics['mean_ratio']:.6f}")
    else:
        token = int(rollout.sequences[row, rollout.sequences.shape[1] - steps + position])
        explanation = (f"the importance ratio is not 1 before any update: mean {metrics['mean_ratio']:.4f}, from "
                       f"{metrics['min_ratio']:.4f} to {metrics['max_ratio']:.4f} over {metrics['tokens']} completion "
                       f"tokens; max |log ratio| {largest:.3g}, above {tol:g}, at row {row}, completion position "
                       f"{position} (token id {token}: the sampler's log-prob {float(sampler[row, position]):.4f}, "
                       f"the update's {float(train[row, position]):.4f}); "
                       + _cause(train, rollout, settings, tol, note))
    return Result(name=NAME, passed=passed, metrics=metrics, threshold=tol, headroom=headroom_below(largest, tol),
                  explanation=explanation, details=details)


def _nearer_elsewhere(train: torch.Tensor, sampler: torch.Tensor, rollout: _Rollout, settings: _Settings) -> str:
    """Where half precision's rounding hides a bias token by token: the update's log-probs on
    average at least twice as near the model's at temperature 1, or its full tempered
    distribution's, as the sampler's (rounding scatters them around the sampler's; a wrong
    distribution moves every token the same way). Empty where the sampler's are the nearest."""
    valid = rollout.compared

    def mean_distance(candidate: torch.Tensor) -> float:
        return float((train - candidate.double())[valid].abs().mean())

    own = mean_distance(sampler)
    others = []
    if settings.temperature != 1:
        others.append((mean_distance(rollout.plain), "the model's at temperature 1"))
    if settings.truncation() or settings.repetition_penalty != 1:
        others.append((mean_distance(rollout.tempered), "the full tempered distribution's"))
    distance, which = min(others, default=(math.inf, ""))
    if 2 * distance < own:
        return f"{distance:.3g} nats on average from {which} and {own:.3g} from the sampler's"
    return ""


def _cause(train: torch.Tensor, rollout: _Rollout, settings: _Settings, tol: float, dropout: str) -> str:
    """Which of the model's own log-probs the training side computed, and what to change;
    ``dropout`` says why where it matches none and the model has dropout on."""
    valid = rollout.compared

    def distance(candidate: torch.Tensor) -> float:
        return float((train - candidate.double())[valid].abs().max())

    plain, tempered = distance(rollout.plain), distance(rollout.tempered)
    temperature = settings.temperature
    kept = settings.truncation()
    penalty = settings.repetition_penalty != 1
    # the nearest of the two within the bound: under a half-precision bound both may lie within it
    if temperature != 1 and plain <= tol and plain < tempered:
        also = f"; they leave out the sampler's truncation to {' and '.join(kept)} too" if kept else ""
        return (f"the update's log-probs are the model's at temperature 1.0, the sampler's at "
                f"{temperature:g}: divide the logits by the sampling temperature before log_softmax "
                f"(trl #4159, trl PR #3029){also}")
    if tempered <= tol:
        full = f"the update's log-probs are the full tempered distribution's (temperature {temperature:g})"
        if kept:
            return (f"{full}, but the sampler drew from {' and '.join(kept)}: the ratio is the kept probability "
                    f"mass, below 1 (trl #6789); renormalize the update's log-probs over the same kept tokens, or "
                    f"sample without the truncation" + (f" (and the repetition_penalty of "
                                                        f"{settings.repetition_penalty:g})" if penalty else ""))
        if penalty:
            return (f"{full}, but the sampler penalised the tokens already in the sequence (repetition_penalty="
                    f"{settings.repetition_penalty:g}): apply the same penalty before log_softmax, or sample "
                    f"without it")
        return (f"{full}, but the sampler's scores were processed further (a logits processor of the generation "
                f"config: suppressed or biased tokens, a minimum length, an n-gram block)")
    away = (f"{plain:.3g} from its log-probs at temperature 1" if temperature == 1 else
            f"{plain:.3g} from its log-probs at temperature 1, {tempered:.3g} from those at {temperature:g}")
    why = dropout or ("its forward differs from the sampler's (other weights, dtype or attention kernel, position "
                      "ids that count the left pads) or it reads the log-probs at other positions (off by one)")
    return f"the update's log-probs match none of the model's own: they are {away}; {why}"


# ---------------------------------------------------------------- inputs


def _token_ids(value: object, argument: str) -> list[int]:
    """A token id or a list of them as a list (empty for None); else InputError."""
    if value is None:
        return []
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(value, (str, bytes, torch.Tensor)) or not isinstance(items, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise InputError(f"'{argument}' must be a token id, an int >= 0, or a list of them (got {describe(value)})")
    return list(items)


def _tolerance(tol: float | None, dtype: torch.dtype) -> float:
    if tol is None:
        return RATIO_TOL.get(dtype, RATIO_TOL[torch.float32])
    return check_number(tol, "tol", low=0)


def _first_prompts(dataset: Any, count: int) -> list[Any]:
    """The ``prompt`` of the dataset's first ``count`` rows, in order."""
    if dataset is None:
        raise InputError("the trainer must have a train_dataset with a 'prompt' column (got None)")
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        rows = [dataset[i] for i in range(min(count, len(dataset)))]
    else:
        rows = list(itertools.islice(iter(dataset), count))
    if not rows or not all(isinstance(row, dict) and "prompt" in row for row in rows):
        first = rows[0] if rows else None
        raise InputError(f"the trainer's train_dataset must hold rows with a 'prompt', as GRPOTrainer reads them "
                         f"(got {describe(first)} as its first row)")
    return [row["prompt"] for row in rows]


def _left_pad(rows: list[list[int]], pad: int, multiple: int | None,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids padded on the left, to a multiple of ``multiple`` where given, as the trainer pads them."""
    width = max(map(len, rows))
    if multiple:
        width = math.ceil(width / multiple) * multiple
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)  # (B, T)
    return ids, mask
