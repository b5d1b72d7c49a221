"""Cloze cases: real sentences with one content word masked, to test a masked LM's predictions.

``cloze_cases`` builds them from documents (or from the decoded chunks a model was trained on);
``lmcheck.masked.mask_fill_accuracy`` scores a model on them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from lmcheck._validate import check_int, check_seed, describe
from lmcheck.errors import InputError, ModelError

__all__ = ["ClozeCase", "cloze_cases"]


@dataclass(frozen=True)
class ClozeCase:
    """A text with exactly one mask token and the word or words accepted there."""

    text: str  # e.g. "Life is like a [MASK] of chocolates."
    answers: tuple[str, ...]  # e.g. ("box",); each must be one token of the vocabulary


def cloze_cases(
    tokenizer: PreTrainedTokenizerBase, documents: Any, *, n: int = 20, seed: int = 0,
    context: str = "sentence", min_words: int = 8, max_tokens: int = 128,
    stop_words: frozenset[str] | None = None,
) -> tuple[ClozeCase, ...]:
    """Cloze cases from real text: one whole-word content token masked per case, seeded.

    A word qualifies when it is a single vocabulary token (the tokenizer does not split it into
    pieces such as ``chocolate`` + ``##s``), alphabetic, at least 3 letters long, and not a stop
    word. Cases are spread over the sentences (or texts) in a seeded order, one per sentence
    before any sentence gives a second.

    Args:
        tokenizer: a fast tokenizer with a mask token (word offsets locate the word to mask).
        documents: a ``datasets.Dataset`` with a ``text`` column, or a list of str (documents,
            or the decoded chunks a model was trained on).
        n: the number of cases.
        seed: the random seed; the same arguments always give the same cases.
        context: ``"sentence"`` (the case text is one sentence) or ``"text"`` (the whole text,
            e.g. a training chunk as the model saw it in training).
        min_words: shorter sentences are skipped.
        max_tokens: longer case texts (special tokens included) are skipped.
        stop_words: lower-case words never masked (default: a common English list).

    Raises:
        InputError: bad arguments, or the documents hold fewer than ``n`` qualifying words.
        ModelError: the tokenizer has no mask token or is not a fast tokenizer.
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase) or not tokenizer.is_fast:
        raise ModelError(f"'tokenizer' must be a fast Hugging Face tokenizer, which gives word "
                         f"offsets (got {describe(tokenizer)})")
    if tokenizer.mask_token is None:
        raise ModelError(f"'tokenizer' must have a mask token ({type(tokenizer).__name__} has none)")
    for argument, value, low in (("n", n, 1), ("min_words", min_words, 1), ("max_tokens", max_tokens, 3)):
        check_int(value, argument, low)
    if not isinstance(context, str) or context not in ("sentence", "text"):
        raise InputError(f"'context' must be 'sentence' or 'text' (got {describe(context)})")
    check_seed(seed)
    stops = _STOP_WORDS if stop_words is None else stop_words
    units = [unit for text in _document_texts(documents)
             for unit in (_sentences(text, min_words) if context == "sentence" else [text.strip()])
             if unit]
    rng = random.Random(seed)
    rng.shuffle(units)
    choices: dict[int, list[tuple[int, int, int]]] = {}
    cases: list[ClozeCase] = []
    while len(cases) < n:
        added = False
        for u, unit in enumerate(units):
            if u not in choices:
                choices[u] = _maskable_words(tokenizer, unit, stops, max_tokens)
                rng.shuffle(choices[u])
            if choices[u]:
                start, end, token_id = choices[u].pop()
                cases.append(ClozeCase(unit[:start] + tokenizer.mask_token + unit[end:],
                                       (str(tokenizer.decode([token_id])).strip(),)))
                added = True
                if len(cases) == n:
                    break
        if not added:
            raise InputError(f"'documents' give only {len(cases)} cloze cases, fewer than n={n} "
                             f"(context={context!r}, min_words={min_words}, max_tokens={max_tokens})")
    return tuple(cases)


def _document_texts(documents: Any) -> list[str]:
    if hasattr(documents, "column_names"):
        if "text" not in documents.column_names:
            raise InputError(f"'documents' must have a 'text' column (found {documents.column_names})")
        documents = list(documents["text"])
    if isinstance(documents, str) or not isinstance(documents, Sequence) or not documents:
        raise InputError(f"'documents' must be a non-empty list of str or a Dataset (got {describe(documents)})")
    for index, text in enumerate(documents):
        if not isinstance(text, str):
            raise InputError(f"'documents[{index}]' must be a str (got {describe(text)})")
    return list(documents)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def _sentences(text: str, min_words: int) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.split()) >= min_words]


def _maskable_words(
    tokenizer: PreTrainedTokenizerBase, text: str, stops: frozenset[str], max_tokens: int,
) -> list[tuple[int, int, int]]:
    """(start, end, token id) of each word in text that is one whole content token."""
    encoded = tokenizer(text, return_offsets_mapping=True)
    if len(encoded["input_ids"]) > max_tokens:
        return []
    tokens_of_word: dict[int, list[int]] = {}
    for token_index, word in enumerate(encoded.word_ids()):
        if word is not None:
            tokens_of_word.setdefault(word, []).append(token_index)
    found = []
    for token_indices in tokens_of_word.values():
        if len(token_indices) != 1:
            continue  # split into pieces (chocolate + ##s): one mask cannot stand for it
        token_id = encoded["input_ids"][token_indices[0]]
        start, end = encoded["offset_mapping"][token_indices[0]]
        word = text[start:end]
        if word.isalpha() and len(word) >= 3 and word.lower() not in stops \
                and token_id not in tokenizer.all_special_ids:
            found.append((start, end, token_id))
    return found


_STOP_WORDS = frozenset("""
a about above after again against all also am among an and any are as at be because been before
being below between both but by can could did do does doing down during each either else ever few
for from further had has have having he her here hers herself him himself his how however if in
into is it its itself just like many may me might more most much must my myself neither no nor not
now of off on once one only or other others our ours ourselves out over own same shall she should
since so some such than that the their theirs them themselves then there these they this those
though through thus to too under until up upon very was we were what when where whether which while
who whom whose why will with within without would yet you your yours yourself yourselves
""".split())
