"""Fuzzed public API: any argument a user can get wrong gives a clear error or a valid Result.

For every public entry point (collected from ``lmcheck.__all__`` and every public namespace's, so a new one cannot be added
without a row here), hypothesis replaces one argument of a valid call with something else:
``None``, wrong types, NaN and Inf, empty and huge ids, ids out of the vocabulary, tensors of
random shapes and dtypes, masks of the wrong shape, tensors on the ``meta`` device (a device other
than the model's). The call must return what it promises (a :class:`Result` for a probe) or
raise :class:`InputError` / :class:`ModelError` whose message names the argument; any other
exception is a bug. The examples hypothesis found (each was a bare TypeError, IndexError,
RuntimeError or AttributeError, or an error naming another argument) are kept in REGRESSIONS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from public import public_names

import lmcheck
import lmcheck.adapters
import lmcheck.cloze
import lmcheck.comparison
import lmcheck.corpus
import lmcheck.decoding
import lmcheck.golden
import lmcheck.loops
import lmcheck.lora
import lmcheck.models
import lmcheck.precision
import lmcheck.report
import lmcheck.results
import lmcheck.rl
import lmcheck.supervision
import lmcheck.tokens
import lmcheck.training
from lmcheck.curves import LossCurve
from lmcheck.errors import InputError, ModelError
from lmcheck.models import bert_from_scratch, gpt2_from_scratch
from lmcheck.results import Result

VOCAB = 50257
PROMPTS = ["Hello there", "The capital of France is"]

pytestmark = pytest.mark.timeout(300)  # a hang fails the test instead of stalling the suite


def _labelled(w: Any) -> dict[str, torch.Tensor]:
    return {"input_ids": w.ids(), "labels": w.ids().clone()}


def _lost_updates_call(w: Any) -> dict[str, Any]:
    """One SGD step of the world's model on its ids, watched (fp32, so forced; put back after)."""
    model = w.causal
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        model(**_labelled(w)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return dict(model=model, optimizer=optimizer, step=step, steps=1, force=True)


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    """A LoRA over a copy of the world's GPT-2 (its fused attention and MLP projections)."""
    import copy

    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))


def _update_logprobs(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """An RL update's log-probs of the completion tokens at temperature 1 (the sampler's default)."""
    def logprobs(sequences: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
        logits = model(input_ids=sequences, attention_mask=mask).logits[:, -length - 1:-1]
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, sequences[:, -length:, None]).squeeze(-1)
    return logprobs


# --- what a user can pass by mistake --------------------------------------------------------

@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Tensors of 0-3 dimensions (sizes 0-4), any common dtype, ids in or far out of range,
    on the CPU or the meta device."""
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool,
                                  torch.float32, torch.float16, torch.bfloat16]))
    low, high = draw(st.sampled_from([(0, 10), (-5, 0), (VOCAB, VOCAB + 10), (2**40, 2**40 + 3)]))
    if draw(st.booleans()):
        return torch.empty(shape, dtype=dtype, device="meta")
    if dtype == torch.bool:
        return torch.randint(0, 2, shape).bool()
    if dtype.is_floating_point:
        values = torch.full(shape, draw(st.sampled_from([0.5, math.nan, math.inf, 1e30])))
        return values.to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(low, info.min), max(min(high, info.max), max(low, info.min) + 1), shape).to(dtype)


def garbage() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.binary(max_size=3),
        st.lists(st.integers(-3, 3), max_size=3), st.lists(st.lists(st.integers(-3, VOCAB + 3), max_size=3), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), tensors(),
    )


def not_str() -> st.SearchStrategy[Any]:
    """Garbage for a name or a path: never a str, which could name a real folder or the Hub."""
    return garbage().filter(lambda v: not isinstance(v, str))


# --- the models and data a valid call uses ---------------------------------------------------

@dataclass(repr=False)
class World:
    causal: torch.nn.Module
    masked: torch.nn.Module
    gpt2: Any
    bert: Any
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return "World(tiny GPT-2, tiny BERT, their tokenizers)"

    def ids(self, length: int = 6) -> torch.Tensor:
        return self.gpt2(PROMPTS[1], return_tensors="pt").input_ids[:, :length]  # (1, T)

    def curve(self) -> LossCurve:
        curve = LossCurve()
        for step in range(1, 11):
            curve.record_train(step, 11.0 - step)
        curve.record_valid(10, 10.5)
        return curve


@pytest.fixture(scope="module")
def world(tmp_path_factory, gpt2_tokenizer_with_pad, bert_tokenizer) -> World:
    gpt2, bert = gpt2_tokenizer_with_pad, bert_tokenizer
    causal = gpt2_from_scratch(gpt2, preset=dict(n_layer=1, n_head=2, n_embd=16, n_positions=64)).eval()
    masked = bert_from_scratch(bert, preset=dict(num_hidden_layers=1, num_attention_heads=2, hidden_size=16,
                                                 intermediate_size=32, max_position_embeddings=64)).eval()
    folder = tmp_path_factory.mktemp("fuzz")
    golden = folder / "golden.json"
    world = World(causal, masked, gpt2, bert, {"folder": folder, "golden": golden})
    lmcheck.golden.record_golden([world.curve()], golden, steps=10, key="fuzz")
    (folder / "dump.xml").write_text("<mediawiki></mediawiki>")
    return world


def _documents() -> list[str]:
    return ["Paris is the capital and largest city of France, with two million residents. "
            "The city is a centre of finance, diplomacy, commerce, fashion and science."] * 3


@dataclass(frozen=True)
class Entry:
    """A valid call (``call(world)`` gives its keyword arguments) and the arguments to fuzz."""

    function: Callable[..., Any]
    call: Callable[[World], dict[str, Any]]
    fuzzed: dict[str, Callable[[], st.SearchStrategy[Any]]]
    returns: type | tuple[type, ...] = Result
    also_raises: tuple[type[Exception], ...] = ()  # documented outcomes besides a misuse error


def ids_like() -> st.SearchStrategy[Any]:
    return st.one_of(tensors(), garbage())


ENTRIES: dict[str, Entry] = {
    # probes of a causal LM
    "greedy_matches_generate": Entry(lmcheck.greedy_matches_generate, lambda w: dict(
        model=w.causal, tokenizer=w.gpt2, prompts=PROMPTS, max_new_tokens=2),
        {"model": garbage, "tokenizer": garbage, "prompts": garbage, "max_new_tokens": garbage,
         "tie_atol": garbage}),
    "kv_cache_matches_full": Entry(lmcheck.kv_cache_matches_full, lambda w: dict(
        model=w.causal, input_ids=w.ids(), max_new_tokens=2),
        {"model": garbage, "input_ids": ids_like, "max_new_tokens": garbage, "attention_mask": ids_like,
         "atol": garbage}),
    "padding_invariance": Entry(lmcheck.padding_invariance, lambda w: dict(
        model=w.causal, tokenizer=w.gpt2, prompts=PROMPTS, max_new_tokens=2),
        {"model": garbage, "tokenizer": garbage, "prompts": garbage, "pad_tokens": garbage,
         "max_new_tokens": garbage, "atol": garbage}),
    "batch_invariance": Entry(lmcheck.batch_invariance, lambda w: dict(
        model=w.causal, tokenizer=w.gpt2, prompts=PROMPTS, max_new_tokens=2),
        {"model": garbage, "tokenizer": garbage, "prompts": garbage, "max_new_tokens": garbage,
         "atol": garbage}),
    "causality": Entry(lmcheck.causality, lambda w: dict(model=w.causal, input_ids=w.ids(4)),
                       {"model": garbage, "input_ids": ids_like, "atol": garbage, "seed": garbage}),
    "greedy_decode": Entry(lmcheck.decoding.greedy_decode, lambda w: dict(
        model=w.causal, input_ids=w.ids(), max_new_tokens=2),
        {"model": garbage, "input_ids": ids_like, "max_new_tokens": garbage, "attention_mask": ids_like,
         "use_cache": garbage}, returns=lmcheck.decoding.GreedyOutput),
    "next_token_logits": Entry(lmcheck.decoding.next_token_logits, lambda w: dict(
        model=w.causal, inputs={"input_ids": w.ids()}),
        {"model": garbage, "inputs": garbage}, returns=torch.Tensor),
    # probes of a training setup
    "loss_at_init": Entry(lmcheck.loss_at_init, lambda w: dict(model=w.causal, input_ids=w.ids()),
                          {"model": garbage, "input_ids": ids_like, "tolerance": garbage, "batch_size": garbage}),
    "gradient_flow": Entry(lmcheck.gradient_flow, lambda w: dict(model=w.causal, batch=w.ids()),
                           {"model": garbage, "batch": ids_like, "expect_frozen": garbage}),
    "params_update": Entry(lmcheck.params_update, lambda w: dict(model=w.causal, batch=w.ids()),
                           {"model": garbage, "batch": ids_like, "lr": garbage, "expect_frozen": garbage,
                            "optimizer": garbage}),
    "loss_matches_reference": Entry(lmcheck.loss_matches_reference, lambda w: dict(model=w.causal, batch=w.ids()),
                                    {"model": garbage, "batch": ids_like, "rtol": garbage, "atol": garbage}),
    "adapt": Entry(lmcheck.adapt, lambda w: dict(module=w.causal, logits=lambda ids: w.causal(ids).logits),
                   {"module": garbage, "logits": garbage, "loss": garbage, "context_length": garbage},
                   returns=lmcheck.adapters.AdaptedLM),
    "memorizes": Entry(lmcheck.memorizes, lambda w: dict(
        model=w.causal, tokenizer=None, chunks=w.ids(), prefix_length=2, continuation_length=2),
        {"model": garbage, "tokenizer": garbage, "chunks": ids_like, "prefix_length": garbage,
         "continuation_length": garbage, "min_verbatim_rate": garbage, "batch_size": garbage}),
    "causal_batch": Entry(lmcheck.causal_batch, lambda w: dict(
        batch={"input_ids": w.ids(), "labels": w.ids(), "attention_mask": torch.ones_like(w.ids())}),
        {"batch": garbage, "ignore_index": garbage, "max_ignored_fraction": garbage}),
    "batch_supervision": Entry(lmcheck.batch_supervision, lambda w: dict(
        batch={"input_ids": w.ids(), "labels": w.ids().clone(), "attention_mask": torch.ones_like(w.ids())},
        tokenizer=w.gpt2), {"batch": garbage, "tokenizer": garbage, "min_supervised_fraction": garbage,
                            "expect_eos": garbage, "end_ids": garbage, "bos_id": garbage,
                            "completion_only": garbage, "assistant_only": garbage}),
    "end_of_turn_ids": Entry(lmcheck.supervision.end_of_turn_ids, lambda w: dict(tokenizer=w.gpt2),
                             {"tokenizer": garbage}, returns=set),
    "template_end_of_turn": Entry(lmcheck.supervision.template_end_of_turn, lambda w: dict(tokenizer=w.gpt2),
                                  {"tokenizer": garbage}, returns=set),
    "packing_equivalence": Entry(lmcheck.packing_equivalence, lambda w: dict(
        model=w.causal, packed_batch={"input_ids": w.ids(), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]])[:, :w.ids().shape[1]]}),
        {"model": garbage, "packed_batch": garbage, "documents": garbage, "eos_id": garbage, "max_rows": garbage,
         "max_documents": garbage, "gradients": garbage}),
    "template_turn_headers": Entry(lmcheck.supervision.template_turn_headers, lambda w: dict(tokenizer=w.gpt2),
                                   {"tokenizer": garbage}, returns=dict),
    "importance_ratio": Entry(lmcheck.rl.importance_ratio, lambda w: dict(
        model=w.causal, prompt_ids=w.ids(), logprobs=_update_logprobs(w.causal), max_new_tokens=2),
        {"model": garbage, "prompt_ids": garbage, "logprobs": garbage, "attention_mask": garbage,
         "temperature": garbage, "top_k": garbage, "top_p": garbage, "max_new_tokens": garbage,
         "eos_token_id": garbage, "pad_token_id": garbage, "seed": garbage, "tol": garbage}),
    "lora_adapters": Entry(lmcheck.lora.lora_adapters, lambda w: dict(model=_lora(w.causal), batch=dict(
        input_ids=w.ids(), labels=w.ids().clone())),
        {"model": garbage, "batch": garbage, "min_coverage": garbage, "steps": garbage, "lr": garbage}),
    "is_peft_model": Entry(lmcheck.lora.is_peft_model, lambda w: dict(model=w.causal), {"model": garbage}, returns=bool),
    "loss_precision": Entry(lmcheck.precision.loss_precision, lambda w: dict(model=w.causal, batch=_labelled(w)),
                            {"model": garbage, "batch": garbage, "loss": garbage}),
    "autocast_ops": Entry(lmcheck.precision.autocast_ops, lambda w: dict(model=w.causal, batch=_labelled(w)),
                          {"model": garbage, "batch": garbage, "dtype": garbage, "loss": garbage}),
    "fp16_headroom": Entry(lmcheck.precision.fp16_headroom, lambda w: dict(model=w.causal, batch=_labelled(w)),
                           {"model": garbage, "batch": garbage, "fraction": garbage}),
    "rope_precision": Entry(lmcheck.precision.rope_precision, lambda w: dict(model=w.causal),
                            {"model": garbage, "context_length": garbage, "autocast": garbage}),
    "lost_updates": Entry(lmcheck.precision.lost_updates, _lost_updates_call,
                          {"model": garbage, "optimizer": garbage, "step": garbage, "steps": garbage,
                           "max_lost_fraction": garbage, "force": garbage}),
    "document_starts": Entry(lmcheck.packing.document_starts, lambda w: dict(positions=torch.tensor([0, 1, 0, 1])),
                             {"positions": garbage}, returns=list),
    # masked LMs
    "fill_mask": Entry(lmcheck.fill_mask, lambda w: dict(
        model=w.masked, tokenizer=w.bert, text_or_texts="paris is the [MASK] of france."),
        {"model": garbage, "tokenizer": garbage, "text_or_texts": garbage, "top_k": garbage,
         "batch_size": garbage}, returns=tuple),
    "mask_fill_accuracy": Entry(lmcheck.mask_fill_accuracy, lambda w: dict(
        model=w.masked, tokenizer=w.bert, cases=[("paris is the [MASK] of france.", "capital")],
        threshold=0.0),
        {"model": garbage, "tokenizer": garbage, "cases": garbage, "top_k": garbage, "threshold": garbage,
         "expect": garbage, "batch_size": garbage}),
    "masked_loss_at_init": Entry(lmcheck.masked_loss_at_init, lambda w: dict(
        model=w.masked, tokenizer=w.bert, examples=["paris is the capital of france."]),
        {"model": garbage, "tokenizer": garbage, "examples": garbage, "tolerance": garbage,
         "mlm_probability": garbage, "seed": garbage, "batch_size": garbage}),
    "bidirectionality": Entry(lmcheck.bidirectionality, lambda w: dict(model=w.masked, tokenizer=w.bert),
                              {"model": garbage, "tokenizer": garbage, "text": garbage, "trials": garbage,
                               "atol": garbage, "seed": garbage}),
    "encoder_padding_invariance": Entry(lmcheck.encoder_padding_invariance, lambda w: dict(
        model=w.masked, tokenizer=w.bert, texts=["paris is the capital of france.", "a city."]),
        {"model": garbage, "tokenizer": garbage, "texts": garbage, "atol": garbage}),
    "cloze_cases": Entry(lmcheck.cloze.cloze_cases, lambda w: dict(tokenizer=w.bert, documents=_documents(), n=2),
                         {"tokenizer": garbage, "documents": garbage, "n": garbage, "seed": garbage,
                          "context": garbage}, returns=(list, tuple)),
    # loss curves and golden values
    "loss_decreases": Entry(lmcheck.loss_decreases, lambda w: dict(curve=w.curve()),
                            {"curve": garbage, "steps": garbage, "min_relative_drop": garbage, "window": garbage}),
    "overfits": Entry(lmcheck.overfits, lambda w: dict(curve=w.curve()),
                      {"curve": garbage, "max_loss": garbage, "within_steps": garbage}),
    "generalization_gap": Entry(lmcheck.generalization_gap, lambda w: dict(curve=w.curve()),
                                {"curve": garbage, "min_gap": garbage, "window": garbage}),
    "finite_loss": Entry(lmcheck.finite_loss, lambda w: dict(curve=w.curve()), {"curve": garbage}),
    "reproducible": Entry(lmcheck.reproducible, lambda w: dict(first=w.curve(), second=w.curve()),
                          {"first": garbage, "second": garbage, "steps": garbage, "atol": garbage}),
    "matches_golden": Entry(lmcheck.golden.matches_golden, lambda w: dict(
        curve=w.curve(), path=w.extra["golden"], key="fuzz"),
        {"curve": garbage, "path": not_str, "key": not_str, "rtol": garbage, "atol": garbage},
        also_raises=(lmcheck.GoldenMissingError,)),  # key=None: this device, which has no entry
    "record_golden": Entry(lmcheck.golden.record_golden, lambda w: dict(
        curves=[w.curve()], path=w.extra["folder"] / "recorded.json", steps=3, key="fuzz"),
        {"curves": garbage, "path": not_str, "steps": garbage, "key": not_str}, returns=dict),
    "plot_loss_curve": Entry(lmcheck.report.plot_loss_curve, lambda w: dict(
        curve=w.curve(), path=w.extra["folder"] / "curve.png"),
        {"curve": garbage, "path": not_str, "title": not_str}, returns=object),
    # tokenizers and documents
    "round_trip": Entry(lmcheck.round_trip, lambda w: dict(tokenizer=w.gpt2, texts=["Hello"]),
                        {"tokenizer": garbage, "texts": garbage}),
    "inspect_tokens": Entry(lmcheck.inspect_tokens, lambda w: dict(tokenizer=w.gpt2, text="Hello there"),
                            {"tokenizer": garbage, "text": garbage}, returns=lmcheck.tokens.TokenTable),
    "load_tokenizer": Entry(lmcheck.load_tokenizer, lambda w: dict(name_or_path="gpt2"),
                            {"name_or_path": not_str}, returns=object),
    "load_documents": Entry(lmcheck.load_documents, lambda w: dict(source=w.extra["folder"]),
                            {"source": not_str}, returns=object),
    "chunk_documents": Entry(lmcheck.chunk_documents, lambda w: dict(
        tokenizer=w.gpt2, documents=_documents(), context_length=8),
        {"tokenizer": garbage, "documents": garbage, "context_length": garbage}, returns=object),
    "split_documents": Entry(lmcheck.corpus.split_documents, lambda w: dict(
        documents=__import__("datasets").Dataset.from_dict({"text": _documents() * 2}), n_train=2, n_valid=2),
        {"documents": garbage, "n_train": garbage, "n_valid": garbage, "seed": garbage}, returns=object),
    # builders and loaders
    "gpt2_from_scratch": Entry(lmcheck.models.gpt2_from_scratch, lambda w: dict(
        tokenizer=w.gpt2, preset=dict(n_layer=1, n_head=1, n_embd=8, n_positions=16)),
        {"tokenizer": garbage, "preset": garbage, "seed": garbage, "context_length": garbage},
        returns=torch.nn.Module),
    "bert_from_scratch": Entry(lmcheck.models.bert_from_scratch, lambda w: dict(
        tokenizer=w.bert, preset=dict(num_hidden_layers=1, num_attention_heads=1, hidden_size=8,
                                      intermediate_size=8)),
        {"tokenizer": garbage, "preset": garbage, "seed": garbage}, returns=torch.nn.Module),
    "load_causal_lm": Entry(lmcheck.load_causal_lm, lambda w: dict(name_or_path=w.extra["folder"] / "none"),
                            {"name_or_path": not_str}, returns=object),
    "load_language_model": Entry(lmcheck.load_language_model, lambda w: dict(
        name_or_path=w.extra["folder"] / "none"), {"name_or_path": not_str}, returns=object),
    "causal_lm_collator": Entry(lmcheck.loops.causal_lm_collator, lambda w: dict(tokenizer=w.gpt2),
                                {"tokenizer": garbage}, returns=object),
    "device_key": Entry(lmcheck.golden.device_key, lambda w: dict(device="cpu"), {"device": not_str}, returns=str),
    "gpt2_config": Entry(lmcheck.models.gpt2_config, lambda w: dict(tokenizer=w.gpt2, preset="gpt2-tiny-cpu"),
                         {"tokenizer": garbage, "preset": garbage, "context_length": garbage}, returns=object),
    "bert_config": Entry(lmcheck.models.bert_config, lambda w: dict(tokenizer=w.bert, preset="bert-tiny-cpu"),
                         {"tokenizer": garbage, "preset": garbage}, returns=object),
    "check_model_fits": Entry(lmcheck.loops.check_model_fits, lambda w: dict(
        model=w.causal, tokenizer=w.gpt2, context_length=8),
        {"model": garbage, "tokenizer": garbage, "context_length": garbage}, returns=type(None)),
    "verbatim_rows": Entry(lmcheck.training.verbatim_rows, lambda w: dict(
        model=w.causal, input_ids=w.ids(), prefix_length=2, continuation_length=2),
        {"model": garbage, "input_ids": ids_like, "prefix_length": garbage, "continuation_length": garbage,
         "batch_size": garbage}, returns=torch.Tensor),
    "memorized_fraction": Entry(lmcheck.training.memorized_fraction, lambda w: dict(
        model=w.causal, input_ids=w.ids(), prefix_length=2, continuation_length=2),
        {"model": garbage, "input_ids": ids_like, "prefix_length": garbage, "continuation_length": garbage,
         "batch_size": garbage}, returns=float),
    "check_memorization_lengths": Entry(lmcheck.training.check_memorization_lengths, lambda w: dict(
        prefix_length=2, continuation_length=2, chunk_length=8),
        {"prefix_length": garbage, "continuation_length": garbage, "chunk_length": garbage},
        returns=type(None)),
    "tolerance_for": Entry(lmcheck.comparison.tolerance_for, lambda w: dict(table=lmcheck.comparison.LOGIT_ATOL, model=w.causal),
                           {"table": garbage, "model": garbage}, returns=float),
    "headroom_above": Entry(lmcheck.results.headroom_above, lambda w: dict(value=0.5, threshold=0.25),
                            {"value": garbage, "threshold": garbage}, returns=float),
    "headroom_below": Entry(lmcheck.results.headroom_below, lambda w: dict(value=0.5, threshold=0.25),
                            {"value": garbage, "threshold": garbage}, returns=float),
    "write_results_json": Entry(lmcheck.report.write_results_json, lambda w: dict(
        results=[lmcheck.Result(name="a", passed=True)], path=w.extra["folder"] / "results.json"),
        {"results": garbage, "path": not_str}, returns=object),
    "parse_wiki_dump": Entry(lmcheck.corpus.parse_wiki_dump, lambda w: dict(path=w.extra["folder"] / "dump.xml"),
                             {"path": not_str}, returns=object),
}

# public callables that are not fuzzed here, with the reason
NOT_FUZZED = {
    "load_smollm2": "takes no arguments",
    "smollm2_folder": "takes no arguments",
    "default_recipe_curve": "runs chapter 4's recipe (a training run); its steps reach pretrain_default",
    "pretrain": "a training loop; its arguments are checked in tests/test_training.py",
    "pretrain_default": "a training loop; its arguments are checked in tests/test_training.py",
    "pretraining_data": "builds the pretraining split from the wiki sample (seconds per call)",
    "recipe_data": "pretraining_data for a recipe (seconds per call); its config is checked in tests/test_training.py",
    "train_masked_lm": "a training loop; its arguments are checked in tests/test_masked.py",
    "memorize_chunks": "a training loop; its arguments are checked in tests/test_masked.py",
    "check_loop": "runs the user's training loop; its arguments are checked in tests/test_setup_checks.py",
    "check_trainer": "runs the user's Trainer; its arguments are checked in tests/test_setup_checks.py",
    "check_lightning": "runs the user's Lightning fit; its arguments are checked in tests/test_lightning.py",
    "watch": "makes the guard of a run; its arguments are checked in tests/test_watch.py",
    **{name: "a ready battery or the loader of a named model or setup (lmcheck.batteries); its arguments are "
             "checked in tests/test_suite.py"
       for name in ("iter_checks", "load_model_for_checks", "load_setup", "model_family", "run_causal_checks",
                    "run_check", "run_checks", "run_setup_checks")},
    **{name: "collective: needs a process group; run under torchrun in tests/test_distributed.py"
       for name in ("same_init", "data_sharding", "grads_synchronized", "ddp_matches_single", "rank_randomness")},
}


def public_functions() -> set[str]:
    return {name for name, value in public_names().items() if callable(value) and not isinstance(value, type)}


def test_every_public_function_is_fuzzed():
    assert public_functions() - set(NOT_FUZZED) == set(ENTRIES)


def _check_call(entry: Entry, world: World, argument: str, value: Any) -> None:
    kwargs = entry.call(world)
    kwargs[argument] = value
    error: Exception | None = None
    try:
        output = entry.function(**kwargs)
    except entry.also_raises:
        return
    except (InputError, ModelError) as raised:
        error = raised
    if error is not None:
        message = str(error)
        assert argument in message, f"{type(error).__name__} for {argument}={value!r} does not name it: {message}"
        return
    assert isinstance(output, entry.returns), f"{argument}={value!r} returned {type(output).__name__}"
    if isinstance(output, Result):
        assert isinstance(output.passed, bool)
        assert output.headroom is None or not math.isnan(output.headroom)


@pytest.mark.parametrize("name", sorted(ENTRIES))
@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_argument_gives_a_result_or_a_named_error(name, world, data):
    entry = ENTRIES[name]
    argument = data.draw(st.sampled_from(sorted(entry.fuzzed)), label="argument")
    value = data.draw(entry.fuzzed[argument](), label="value")
    _check_call(entry, world, argument, value)


def _meta(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


# (entry, argument, value): what hypothesis found before the validators existed
REGRESSIONS: list[tuple[str, str, Any]] = [
    ("batch_invariance", "tokenizer", "NaN"),  # 'str' object is not callable
    ("batch_supervision", "end_ids", torch.tensor(3)),  # iteration over a 0-d tensor
    ("greedy_matches_generate", "tokenizer", torch.tensor(9)),
    ("padding_invariance", "tokenizer", {"F": 919}),
    ("padding_invariance", "pad_tokens", 144),  # blamed the prompt, not pad_tokens
    ("causality", "input_ids", [-1, 1]),  # IndexError inside the embedding
    ("causality", "seed", True),
    ("greedy_decode", "input_ids", [-2, 0, -1]),
    ("greedy_decode", "attention_mask", {}),
    ("greedy_decode", "attention_mask", [[37331], [], []]),
    ("greedy_decode", "use_cache", torch.zeros(2, 0, 3, dtype=torch.int8)),
    ("kv_cache_matches_full", "input_ids", [2, -1]),
    ("kv_cache_matches_full", "attention_mask", b""),
    ("kv_cache_matches_full", "input_ids", _meta(1, 3)),  # a tensor with no data
    ("loss_at_init", "model", None),
    ("loss_at_init", "input_ids", torch.tensor(7)),
    ("gradient_flow", "batch", torch.zeros(0, 2, dtype=torch.bfloat16)),
    ("gradient_flow", "batch", _meta(dtype=torch.uint8)),
    ("gradient_flow", "expect_frozen", 181),
    ("params_update", "lr", 3.772108095075197e50),  # overflowed float32 inside AdamW
    ("params_update", "optimizer", True),
    ("params_update", "batch", torch.tensor(5)),
    ("memorizes", "model", b"\xf4"),
    ("memorizes", "tokenizer", [[], [4324]]),
    ("memorizes", "chunks", b"1\xa6d"),
    ("memorizes", "prefix_length", 1071061403118),  # blamed 'chunks'
    ("causal_batch", "max_ignored_fraction", [[50260, 91], [41871]]),
    ("causal_batch", "ignore_index", _meta(2)),
    ("masked_loss_at_init", "examples", 0),
    ("masked_loss_at_init", "examples", [[50260, 15772, 394]]),  # ids past BERT's vocabulary
    ("masked_loss_at_init", "seed", [-2]),
    ("fill_mask", "text_or_texts", "!õ"),  # no mask token: named 'text 0', not the argument
    ("cloze_cases", "seed", {}),
    ("chunk_documents", "tokenizer", None),
    ("chunk_documents", "documents", []),
    ("chunk_documents", "documents", torch.tensor(math.inf, dtype=torch.float16)),
    ("split_documents", "seed", [-2]),
    ("gpt2_from_scratch", "seed", -5275),
    ("gpt2_from_scratch", "context_length", 58810715459746624),  # tried to allocate 1.9 EB
    ("bert_from_scratch", "tokenizer", [1, -2, -1]),
    ("matches_golden", "path", torch.tensor(2, dtype=torch.uint8)),
    ("matches_golden", "key", {"a": 1}),
    ("record_golden", "curves", 1.175494351e-38),
    ("record_golden", "steps", 112),  # blamed 'curves'
    ("record_golden", "key", 5.854501911107203e16),
    ("plot_loss_curve", "path", True),
    ("plot_loss_curve", "curve", _meta(0, 4, 1, dtype=torch.float32)),
    ("round_trip", "tokenizer", ""),
    ("round_trip", "texts", 4.08739519126246e16),
    ("inspect_tokens", "tokenizer", torch.tensor(3)),
    ("causal_lm_collator", "tokenizer", ""),
    ("device_key", "device", -121710),
    ("device_key", "device", b" \xb5"),
]


@pytest.mark.parametrize(("name", "argument", "value"), REGRESSIONS,
                         ids=[f"{n}-{a}-{i}" for i, (n, a, _) in enumerate(REGRESSIONS)])
def test_found_example_gives_a_result_or_a_named_error(name, argument, value, world):
    _check_call(ENTRIES[name], world, argument, value)
