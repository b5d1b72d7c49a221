"""Documents and fixed-length chunks: the data side of the tutorial's pretraining chapter.

``load_documents("wiki-sample")`` gives real Wikipedia articles from the offline assets;
``split_documents`` makes the tutorial's seeded train/validation split; ``chunk_documents``
cuts documents into ``context_length``-token blocks exactly as the tutorial does (truncation
with overflowing tokens, only full-length blocks kept) and says what it dropped.
"""

from __future__ import annotations

import bz2
import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import mwparserfromhell
import torch
from transformers import PreTrainedTokenizerBase

from lmcheck import assets
from lmcheck._validate import check_int, check_path, check_seed, check_tokenizer, describe
from lmcheck.errors import InputError

__all__ = [
    "ChunkStats",
    "Chunks",
    "chunk_documents",
    "load_documents",
    "parse_wiki_dump",
    "split_documents",
]

_PARSER_VERSION = "2"  # bump when the cleaning changes, so cached text is parsed again
WIKI_DUMP_ASSET = "wiki-dump"  # the asset "wiki-sample" is parsed from (about 9 s, then cached)
_SOURCES = ("wiki-sample", "wikipedia", "a .jsonl/.json/.parquet/.txt file or a folder of .txt")


def load_documents(source: str | os.PathLike[str]) -> datasets.Dataset | datasets.IterableDataset:
    """Documents with ``title`` and ``text`` columns.

    Args:
        source: ``"wiki-sample"`` (106 real articles from the offline assets, parsed once and
            cached), ``"wikipedia"`` (the Hub's ``wikimedia/wikipedia`` ``20231101.en``,
            streamed: an ``IterableDataset``; needs network), or a local path: ``.jsonl`` /
            ``.json`` / ``.parquet`` with a ``text`` column, a ``.txt`` file (one document), or
            a folder of ``.txt`` files (one document each).

    Raises:
        InputError: unknown source, missing file, or no ``text`` column.
    """
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise InputError(f"'source' must be one of {', '.join(_SOURCES)} (got {describe(source)})")
    if str(source) == "wiki-sample":
        return datasets.Dataset.from_list(_wiki_sample_rows())
    if str(source) == "wikipedia":
        stream = datasets.load_dataset(
            "wikimedia/wikipedia", "20231101.en", split="train", streaming=True
        )
        return stream.select_columns(["title", "text"])
    return _load_local(Path(source))


def _load_local(path: Path) -> datasets.Dataset:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise InputError(f"'source' folder {str(path)!r} holds no .txt files")
        return datasets.Dataset.from_list(
            [{"title": f.stem, "text": f.read_text(encoding="utf-8")} for f in files]
        )
    if not path.is_file():
        raise InputError(
            f"'source' must be one of {', '.join(_SOURCES)} (got {str(path)!r}, which does not exist)"
        )
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return datasets.Dataset.from_list(
            [{"title": path.stem, "text": path.read_text(encoding="utf-8")}]
        )
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if suffix not in builders:
        raise InputError(f"'source' file must end in .jsonl, .json, .parquet or .txt (got {path.name!r})")
    loaded = datasets.load_dataset(builders[suffix], data_files=str(path), split="train")
    if "text" not in loaded.column_names:
        raise InputError(
            f"'source' {path.name!r} must have a 'text' column (found {loaded.column_names})"
        )
    if "title" not in loaded.column_names:
        loaded = loaded.add_column("title", [f"{path.stem}[{i}]" for i in range(len(loaded))])
    return loaded.select_columns(["title", "text"])


def _wiki_sample_rows() -> list[dict[str, str]]:
    dump = assets.asset_path(WIKI_DUMP_ASSET)
    cached = assets.derived_dir("wiki-sample") / f"{assets.ASSETS[WIKI_DUMP_ASSET].sha256[:12]}-v{_PARSER_VERSION}.jsonl"
    if cached.is_file():
        with open(cached, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]
    rows = list(parse_wiki_dump(dump))
    partial = cached.with_name(f".{cached.name}.{os.getpid()}")
    with open(partial, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(partial, cached)  # concurrent parsers each write whole files; last one wins
    return rows


def parse_wiki_dump(path: str | os.PathLike[str]) -> Iterator[dict[str, str]]:
    """Yield ``{"title", "text"}`` for each real article (namespace 0, not a redirect) of a
    MediaWiki XML dump (``.xml`` or ``.xml.bz2``), with the markup stripped to plain text.

    The path is checked at once (InputError if it is not an existing file), not at the first item.
    """
    source = check_path(path, "path")
    if not source.is_file():
        raise InputError(f"'path' must be a MediaWiki XML dump file (got {str(source)!r}, which is not a file)")
    return _parse_wiki_dump(source)


def _parse_wiki_dump(path: Path) -> Iterator[dict[str, str]]:
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rb") as handle:
        for _, element in ET.iterparse(handle, events=("end",)):
            if _local(element.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in element}
            namespace = fields.get("ns")
            revision = fields.get("revision")
            if namespace is not None and namespace.text == "0" and "redirect" not in fields and revision is not None:
                wikitext = next(
                    (child.text or "" for child in revision if _local(child.tag) == "text"), ""
                )
                text = wiki_to_text(wikitext)
                if text:
                    yield {"title": fields["title"].text or "", "text": text}
            element.clear()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


_REFS = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref\s*>|<!--.*?-->", re.DOTALL | re.IGNORECASE)
_LEFTOVER = re.compile(r"\[\[(?:File|Image|Category):[^\n]*?\]\]|\{\{[^{}\n]*\}\}", re.IGNORECASE)
_DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:")


def wiki_to_text(wikitext: str) -> str:
    """Plain text from wiki markup: no templates, references, tables, files or categories."""
    # References and comments go first, by pattern: the parser leaves some of them as text
    # when the markup around them is unbalanced.
    wikitext = _REFS.sub("", wikitext)
    code = mwparserfromhell.parse(wikitext)
    for node in code.filter_templates(recursive=True):
        _remove(code, node)
    for tag in code.filter_tags(recursive=True):
        if str(tag.tag).lower() in {"ref", "table", "gallery", "math", "references", "timeline"}:
            _remove(code, tag)
    for link in code.filter_wikilinks():
        title = str(link.title).strip().lower()
        if title.startswith(_DROP_LINK_PREFIXES) or (":" in title and len(title.split(":")[0]) <= 3):
            _remove(code, link)  # files, categories and interlanguage links ("de:...")
    text = code.strip_code(normalize=True, collapse=True)
    text = _LEFTOVER.sub("", text)
    lines = [line.strip() for line in text.splitlines()]
    paragraphs: list[str] = []
    for line in lines:
        if line.startswith(("{|", "|", "!")) or line in {"}", "}}"}:
            continue  # table syntax that strip_code leaves behind
        if line or (paragraphs and paragraphs[-1]):
            paragraphs.append(line)
    return "\n".join(paragraphs).strip()


def _remove(code: Any, node: Any) -> None:
    try:
        code.remove(node)
    except ValueError:
        pass  # already removed with its parent


def split_documents(
    documents: datasets.Dataset, *, n_train: int = 50, n_valid: int = 50, seed: int = 0
) -> datasets.DatasetDict:
    """A seeded shuffle, then disjoint ``train`` and ``validation`` splits of the documents.

    Raises:
        InputError: counts that are not positive integers, or more than there are documents.
    """
    if not isinstance(documents, datasets.Dataset):
        raise InputError(f"'documents' must be a datasets.Dataset (got {describe(documents)})")
    for argument, value in (("n_train", n_train), ("n_valid", n_valid)):
        check_int(value, argument, 0)
    if n_train == 0:
        raise InputError("'n_train' must be at least 1 (got 0)")
    check_seed(seed)
    if n_train + n_valid > len(documents):
        raise InputError(
            f"'n_train' + 'n_valid' must be at most the number of documents, {len(documents)} "
            f"(got {n_train} + {n_valid} = {n_train + n_valid})"
        )
    shuffled = documents.shuffle(seed=seed)
    return datasets.DatasetDict(
        train=shuffled.select(range(n_train)),
        validation=shuffled.select(range(n_train, n_train + n_valid)),
    )


@dataclass(frozen=True)
class ChunkStats:
    """What chunking kept and what it dropped."""

    context_length: int
    documents: int
    chunks: int
    tokens_total: int
    tokens_kept: int
    tokens_dropped: int  # the remainder of each document shorter than one block
    documents_without_chunks: int  # documents shorter than context_length

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        share = self.tokens_dropped / self.tokens_total if self.tokens_total else 0.0
        return (
            f"{self.documents} documents -> {self.chunks} chunks of {self.context_length} tokens "
            f"({self.tokens_kept:,} tokens kept, {self.tokens_dropped:,} dropped = {share:.1%}; "
            f"{self.documents_without_chunks} documents too short for one chunk)"
        )


class Chunks(NamedTuple):
    """``chunk_documents``' result: unpack as ``chunks, stats = chunk_documents(...)``."""

    dataset: datasets.Dataset  # columns: input_ids (each exactly context_length), document
    stats: ChunkStats


def chunk_documents(
    tokenizer: PreTrainedTokenizerBase,
    documents: datasets.Dataset | Sequence[str],
    context_length: int = 128,
) -> Chunks:
    """Cut documents into blocks of exactly ``context_length`` tokens, as the tutorial does.

    Each document is tokenized with truncation and ``return_overflowing_tokens=True``, which
    yields consecutive blocks; only blocks of full length are kept, so each document's last,
    shorter block is dropped (and counted). A document shorter than ``context_length`` gives
    no chunk: it is counted in ``documents_without_chunks``, not an error.

    Returns:
        ``Chunks(dataset, stats)``: ``dataset`` has ``input_ids`` and ``document`` (the index
        of the source document) columns.

    Raises:
        InputError: ``context_length`` is not a positive int; documents without text.
    """
    check_tokenizer(tokenizer)
    check_int(context_length, "context_length", 1)
    texts = _texts_of(documents)
    if not texts:
        raise InputError("'documents' must hold at least one document (got none)")
    encoded = tokenizer(
        texts,
        truncation=True,
        max_length=context_length,
        return_overflowing_tokens=True,
        return_length=True,
    )
    kept_ids: list[list[int]] = []
    kept_docs: list[int] = []
    total = kept = 0
    for ids, length, doc in zip(
        encoded["input_ids"], encoded["length"], encoded["overflow_to_sample_mapping"], strict=False
    ):
        total += length
        if length == context_length:
            kept_ids.append(list(ids))
            kept_docs.append(int(doc))
            kept += length
    stats = ChunkStats(
        context_length=context_length,
        documents=len(texts),
        chunks=len(kept_ids),
        tokens_total=total,
        tokens_kept=kept,
        tokens_dropped=total - kept,
        documents_without_chunks=len(texts) - len(set(kept_docs)),
    )
    dataset = datasets.Dataset.from_dict({"input_ids": kept_ids, "document": kept_docs})
    return Chunks(dataset, stats)


def _texts_of(documents: datasets.Dataset | Sequence[str]) -> list[str]:
    if isinstance(documents, datasets.Dataset):
        if "text" not in documents.column_names:
            raise InputError(
                f"'documents' must have a 'text' column (found {documents.column_names})"
            )
        texts = list(documents["text"])
    elif isinstance(documents, Iterable) and not isinstance(documents, (str, bytes, Mapping, torch.Tensor)):
        texts = list(documents)  # lists, tuples, a datasets column, ...
    else:
        raise InputError(
            f"'documents' must be a datasets.Dataset or a list of str (got {describe(documents)})"
        )
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"'documents[{index}]' must be a str (got {describe(text)})")
    return texts
