"""packing_equivalence: each document of a packed row, run alone, gives the logits, loss and
gradients it gets in the row. The probe on a tiny Llama, healthy and with each documented
packing bug put in; then the setup check on a plain loop over packed rows and on the Trainer
with ``DataCollatorWithFlattening``, healthy and broken, each failure naming its cause first."""

from __future__ import annotations

import math
import re

import pytest
import stacks
import torch

import lmcheck
from lmcheck.errors import InputError
from lmcheck.setup import check_loop, check_trainer


@pytest.fixture(scope="module")
def tok():
    return stacks.chat_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    net = stacks.llama(tok)
    net.config.use_cache = False
    return net


def packed(lengths=(7, 5, 9), *, seed=0, eos=None):
    """One packed row of random documents: ids, restarting positions, labels -100 at each start."""
    generator = torch.Generator().manual_seed(seed)
    documents = [torch.randint(5, 200, (n,), generator=generator) for n in lengths]
    if eos is not None:
        documents = [torch.cat([d[:-1], torch.tensor([eos])]) for d in documents]
    ids = torch.cat(documents)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.masked_fill(positions == 0, -100)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


# ---------------------------------------------------------------- the probe


def test_a_packed_row_with_restarting_positions_and_no_mask_equals_its_documents(model):
    result = lmcheck.packing_equivalence(model, packed())
    assert result.passed, result.explanation
    assert result.metrics["documents"] == 3
    assert result.metrics["max_logit_diff"] <= result.metrics["atol"]
    assert result.metrics["gradient_rel_error"] < 1e-3
    assert math.isclose(result.metrics["packed_loss"], result.metrics["documents_loss"], rel_tol=1e-4)


def test_an_all_ones_attention_mask_beside_packed_positions_is_named(model):
    """transformers PR #46634: the document mask is built from position ids only without a mask."""
    batch = packed()
    result = lmcheck.packing_equivalence(model, {**batch, "attention_mask": torch.ones_like(batch["input_ids"])})
    assert not result.passed
    assert "document 1 (tokens 7 to 11) first differs" in result.explanation
    assert "#46634" in result.explanation
    assert result.details[0]["position"] == 7


def test_a_model_that_builds_a_cache_while_it_trains_is_named(tok):
    net = stacks.llama(tok)  # config.use_cache is True, as a Llama built from its config has it
    result = lmcheck.packing_equivalence(net, packed())
    assert not result.passed
    assert "config.use_cache is True" in result.explanation


def test_positions_that_never_restart_are_found_by_the_eos(model, tok):
    batch = packed(eos=tok.eos_token_id)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]  # trl #3705, wrapped packing
    result = lmcheck.packing_equivalence(model, batch, eos_id=tok.eos_token_id)
    assert not result.passed
    assert result.explanation.startswith("the positions do not restart at document 1 of row 0 (token 7)")
    assert "trl #3705" in result.explanation
    # the same row without position ids at all, with its documents given
    del batch["position_ids"]
    result = lmcheck.packing_equivalence(model, batch, documents=[[7, 5, 9]])
    assert not result.passed
    assert "the batch has no position_ids" in result.explanation


def test_a_label_that_crosses_a_document_boundary_is_named(model):
    batch = packed()
    batch["labels"] = batch["input_ids"].clone()
    result = lmcheck.packing_equivalence(model, batch)
    assert not result.passed
    assert result.explanation.startswith("a label crosses a document boundary: labels[0, 7]")


def test_nan_logits_fail_and_are_located(tok):
    net = stacks.llama(tok)
    net.config.use_cache = False
    with torch.no_grad():
        net.model.embed_tokens.weight[:] = float("nan")
    result = lmcheck.packing_equivalence(net, packed())
    assert not result.passed
    assert result.metrics.get("non_finite")


def test_not_applicable_without_two_documents_or_on_a_plain_module(model):
    batch = packed()
    del batch["position_ids"]
    assert lmcheck.packing_equivalence(model, batch).status == "n/a"
    from plain_models import Config, NanoGPT

    plain = NanoGPT(Config(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16))
    assert "Hugging Face models only" in lmcheck.packing_equivalence(plain, packed()).explanation


@pytest.mark.parametrize(("arguments", "named"), [
    ({"packed_batch": {"ids": torch.zeros(1, 3)}}, "'packed_batch'"),
    ({"documents": [[7, 5, 90]]}, "'documents[0]'"),
    ({"documents": [7, 5, 9]}, "'documents' must give each of the 1 rows"),
    ({"eos_id": "2"}, "'eos_id'"),
    ({"max_documents": 1}, "'max_documents'"),
    ({"gradients": "yes"}, "'gradients'"),
])
def test_bad_input_names_the_argument(model, arguments, named):
    with pytest.raises(InputError, match=re.escape(named)):
        lmcheck.packing_equivalence(model, **{"packed_batch": packed(), **arguments})


# ---------------------------------------------------------------- the setup check


def run_loop(tok, **options):
    packer = options.pop("packer", None)
    loop = stacks.PackingLoop(tok, collator=packer, use_cache=options.pop("use_cache", False))
    return check_loop(loop.model, loop.step, loop.loader, tokenizer=options.pop("tokenizer", tok), max_grad_norm=1.0,
                      **options)


def plain_text_tokenizer():
    """The same tokens without a chat template: its eos ends documents, not turns."""
    plain = stacks.chat_tokenizer()
    plain.chat_template = None
    return plain


def test_a_plain_loop_over_packed_rows_passes(tok):
    report = run_loop(tok)
    result = report["packing_equivalence"]
    assert result.passed, result.explanation
    assert result.metrics["documents"] == 4  # the first batch: four examples flattened into one row
    failures = [(r.name, r.explanation) for r in report if r.status in ("fail", "error")]
    assert not failures, failures


@pytest.mark.parametrize(("options", "phrase"), [
    ({"use_cache": True}, "config.use_cache is True"),
    ({"packer": stacks.Packer("all_ones_mask")}, "#46634"),
    ({"packer": stacks.Packer("labels_cross")}, "a label crosses a document boundary"),
    ({"packer": stacks.Packer("arange_positions"), "packed": True, "tokenizer": plain_text_tokenizer()},
     "the positions do not restart"),
])
def test_a_broken_packing_loop_fails_packing_first(tok, options, phrase):
    report = run_loop(tok, **options)
    failures = report.failures()
    assert failures
    assert failures[0].name == "packing_equivalence", [(r.name, r.explanation) for r in failures]
    assert phrase in failures[0].explanation
    later = [r for r in failures[1:] if r.name in ("accumulation", "overfits")]
    assert all(r.metrics.get("follows_from") for r in later), [(r.name, r.explanation) for r in later]


def test_an_eos_that_ends_chat_turns_does_not_split_documents(tok):
    """With a chat template whose end-of-turn token is the eos, an eos ends a turn as often as a
    document: only restarting positions say where documents are, and here none do."""
    report = run_loop(tok, packer=stacks.Packer("arange_positions"), packed=True)
    assert report["packing_equivalence"].status == "n/a"
    assert "the position ids never restart" in report["packing_equivalence"].explanation


def test_concatenated_rows_without_a_packing_signal_are_not_applicable(tok):
    """Rows of eos-separated documents that attend to each other, as GPT-2's pretraining chunks are:
    not packing unless the setup says so."""
    report = run_loop(tok, packer=stacks.Packer("arange_positions"))
    assert report["packing_equivalence"].status == "n/a"
    assert "packed=True" in report["packing_equivalence"].explanation


def test_a_flattening_trainer_is_checked_as_packed(tok, tmp_path):
    import datasets
    from transformers import DataCollatorWithFlattening, Trainer

    trainer = Trainer(model=stacks.llama(tok), args=stacks.training_arguments(str(tmp_path)),
                      train_dataset=datasets.Dataset.from_list(stacks.packed_examples(tok)),
                      data_collator=DataCollatorWithFlattening(), processing_class=tok)
    report = check_trainer(trainer, steps=2, overfit_steps=2)
    result = report["packing_equivalence"]
    assert result.passed, result.explanation
    assert report.setup["packing"] == "the collator, a DataCollatorWithFlattening"


# ---------------------------------------------------------------- batch_supervision on packed rows


def chat_document(tok, question, answer, *, train_end=True, cut=None):
    """A ChatML exchange as ids and labels, only the answer supervised (and its <|im_end|>)."""
    prompt = tok(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    reply = tok(answer)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    ids = prompt + reply
    labels = [-100] * len(prompt) + reply[:-1] + [reply[-1] if train_end else -100]
    return (ids[:cut], labels[:cut]) if cut else (ids, labels)


def packed_chat(tok, documents):
    ids = torch.tensor([t for d, _ in documents for t in d])[None]
    labels = torch.tensor([t for _, marks in documents for t in marks])[None]
    positions = torch.cat([torch.arange(len(d)) for d, _ in documents])[None]
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def test_batch_supervision_judges_each_packed_document_as_a_row(tok):
    """A packed chat row: each document's assistant span must end with its supervised
    <|im_end|>, except in a document as long as the longest (cut at max_length, as TRL's
    best-fit packing truncates); a document cut shorter than that is a fault."""
    whole = chat_document(tok, "the cat sat", "a dog ran on the mat")
    longest = chat_document(tok, "the cat sat on the mat", "then the dog ran and it was a big red bird")
    answer_starts = len(chat_document(tok, "the sun came up", "")[0]) - 1
    cut = chat_document(tok, "the sun came up", "then it was day and night came and the moon saw a fish",
                        cut=len(longest[0]))
    assert len(cut[0]) == len(longest[0]) > answer_starts + 2  # cut inside its answer
    result = lmcheck.batch_supervision(packed_chat(tok, [whole, cut, longest]), tok)
    assert result.passed, result.explanation
    short = (cut[0][:answer_starts + 2], cut[1][:answer_starts + 2])
    result = lmcheck.batch_supervision(packed_chat(tok, [whole, short, longest]), tok)
    assert not result.passed
    assert "(rows: the packed rows' documents, in order)" in result.explanation
    assert "first: row 1" in result.explanation  # the second document


def test_a_packed_document_whose_end_of_turn_is_not_trained_fails(tok):
    """trl PR #5988 inside a packed row: the second document's <|im_end|> is -100."""
    first = chat_document(tok, "the cat sat", "a dog ran on the mat")
    second = chat_document(tok, "the sun came up", "then it was day", train_end=False)
    result = lmcheck.batch_supervision(packed_chat(tok, [first, second]), tok)
    assert not result.passed
    assert "trl PR #5988" in result.explanation


def test_at_most_max_documents_of_a_row_are_compared_and_said(model):
    result = lmcheck.packing_equivalence(model, packed((4, 3, 5, 4, 3)), max_documents=2, gradients=False)
    assert result.passed, result.explanation
    assert (result.metrics["documents"], result.metrics["documents_in_rows"]) == (2, 5)
    assert result.explanation.startswith("2 documents compared in 1 packed row(s)")
