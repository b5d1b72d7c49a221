"""Chapter 1: what a tokenizer takes and gives."""

from __future__ import annotations

from lmcheck.corpus import chunk_documents, load_documents, split_documents
from lmcheck.recipes import DEFAULTS
from lmcheck.report import Report
from lmcheck.tokens import inspect_tokens, load_tokenizer, round_trip
from lmcheck.tutorial import expect_equal, expected

TITLE = "Chapter 1: tokenizers"


def run(report: Report, *, quick: bool = False, out: str = "lmcheck-out") -> None:
    report.title(TITLE)
    report.text(
        "A language model never sees text: a tokenizer maps text to integer ids (input_ids),\n"
        "says which positions are real tokens (attention_mask), and maps ids back to text."
    )
    bert = load_tokenizer(DEFAULTS["masked_tokenizer"])
    gpt2 = load_tokenizer(DEFAULTS["causal_tokenizer"])
    for tokenizer, text, ids in (
        (bert, DEFAULTS["masked_sentence"], list(expected.BERT_SENTENCE_IDS)),
        (gpt2, DEFAULTS["causal_prompt"], list(expected.GPT2_PROMPT_IDS)),
    ):
        table = inspect_tokens(tokenizer, text)
        report.table(
            ("pos", "id", "token", "decoded", "special", "mask"),
            ((r.position, r.id, r.token, repr(r.piece), "yes" if r.special else "", r.attention_mask)
             for r in table),
            title=f"{tokenizer.name_or_path} ({len(tokenizer):,} tokens): {text!r}",
        )
        report.text(f"input_ids      = {table.input_ids}\nattention_mask = {table.attention_mask}")
        report.result(expect_equal(f"{tokenizer.name_or_path}_input_ids", table.input_ids, ids))
    report.text(
        "BERT adds [CLS] at the start and [SEP] at the end and lower-cases ('chocolates' is\n"
        "'chocolate' + '##s'); GPT-2 adds nothing and keeps the leading space in each token."
    )
    report.result(expect_equal("bert_decode_7967", bert.decode([7967]), "chocolate"))
    report.result(expect_equal("gpt2_decode_257", gpt2.decode([257]), " a"))

    documents = load_documents(DEFAULTS["documents"])
    split = split_documents(documents, n_train=DEFAULTS["n_train"], n_valid=DEFAULTS["n_valid"],
                            seed=DEFAULTS["split_seed"])
    report.text(
        f"\nThe Wikipedia sample: {len(documents)} articles; a seeded split gives "
        f"{len(split['train'])} training and {len(split['validation'])} validation documents."
    )
    for name, part in split.items():
        chunks, stats = chunk_documents(gpt2, part, DEFAULTS["context_length"])
        report.text(f"{name}: {stats}")
        lengths = set(map(len, chunks["input_ids"]))
        report.result(expect_equal(f"chunk_lengths_{name}", sorted(lengths), [DEFAULTS["context_length"]]))
    report.result(round_trip(gpt2, documents["text"], name="gpt2_round_trip_wiki_sample"))
    wordpiece = round_trip(bert, documents["text"], allow_unknown=True, name="bert_round_trip_wiki_sample")
    lost_rows = wordpiece.metrics["lost_to_unknown"]
    lost = ", ".join(repr(row["lost"]) for row in lost_rows)
    report.text(
        f"GPT-2's byte-level BPE gives every article back exactly. BERT's WordPiece has an unknown\n"
        f"token: {wordpiece.metrics['unknown_tokens']} pieces in {len(lost_rows)} articles ({lost}, ...) "
        "become [UNK] and are lost; apart from those, decoding and re-encoding give the same ids."
    )
    report.result(wordpiece)

