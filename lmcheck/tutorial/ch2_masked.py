"""Chapter 2: a masked language model fills in the blank (BERT)."""

from __future__ import annotations

import math
from typing import Any

import torch

from lmcheck.cloze import cloze_cases
from lmcheck.corpus import load_documents, split_documents
from lmcheck.loops.masked import MEMORIZATION_RUN, memorize_chunks
from lmcheck.masked import fill_mask, mask_fill_accuracy, masked_loss_at_init
from lmcheck.models import bert_from_scratch
from lmcheck.recipes import DEFAULTS
from lmcheck.report import Report
from lmcheck.tokens import inspect_tokens, load_tokenizer
from lmcheck.tutorial import expect, expect_equal, expected

TITLE = "Chapter 2: masked language models"


def run(report: Report, *, quick: bool = False, out: str = "lmcheck-out") -> None:
    """Print the chapter; ``quick`` shows fewer side-by-side rows (the checks are the same)."""
    report.title(TITLE)
    tokenizer = load_tokenizer(DEFAULTS["masked_tokenizer"])
    sentence = DEFAULTS["masked_sentence"]
    report.text(
        "BERT reads the whole sentence in both directions and is trained to restore the tokens\n"
        "hidden behind its mask token. No pretrained BERT with its masked-LM head can be had\n"
        "offline, so the mechanics run on a BERT-base configuration with random weights: the\n"
        "shapes are the real ones, the predicted words are noise."
    )
    table = inspect_tokens(tokenizer, sentence)
    report.text(f"\n{sentence!r} -> input_ids = {table.input_ids}")

    model = bert_from_scratch(tokenizer, preset="bert-base", seed=DEFAULTS["seed"]).eval()
    structure = str(model)
    if not quick:
        report.text(structure)
    report.result(expect("bert_base_structure", all(part in structure for part in expected.BERT_BASE_STRUCTURE),
        "word embeddings 30522 x 768, 12 encoder layers, an MLM head back to 30522 scores"))

    inputs = tokenizer(sentence, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**inputs).logits  # (1, 11, 30522)
    mask_index = torch.where(inputs["input_ids"] == tokenizer.mask_token_id)[1].tolist()
    probs = logits[0, mask_index[0]].softmax(-1)  # (30522,)
    length, vocab = len(expected.BERT_SENTENCE_IDS), expected.BERT_VOCAB
    report.result(expect_equal("logits_shape", list(logits.shape), [1, length, vocab]))
    report.result(expect_equal("masked_index", mask_index, [expected.BERT_MASK_INDEX]))
    report.result(expect_equal("mask_logits_shape", list(logits[0, expected.BERT_MASK_INDEX].shape), [vocab]))
    report.result(expect("softmax_sums_to_one", abs(float(probs.sum()) - 1.0) <= 1e-5,
                         f"probabilities at index 5 sum to {float(probs.sum()):.6f} (tolerance 1e-5)"))
    (prediction,) = fill_mask(model, tokenizer, sentence, top_k=5)
    report.table(("rank", "id", "token", "probability"),
                 ((i + 1, t_id, tok, p) for i, (t_id, tok, p) in
                  enumerate(zip(prediction.ids, prediction.tokens, prediction.probabilities, strict=True))),
                 title="top 5 at [MASK], random BERT-base (pretrained: box bag bowl jar cup)")
    report.result(expect("top5_decodes", len(prediction.tokens) == 5 and all(prediction.tokens),
                         f"top 5 ids {list(prediction.ids)} decode to {list(prediction.tokens)}"))

    _from_scratch(report, tokenizer, rows=4 if quick else 8)


def _from_scratch(report: Report, tokenizer: Any, *, rows: int) -> None:
    plan = MEMORIZATION_RUN
    report.text(
        f"\nFrom scratch: a tiny BERT ({plan.preset}) with the real 30,522-word uncased vocabulary\n"
        "(a vocabulary trained on the sample would be smaller and faster, but its predictions would\n"
        "not be the words a reader knows), trained with DataCollatorForLanguageModeling(mlm=True,\n"
        f"mlm_probability={plan.mlm_probability}) on the first {plan.chunks} chunks of "
        f"{plan.context_length} tokens of the training documents for {plan.steps} steps."
    )
    split = split_documents(load_documents(DEFAULTS["documents"]), n_train=DEFAULTS["n_train"],
                            n_valid=DEFAULTS["n_valid"], seed=DEFAULTS["split_seed"])
    fresh = bert_from_scratch(tokenizer, preset=plan.preset, seed=DEFAULTS["seed"])
    run = memorize_chunks(tokenizer, split["train"], split["validation"], plan)
    report.result(masked_loss_at_init(fresh, tokenizer, run.train_texts))
    every = max(1, len(run.losses) // 6)
    shown = list(enumerate(run.losses))[::every] + [(len(run.losses) - 1, run.losses[-1])]
    report.text("training loss: " + ", ".join(f"step {i}: {loss:.2f}" for i, loss in shown)
                + f"  (ln 30522 = {math.log(30522):.2f})")
    last = [loss for loss in run.losses[-20:] if math.isfinite(loss)]
    final = sum(last) / max(1, len(last))
    report.result(expect("training_loss_falls", run.losses[0] > 9.0 and final < 1.0,
                         f"from {run.losses[0]:.2f} to {final:.2f} (mean of the last 20 steps; "
                         "needed: above 9 at the start, below 1 at the end)"))

    results = []
    for texts, name, threshold, direction in (
        (run.train_texts, "mask_fill_accuracy_memorized", plan.memorized_min, "at_least"),
        (run.heldout_texts, "mask_fill_accuracy_heldout", plan.heldout_max, "at_most"),
    ):
        cases = cloze_cases(tokenizer, texts, n=plan.cases, seed=plan.case_seed, context="text")
        results.append(report.result(mask_fill_accuracy(
            run.model, tokenizer, cases, threshold=threshold, expect=direction, name=name)))
    memorized, heldout = (r.details for r in results)
    report.table(
        ("memorized chunk", "expected / predicted", "p(expected)",
         "held-out chunk", "expected / predicted", "p(expected)"),
        (_side(a) + _side(b) for a, b in zip(memorized[:rows], heldout[:rows], strict=False)),
        title="fill-mask on memorized vs held-out text (the overfit signature of chapter 4)",
    )


def _side(row: Any) -> tuple[str, str, str]:
    """An excerpt around the mask, 'expected / predicted', and the expected word's probability."""
    text = row["text"]
    at = text.find("[MASK]")
    excerpt = ("..." if at > 25 else "") + text[max(0, at - 25): at + 31] + "..."
    return excerpt, f"{row['expected']} / {row['prediction']}", f"{row['probability']:.2g}"

