"""The setup checks on the stacks people train with, none of them lmcheck's: TRL's SFTTrainer on
plain text, assistant-only chat and prompt-completion data; a PEFT LoRA through the Trainer, with
reentrant gradient checkpointing as the QLoRA recipes set it; a loop written as nanoGPT's
``train.py`` is; an ``accelerate`` loop; a Trainer on a tiny Llama, with an optimizer of the
user's own. Each healthy setup passes, with n/a only where a check does not apply; each
documented bug put into one fails with its cause named first.

The heavy ones (TRL and PEFT, 4 to 8 s each) run in the slow tier (``pytest -m slow``, which CI
runs); the loops run in the default suite.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import stacks
import torch
from plain_models import Config, NanoGPT
from transformers import DataCollatorForLanguageModeling, LlamaForCausalLM, Trainer

import lmcheck
from lmcheck.setup import SETUP_CHECKS, SetupReport, check_loop, check_trainer

pytest.importorskip("trl")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tok():
    return stacks.chat_tokenizer()


def healthy(report: SetupReport, *, not_applicable: tuple[str, ...] = (), packed: bool = False,
            preference: bool = False, adapter: bool = False) -> None:
    """Every check passed but those named, which are n/a; nothing crashed or failed. A setup that
    does not pack has ``packing_equivalence`` n/a, saying so; one that is not a preference
    trainer, ``preference_at_init``; one without a PEFT adapter, ``adapters``; every one but an
    RL trainer, ``importance_ratio``."""
    not_applicable += ("importance_ratio",)
    if not adapter:
        not_applicable += ("adapters",)
        assert report["adapters"].explanation.startswith("not applicable: not a PEFT model")
    assert report["importance_ratio"].explanation.startswith("not applicable: not an RL trainer")
    if not preference:
        not_applicable += ("preference_at_init",)
        assert report["preference_at_init"].explanation.startswith("not applicable: not a preference trainer")
    if not packed:
        not_applicable += ("packing_equivalence",)
        assert report["packing_equivalence"].explanation.startswith("not applicable: the batches are not packed")
    statuses = {r.name: r.status for r in report}
    assert set(statuses) == set(SETUP_CHECKS)
    wrong = {n: report[n].explanation for n, s in statuses.items() if s != ("n/a" if n in not_applicable else "pass")}
    assert not wrong, wrong
    assert report.passed


def fails_first(report: SetupReport, check: str, *phrases: str) -> None:
    """``check`` failed, leads the failures (the root cause) and names the cause."""
    failures = report.failures()
    assert failures, "nothing failed"
    assert failures[0].name == check, [(r.name, r.explanation) for r in failures]
    for phrase in phrases:
        assert phrase in failures[0].explanation, f"{phrase!r} not in: {failures[0].explanation}"
    assert not report.passed


# ---------------------------------------------------------------- TRL's SFTTrainer


@pytest.mark.slow
@pytest.mark.parametrize("data", ["plain text", "assistant-only chat", "prompt-completion"])
def test_trl_sft_healthy(tok, tmp_path, data):
    """SFT at TRL's defaults with a cosine schedule: the overfitting run holds the schedule's
    peak; in chat rows the user's end-of-turn tokens are left out by design and every assistant
    span ends with its supervised ``<|im_end|>``, the ``\\n`` after it allowed."""
    made = {"plain text": (stacks.plain_texts(), {}),
            "assistant-only chat": (stacks.two_turn_conversations(), {"assistant_only_loss": True}),
            "prompt-completion": (stacks.prompt_completions(), {})}
    rows, options = made[data]

    def build(seed: int) -> Any:  # the resume check resumes TRL's own checkpoint on a new SFTTrainer
        return stacks.sft_trainer(tok, str(tmp_path), rows, seed=seed, **options)

    report = check_trainer(build(0), rebuild=build)
    healthy(report)
    assert "held constant" in report["overfits"].explanation
    if data != "plain text":
        assert report["batch_supervision"].metrics["masked_rows"] > 0


def plain_text_tokenizer():
    """The chat tokenizer without its template: in plain text its eos ends documents, not turns."""
    plain = stacks.chat_tokenizer()
    plain.chat_template = None
    return plain


def packed_sft(tokenizer, folder, data, **options):
    """SFT with TRL's packing (best-fit decreasing, padding-free: position ids from each packed
    example's ``seq_lengths``), rebuilt for the resume check."""
    def build(seed: int) -> Any:
        return stacks.sft_trainer(tokenizer, folder, data, seed=seed, packing=True, **options)
    return build


@pytest.mark.slow
@pytest.mark.parametrize("data", ["plain text", "assistant-only chat"])
def test_trl_sft_with_packing_healthy(tok, tmp_path, data):
    """Each packed document is its own sequence: packing_equivalence runs each alone; the data
    order and the resume check key the documents, not the packed rows; an epoch that ends inside
    an accumulation is not read as skipped steps."""
    build = (packed_sft(plain_text_tokenizer(), str(tmp_path), stacks.plain_texts(48)) if data == "plain text" else
             packed_sft(tok, str(tmp_path), stacks.two_turn_conversations(32), assistant_only_loss=True))
    report = check_trainer(build(0), rebuild=build)
    healthy(report, packed=True)
    assert report.setup["packing"].startswith("the collator's padding_free=True")
    assert report["packing_equivalence"].metrics["documents"] >= 4


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["seq_lengths dropped", "wrapped"])
def test_trl_packing_whose_documents_see_each_other(tmp_path, strategy):
    """trl #3705: without the seq_lengths column the position ids restart only at each packed
    example; trl #3067: wrapped packing gives none. Either way the packed documents attend to
    each other, and the positions do not restart at each eos."""
    options = {"packing_strategy": "wrapped"} if strategy == "wrapped" else {}
    trainer = packed_sft(plain_text_tokenizer(), str(tmp_path), stacks.plain_texts(48), **options)(0)
    if strategy == "seq_lengths dropped":
        trainer.train_dataset = trainer.train_dataset.remove_columns("seq_lengths")
    report = check_trainer(trainer, overfit_steps=5)
    fails_first(report, "packing_equivalence", "the positions do not restart at document 1", "trl #3705")


@pytest.mark.slow
def test_trl_template_that_never_trains_the_end_of_turn(tok, tmp_path):
    """trl PR #5988: a training template whose ``{% generation %}`` block closes before
    ``<|im_end|>``: the assistant's spans end on content, the model never learns to stop."""
    untrained = stacks.chat_tokenizer()
    untrained.chat_template = stacks.CHATML_STOP_UNTRAINED
    trainer = stacks.sft_trainer(untrained, str(tmp_path), stacks.conversations(), assistant_only_loss=True)
    report = check_trainer(trainer)
    fails_first(report, "batch_supervision", "end-of-sequence token(s) are not supervised", "trl PR #5988")


@pytest.mark.slow
def test_trl_prompt_completion_whose_prompt_is_trained(tok, tmp_path):
    """trl #4147: wrong prompt-completion labels. TRL trains prompt-completion data on its
    completions; labels copied from the ids train the user's turn too."""
    trainer = stacks.sft_trainer(tok, str(tmp_path), stacks.prompt_completions())
    trainer.train_dataset = trainer.train_dataset.map(lambda row: {"labels": list(row["input_ids"])})
    report = check_trainer(trainer, overfit_steps=5)
    fails_first(report, "batch_supervision", "though the setup trains on completions only", "turn 0 (user)",
                "trl #4147")
    assert report.setup["trains on"] == "prompt-completion data, completion_only_loss not False"


# ---------------------------------------------------------------- TRL's DPOTrainer


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    """A tiny Llama trained a little and saved: DPO's policy, and TRL's reference loaded from it."""
    folder = str(tmp_path_factory.mktemp("dpo") / "base")
    stacks.pretrained_llama(tok, folder)
    return folder


def healthy_preference(report: SetupReport) -> None:
    """A preference trainer passes every check that judges its loss and updates; the ones that
    judge a next-token cross-entropy are n/a, saying why."""
    healthy(report, not_applicable=("loss_at_init", "loss_matches_reference", "overfits"), preference=True,
            adapter=report["preference_at_init"].metrics["reference"].startswith("the PEFT"))
    assert "a preference loss" in report["loss_at_init"].explanation


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["a separate reference model", "the PEFT model with its adapter off",
                                       "precomputed"])
def test_trl_dpo_healthy(tok, tmp_path, base, reference):
    """DPO at TRL's defaults (sigmoid loss, beta 0.1, bf16 autocast, dropout disabled): the
    reference loaded from the policy's folder, for a LoRA the base with its adapter off, or its
    log-probabilities precomputed. At step 0 the two agree and the loss is ln 2; the update over
    two micro-batches is the gradient of the mean loss over their pairs; the updates, schedule,
    data order, reproducibility and TRL's own resume pass."""
    def build(seed: int) -> Any:
        torch.manual_seed(seed)
        adapter = reference.startswith("the PEFT")
        model = stacks.lora(LlamaForCausalLM.from_pretrained(base)) if adapter else None
        return stacks.dpo_trainer(tok, str(tmp_path), base, model=model, seed=seed,
                                  precompute_ref_log_probs=reference == "precomputed")

    report = check_trainer(build(0), rebuild=build)
    healthy_preference(report)
    assert report["preference_at_init"].metrics["reference"] == reference
    assert "the gradient of the mean preference loss" in report["accumulation"].explanation
    assert report["preference_at_init"].metrics["max_logp_gap"] < 1e-4
    assert "loss 0.693147 = ln 2" in report["preference_at_init"].explanation
    assert report.setup["trains on"].startswith("a preference trainer")
    assert report["batch_supervision"].metrics["masked_rows"] > 0


@pytest.mark.slow
def test_trl_dpo_reference_in_train_mode_with_dropout(tok, tmp_path, base):
    """reef PR #536: dropout left on in the reference's forward (put back in train mode with its
    attention dropout, which TRL's disable_dropout does not reach) moves its log-probabilities
    at step 0, and the first updates chase that noise."""
    trainer = stacks.dpo_trainer(tok, str(tmp_path), base)
    for module in trainer.ref_model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    trainer.ref_model.train()
    report = check_trainer(trainer, steps=2)
    fails_first(report, "preference_at_init", "differ before any update", "the reference's forward (in train mode",
                "attention_dropout=0.5", "dropout is on", "reef PR #536")


@pytest.mark.slow
def test_trl_dpo_reference_that_is_another_model(tok, tmp_path, base):
    """NeMo-Aligner #227: policy and reference differ at iteration 0 (here the reference is
    another initialisation): the first parameter that differs is named."""
    trainer = stacks.dpo_trainer(tok, str(tmp_path), base, ref_model=stacks.llama(tok, seed=5))
    report = check_trainer(trainer, steps=2)
    fails_first(report, "preference_at_init", "the reference's weights are not the policy's (first model.",
                "not ln 2", "NeMo-Aligner #227")


@pytest.mark.slow
def test_trl_dpo_whose_loss_is_not_divided_by_the_accumulation(tok, tmp_path, base):
    """The Trainer told that the loss is already scaled for the accumulation
    (``loss_is_scaled_for_ga``, transformers' flag for a loss normalised over the whole step),
    while DPO's compute_loss gives each micro-batch's mean: the losses of a step are summed, not
    averaged (transformers #34191's kind, on pairs), and the update is k times the mean's gradient."""
    trainer = stacks.dpo_trainer(tok, str(tmp_path), base)
    trainer.loss_is_scaled_for_ga = True
    report = check_trainer(trainer, overfit_steps=5)
    fails_first(report, "accumulation", "the loss is not divided by the 2 micro-batches")


@pytest.mark.slow
def test_trl_dpo_whose_masks_train_the_prompt(tok, tmp_path, base):
    """Chosen and rejected masks must supervise completions only: a collator whose mask covers
    the prompt trains the model to write the user's turn."""
    trainer = stacks.dpo_trainer(tok, str(tmp_path), base)
    collate = trainer.data_collator

    def prompt_too(examples: list[Any]) -> Any:
        batch = collate(examples)
        batch["completion_mask"] = batch["attention_mask"].clone()
        return batch

    trainer.data_collator = prompt_too
    report = check_trainer(trainer, steps=2)
    fails_first(report, "batch_supervision", "though the setup trains on completions only", "turn 0 (user)")
    assert "row 0 supervises its prompt" in report["preference_at_init"].explanation


# ---------------------------------------------------------------- PEFT


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["none", "reentrant"])
def test_peft_lora_healthy(tok, tmp_path, checkpointing):
    """A LoRA over a pretrained base through the Trainer: a Hugging Face model for every purpose
    (pretrained, so loss_at_init is n/a; its own loss is compared); lora_A's zero gradient at
    step 1 (lora_B starts at zero) is named, not failed. With reentrant checkpointing (the QLoRA
    recipes) the reference gradient still reaches the checkpointed blocks."""
    stacks.pretrained_llama(tok, str(tmp_path / "base"))

    def build(seed: int) -> Trainer:
        """The LoRA over the saved base, its lora_A drawn from ``seed``; the resume check resumes
        the adapter's own checkpoint."""
        torch.manual_seed(seed)
        model = stacks.lora(LlamaForCausalLM.from_pretrained(str(tmp_path / "base")))
        options: dict[str, Any] = {}
        if checkpointing == "reentrant":
            model.enable_input_require_grads()  # as peft.prepare_model_for_kbit_training does
            options = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
        return Trainer(model=model, args=stacks.training_arguments(str(tmp_path), seed=seed, **options),
                       train_dataset=stacks.examples(tok),
                       data_collator=DataCollatorForLanguageModeling(tok, mlm=False), processing_class=tok)

    trainer = build(0)
    model = trainer.model
    report = check_trainer(trainer, rebuild=build)
    healthy(report, not_applicable=("loss_at_init",), adapter=True)
    if checkpointing == "reentrant":  # the Trainer turned it on for its runs
        assert model.get_base_model().is_gradient_checkpointing
    assert "lora_B" in report["gradient_flow"].explanation
    assert report["gradient_flow"].metrics["zero_at_first_step"] > 0


# ---------------------------------------------------------------- a Trainer on a tiny Llama


@pytest.mark.slow
@pytest.mark.parametrize("own_optimizer", [False, True])
def test_llama_trainer_healthy(tok, tmp_path, own_optimizer):
    """The documented way to give a Trainer its own optimizer, ``optimizers=(AdamW(...), None)``:
    the warm-up the Trainer builds around it is what lr_schedule replays."""
    model = stacks.llama(tok)
    optimizers = (torch.optim.AdamW(model.parameters(), lr=1e-2), None) if own_optimizer else (None, None)
    trainer = Trainer(model=model, args=stacks.training_arguments(str(tmp_path), lr_scheduler_type="linear",
                                                                  warmup_steps=5),
                      train_dataset=stacks.examples(tok), data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                      processing_class=tok, optimizers=optimizers)
    healthy(check_trainer(trainer), not_applicable=("resume",))  # no rebuild: no Trainer built afresh


@pytest.mark.slow
def test_collator_that_supervises_nothing_is_one_root_cause(tok, tmp_path):
    """trl #598: a completion-only collator that never finds its response template labels every
    token -100. That is said once, first, by batch_supervision; the checks that need supervised
    tokens are n/a with that reason, and ``overfits`` never passes on nothing."""
    causal = DataCollatorForLanguageModeling(tok, mlm=False)

    def template_never_found(examples: list[Any]) -> Any:
        batch = causal(examples)
        batch["labels"][:] = -100
        return batch

    trainer = Trainer(model=stacks.llama(tok), args=stacks.training_arguments(str(tmp_path)),
                      train_dataset=stacks.examples(tok), data_collator=template_never_found, processing_class=tok)
    report = check_trainer(trainer)
    fails_first(report, "batch_supervision", "rows supervise no token", "trl #598")
    assert "#23530" not in report["batch_supervision"].explanation
    for name in ("gradient_flow", "params_update", "accumulation", "overfits", "reproducible"):
        assert report[name].status == "n/a", report[name]
        assert "batch_supervision" in report[name].skip_reason


@pytest.mark.slow
def test_pad_equal_to_eos_with_the_tokenizer_only_in_the_collator(tok, tmp_path):
    """transformers #23530 with no ``processing_class``: the eos comes from the collator's own
    tokenizer, so the hidden eos is still found (not "eos not checked")."""
    eos_padded = stacks.chat_tokenizer()
    eos_padded.pad_token = eos_padded.eos_token
    trainer = Trainer(model=stacks.llama(tok), args=stacks.training_arguments(str(tmp_path)),
                      train_dataset=stacks.examples(tok),
                      data_collator=DataCollatorForLanguageModeling(eos_padded, mlm=False))
    report = check_trainer(trainer)
    fails_first(report, "batch_supervision", "end-of-sequence token(s) are not supervised", "#23530")
    assert report.setup["eos and BOS from"] == "the collator's tokenizer"


# ---------------------------------------------------------------- a loop as nanoGPT's train.py


def nanogpt(tok, **options: Any) -> tuple[Any, stacks.NanoGPTLoop]:
    net = NanoGPT(Config(vocab_size=len(tok), block_size=16))
    loop = stacks.NanoGPTLoop(net, stacks.token_stream(tok), **options)
    return lmcheck.adapt(net, logits=lambda ids: net(ids, ids)[0]), loop


def test_nanogpt_loop_healthy(tok):
    """Random windows of a token stream (sampling with replacement, a named data mode), its own
    ``get_lr(iter_num)`` set by hand (the overfitting run holds its peak whatever ``iter_num``
    says), the loss divided by the accumulation steps and clipping at 1."""
    model, loop = nanogpt(tok)
    report = check_loop(model, loop.step, loop.batches(), tokenizer=tok, max_grad_norm=1.0,
                        sampling="with_replacement")
    healthy(report, not_applicable=("loss_matches_reference", "reproducible", "resume"))
    assert "sampling with replacement" in report["data_order"].explanation
    # the step returns loss / k: the curve sums a step's micro-batches, so it starts near ln V
    first = report.curve.train[0][1]
    assert abs(first - math.log(len(tok))) < 0.5, first


def test_nanogpt_loss_not_divided_by_the_accumulation_steps_under_clipping(tok):
    """The nanoGPT loop without ``loss / gradient_accumulation_steps``, clipped at 1: the right
    update and the doubled one both clip to norm 1, so the step's gradient alone cannot tell
    them apart; accumulation compares the update before clip_grad_norm_ scaled it."""
    model, loop = nanogpt(tok, divide=False)
    report = check_loop(model, loop.step, loop.batches(), tokenizer=tok, max_grad_norm=1.0,
                        sampling="with_replacement", overfit_steps=10)
    result = report["accumulation"]
    assert result.status == "fail", result
    assert "not divided by the 2 accumulation steps" in result.explanation
    assert "seen through the clipping" in result.explanation


def test_nanogpt_sampling_with_replacement_fails_as_epochs(tok):
    """Left at ``sampling="epochs"``, the same loop's windows repeat within an epoch: the data
    mode is the user's to name, and the default still catches a sampler that repeats."""
    model, loop = nanogpt(tok)
    report = check_loop(model, loop.step, loop.batches(), tokenizer=tok, max_grad_norm=1.0, overfit_steps=10)
    assert report["data_order"].status == "fail"
    assert "repeats an example" in report["data_order"].explanation


def test_sampling_that_repeats_its_draw(tok):
    """With replacement, but the generator reseeded at every step: every batch is the same."""
    model, loop = nanogpt(tok)
    batch = loop.get_batch()
    report = check_loop(model, loop.step, [batch] * 16, tokenizer=tok, max_grad_norm=1.0,
                        sampling="with_replacement", overfit_steps=10)
    assert report["data_order"].status == "fail"
    assert "the draw repeats itself" in report["data_order"].explanation


# ---------------------------------------------------------------- an accelerate loop


def test_accelerate_loop_healthy(tok):
    """Everything through ``accelerator.prepare``: the prepared scheduler (an AcceleratedScheduler,
    the object the step really calls) is unwrapped; packed chunks of one length, so accelerate's
    mean per micro-batch is the mean over the step's tokens."""
    loop = stacks.AccelerateLoop(stacks.llama(tok), stacks.chunk_loader(tok))
    report = check_loop(loop.model, loop.step, loop.loader, tokenizer=tok, scheduler=loop.scheduler,
                        max_grad_norm=1.0)
    healthy(report, not_applicable=("reproducible", "resume"))


def test_accelerate_loop_on_padded_rows_of_unequal_length(tok):
    """The same loop on padded rows of unequal length: accelerate's ``accumulate`` averages the
    micro-batches' mean losses, so short rows weigh as much as long ones (transformers #34191)."""
    loop = stacks.AccelerateLoop(stacks.llama(tok), stacks.padded_loader(tok))
    report = check_loop(loop.model, loop.step, loop.loader, tokenizer=tok, scheduler=loop.scheduler,
                        max_grad_norm=1.0, overfit_steps=10)
    result = report["accumulation"]
    assert result.status == "fail"
    assert "#34191" in result.explanation


# ---------------------------------------------------------------- the faces


def test_a_report_iterates_over_its_results(tok):
    model, loop = nanogpt(tok)
    report = check_loop(model, loop.step, loop.batches(), tokenizer=tok, max_grad_norm=1.0,
                        sampling="with_replacement", overfit_steps=5)
    assert [r.name for r in report] == list(SETUP_CHECKS) == [r.name for r in report.results]
    assert len(report) == len(SETUP_CHECKS)


def test_a_collator_that_raises_is_named(tok):
    def broken(examples: list[Any]) -> Any:
        raise KeyError("text")

    loader = stacks.padded_loader(tok, collate=broken)
    model, loop = nanogpt(tok)
    with pytest.raises(lmcheck.InputError, match="'batches' raised KeyError while lmcheck read batch 0"):
        check_loop(model, loop.step, loader, tokenizer=tok)


def test_an_unknown_sampling_mode_is_named(tok):
    model, loop = nanogpt(tok)
    with pytest.raises(lmcheck.InputError, match="'sampling' must be 'epochs'"):
        check_loop(model, loop.step, loop.batches(), sampling="random")


def test_a_peft_model_passes_the_causal_battery(tok):
    """A LoRA model is a Hugging Face model for every purpose: generate, its cache, its mask."""
    from lmcheck.batteries import run_checks

    model = stacks.lora(stacks.llama(tok)).eval()
    results = run_checks(model, tok, prompts=["the cat sat", "a dog ran on the mat"])
    assert {r.name: r.status for r in results} == dict.fromkeys((r.name for r in results), "pass"), \
        {r.name: r.explanation for r in results if r.status != "pass"}
    assert "greedy_matches_generate" in {r.name for r in results}


def test_unequal_lengths_keep_part_of_every_completion():
    """The Trainer's first run makes a step's micro-batches unequal by leaving out the later
    supervised positions of some batches; on completion-only rows (a prompt at -100) each row
    keeps at least one supervised token, so no micro-batch is left with nothing to compare."""
    from lmcheck.setup.trainer import unequal_lengths as _unequal_lengths

    labels = torch.full((2, 12), -100)
    labels[:, 9:] = 7  # the completion: the last 3 positions
    collate = _unequal_lengths(lambda examples: {"input_ids": torch.zeros(2, 12, dtype=torch.long),
                                                 "labels": labels.clone()})
    kept = [int((collate([])["labels"] != -100).sum(dim=1).min()) for _ in range(4)]
    assert min(kept) >= 1
    assert len(set(kept)) > 1  # unequal across the micro-batches
    assert kept[-1] == 3  # every fourth keeps the whole completion


# ---------------------------------------------------------------- resuming with the stack's own checkpointing


def test_accelerate_save_state_and_load_state_resume_exactly_with_a_seedable_sampler(tok):
    """accelerate's own checkpointing and ``skip_first_batches``, with
    ``use_seedable_sampler=True``: the resumed runs continue bit for bit, at an epoch's end and
    inside the next."""
    build = lambda seed: stacks.resumable_accelerate(tok, seed)  # noqa: E731
    result = check_loop(**build(0), rebuild=build, overfit_steps=5)["resume"]
    assert result.passed, result.explanation
    assert "2 (the end of epoch 0) and 3 (mid-epoch 1" in result.explanation


def test_accelerate_resume_replays_an_order_its_checkpoint_does_not_hold(tok):
    """accelerate's default sampler: each epoch's order comes from the loader's own generator,
    which ``save_state`` does not hold, so the resumed epoch draws the first epoch's order again
    (accelerate PRs #4071 and #4233 are the same family)."""
    build = lambda seed: stacks.resumable_accelerate(tok, seed, seedable=False)  # noqa: E731
    result = check_loop(**build(0), rebuild=build, overfit_steps=5)["resume"]
    assert result.status == "fail"
    assert "step 3 trained on" in result.explanation
    assert "the straight run trained on them at step 1 (replayed)" in result.explanation


@pytest.mark.parametrize("save_generator", [False, True])
def test_nanogpt_checkpoint_resumes_exactly_only_with_its_generator(tok, save_generator):
    """nanoGPT's checkpoint holds the model, the optimizer and ``iter_num``, not the generator
    its ``get_batch`` draws from: a resumed run draws the windows the run began with."""
    build = lambda seed: stacks.resumable_nanogpt(tok, seed, save_generator=save_generator)  # noqa: E731
    result = check_loop(**build(0), rebuild=build, overfit_steps=5)["resume"]
    if save_generator:
        assert result.passed, result.explanation
    else:
        assert result.status == "fail"
        assert "step 5 trained on 8 of its 8 rows other than the straight run's" in result.explanation
        assert "(replayed)" in result.explanation


# ---------------------------------------------------------------- padding-free batches


def flattening_trainer(tok, output_dir: str, seed: int = 0, trainer_class: type[Trainer] = Trainer) -> Trainer:
    """A tiny Llama trained padding-free: ``DataCollatorWithFlattening`` packs each batch's
    examples into one row, its ``position_ids`` restarting at every example."""
    import datasets
    from transformers import DataCollatorWithFlattening

    rows = [{"input_ids": tok(s)["input_ids"] + [tok.eos_token_id]} for s in stacks.sentences(32, seed=7)]
    return trainer_class(model=stacks.llama(tok, seed=seed),
                         args=stacks.training_arguments(output_dir, seed=seed),
                         train_dataset=datasets.Dataset.from_list(rows), data_collator=DataCollatorWithFlattening(),
                         processing_class=tok)


def test_a_padding_free_trainer_passes_every_check(tok, tmp_path):
    """lmcheck's own forwards (the accumulation reference, the memorization check, the loss)
    pass the batch's ``position_ids``, so each packed example is its own sequence, as in the
    user's step; data order and resume fingerprint the examples, not the packed rows."""
    build = lambda seed: flattening_trainer(tok, str(tmp_path), seed)  # noqa: E731
    report = check_trainer(build(0), rebuild=build)
    healthy(report, packed=True)


class _MeanPerMicroBatch(Trainer):
    """compute_loss returns each micro-batch's mean, ignoring num_items_in_batch (transformers #34191)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def test_a_padding_free_trainer_that_averages_per_micro_batch_fails_accumulation(tok, tmp_path):
    report = check_trainer(flattening_trainer(tok, str(tmp_path), trainer_class=_MeanPerMicroBatch), overfit_steps=5)
    fails_first(report, "accumulation", "#34191")
