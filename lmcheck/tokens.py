"""Tokenizers: loading them offline, looking inside, and checking the round trip.

``load_tokenizer("gpt2")`` and ``load_tokenizer("bert-base-uncased")`` build the real Hugging
Face tokenizers from vocabulary files in the offline assets; any other name or path goes to
``AutoTokenizer.from_pretrained`` (which honours ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, BertTokenizer, GPT2Tokenizer, PreTrainedTokenizerBase

from lmcheck import assets
from lmcheck._finite import probe
from lmcheck._validate import check_texts, check_tokenizer, describe
from lmcheck.errors import InputError
from lmcheck.results import Result

__all__ = ["TokenRow", "TokenTable", "inspect_tokens", "load_tokenizer", "round_trip"]

# name -> (tokenizer class, {asset: file name in the folder}, expected length, extra settings)
_EMBEDDED: dict[str, tuple[Any, dict[str, str], int, dict[str, Any]]] = {
    "gpt2": (
        GPT2Tokenizer,
        {"gpt2-vocab": "vocab.json", "gpt2-merges": "merges.txt"},
        50257,
        {"model_max_length": 1024},
    ),
    "bert-base-uncased": (
        BertTokenizer,
        {"bert-uncased-vocab": "vocab.txt"},
        30522,
        {"model_max_length": 512, "do_lower_case": True},
    ),
}


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a tokenizer: an embedded one by name, or any Hugging Face name or local folder.

    Args:
        name_or_path: ``"gpt2"`` or ``"bert-base-uncased"`` (built offline from lmcheck's assets),
            or anything ``AutoTokenizer.from_pretrained`` accepts.

    Raises:
        InputError: the name is not a string or path, or it is neither cached nor reachable.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise InputError(
            f"'name_or_path' must be a tokenizer name or folder (got {describe(name_or_path)})"
        )
    name = str(name_or_path)
    if name in _EMBEDDED:
        return _load_embedded(name)
    try:
        # trust_remote_code stays False: a tokenizer's own code is never run without consent.
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise InputError(
            f"tokenizer {name!r} is neither a local folder nor in the Hugging Face cache, and "
            f"could not be downloaded ({str(error).splitlines()[0]}); lmcheck's offline "
            f"tokenizers are {', '.join(sorted(_EMBEDDED))}"
        ) from None


def _load_embedded(name: str) -> PreTrainedTokenizerBase:
    cls, files, expected_length, settings = _EMBEDDED[name]
    folder = assets.derived_dir(f"tokenizers/{name}")
    for asset_name, filename in files.items():
        target = folder / filename
        if not target.is_file():
            partial = folder / f".{filename}.{os.getpid()}"
            shutil.copyfile(assets.asset_path(asset_name), partial)
            os.replace(partial, target)
    tokenizer = cls.from_pretrained(str(folder), **settings)
    # transformers 5 silently builds an empty tokenizer from files it does not read: check.
    if len(tokenizer) != expected_length:
        raise assets.AssetError(
            f"tokenizer {name!r} built from {folder} has {len(tokenizer)} tokens, expected "
            f"{expected_length}; delete that folder and run 'lmcheck assets verify'"
        )
    tokenizer.name_or_path = name
    return tokenizer


@dataclass(frozen=True)
class TokenRow:
    """One token of an encoded text."""

    position: int
    id: int
    token: str  # the vocabulary entry, e.g. "Ġbeach" or "##s"
    piece: str  # what the id decodes to on its own, e.g. " beach" or "s"
    special: bool
    attention_mask: int


class TokenTable(tuple[TokenRow, ...]):
    """The rows of :func:`inspect_tokens`; ``str()`` gives an aligned table."""

    @property
    def input_ids(self) -> list[int]:
        return [row.id for row in self]

    @property
    def attention_mask(self) -> list[int]:
        return [row.attention_mask for row in self]

    def __str__(self) -> str:
        header = ("pos", "id", "token", "decoded", "special", "mask")
        rows = [
            (str(r.position), str(r.id), r.token, repr(r.piece), "yes" if r.special else "",
             str(r.attention_mask))
            for r in self
        ]
        widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)).rstrip()
                 for line in (header, *rows)]
        return "\n".join(lines)


def inspect_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> TokenTable:
    """One row per token of ``text`` as the tokenizer encodes it, special tokens included.

    Example:
        >>> table = inspect_tokens(load_tokenizer("gpt2"), "Swimming at the beach is")
        >>> table.input_ids
        [10462, 27428, 379, 262, 10481, 318]
    """
    check_tokenizer(tokenizer)
    _check_text(text, "text")
    encoding = tokenizer(text)
    ids = list(encoding["input_ids"])
    mask = list(encoding.get("attention_mask", [1] * len(ids)))
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return TokenTable(
        TokenRow(i, token_id, str(token), str(tokenizer.decode([token_id])), token_id in special,
                 int(m))
        for i, (token_id, token, m) in enumerate(zip(ids, tokens, mask, strict=False))
    )


@probe("round_trip")
def round_trip(
    tokenizer: PreTrainedTokenizerBase, texts: str | Iterable[str], *, allow_unknown: bool = False,
    name: str = "round_trip",
) -> Result:
    """Check that decoding the encoding gives the text back.

    Byte-level BPE (GPT-2) must return the text exactly. Other tokenizers normalise (lower-case,
    strip accents, split punctuation), so for them the check is that the decoded text encodes
    to the same ids again, and that nothing was lost to the unknown token: ``[UNK]`` decodes and
    re-encodes to itself, yet the characters behind it are gone.

    Args:
        allow_unknown: count unknown tokens without failing. Either way ``metrics`` has
            ``unknown_tokens`` (the count) and ``lost_to_unknown``: one row per text with unknown
            tokens (``index``, ``unknown``, ``lost``: the source text behind its first one).
    """
    if not callable(getattr(tokenizer, "encode", None)) or not callable(getattr(tokenizer, "decode", None)) \
            or isinstance(tokenizer, (str, bytes)):
        raise InputError(f"'tokenizer' must be a tokenizer with encode() and decode(), e.g. "
                         f"lmcheck.load_tokenizer('gpt2') (got {describe(tokenizer)})")
    items = check_texts(texts, "texts")
    byte_level = _is_byte_level(tokenizer)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    failures: list[dict[str, Any]] = []
    lost_rows: list[dict[str, Any]] = []
    unknown_total = 0
    encoded = _encode_all(tokenizer, items)
    decoded = _decode_all(tokenizer, encoded)
    again = encoded if byte_level else _encode_all(tokenizer, decoded)
    for index, (text, ids, back, ids_again) in enumerate(zip(items, encoded, decoded, again, strict=True)):
        unknown = ids.count(unk_id) if unk_id is not None and not byte_level else 0
        unknown_total += unknown
        if byte_level:
            if back != text:
                failures.append({"index": index, **_first_difference(text, back)})
            continue
        if unknown:
            lost_rows.append({"index": index, "unknown": unknown, "lost": _unknown_text(tokenizer, text)})
        if ids_again != ids:
            failures.append({"index": index, **_first_difference(ids, ids_again)})
        elif unknown and not allow_unknown:
            failures.append(lost_rows[-1])
    mode = ("exact text" if byte_level else "same ids after decode and re-encode"
            + ("" if allow_unknown else ", nothing lost to the unknown token"))
    passed = not failures
    if passed:
        explanation = f"all {len(items)} texts round-trip ({mode})"
        if unknown_total:
            explanation += f"; {unknown_total} unknown tokens allowed"
    else:
        first = failures[0]
        where = (
            f"{first['unknown']} pieces became {tokenizer.unk_token}, e.g. {first['lost']!r}"
            if "unknown" in first else
            f"first differs at {first['at']}: {first['expected']!r} became {first['got']!r}"
        )
        explanation = (f"{len(failures)} of {len(items)} texts do not round-trip ({mode}); "
                       f"text {first['index']}: {where}")
    return Result(
        name=name,
        passed=passed,
        metrics={"texts": len(items), "failures": len(failures), "mode": mode,
                 "unknown_tokens": unknown_total, "lost_to_unknown": lost_rows},
        explanation=explanation,
        details=tuple(failures),
    )


def _encode_all(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """The ids of every text, no special tokens: one batch call for a fast tokenizer (it runs on
    every core), one text at a time for any other."""
    # verbose=False: long documents are expected here, not a mistake worth a warning
    if getattr(tokenizer, "is_fast", False):
        return list(tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"])
    return [tokenizer.encode(text, add_special_tokens=False, verbose=False) for text in texts]


def _decode_all(tokenizer: PreTrainedTokenizerBase, rows: Sequence[list[int]]) -> list[str]:
    if getattr(tokenizer, "is_fast", False):
        return list(tokenizer.batch_decode(list(rows)))
    return [str(tokenizer.decode(row)) for row in rows]


def _unknown_text(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """The source text behind the first unknown token (fast tokenizers give offsets)."""
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except (NotImplementedError, ValueError, TypeError):
        return "?"
    for token_id, (start, stop) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
        if token_id == tokenizer.unk_token_id:
            return text[start:stop]
    return "?"


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


def _first_difference(expected: Sequence[Any], got: Sequence[Any]) -> dict[str, Any]:
    at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
              min(len(expected), len(got)))
    return {"at": at, "expected": expected[max(0, at - 10): at + 10],
            "got": got[max(0, at - 10): at + 10]}


def _check_text(text: object, argument: str) -> None:
    if not isinstance(text, str):
        raise InputError(f"'{argument}' must be a str (got {describe(text)})")
    if not text:
        raise InputError(f"'{argument}' must be a non-empty str (got '')")


def tokenizer_folder(name: str) -> Path:
    """Where an embedded tokenizer's files live (built on first use)."""
    _load_embedded(name)
    return assets.derived_dir(f"tokenizers/{name}")
