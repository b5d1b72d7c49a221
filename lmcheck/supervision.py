"""Is a causal-LM training batch supervising what it should? The silent collator and chat-template
bugs, read from one collated batch and the ids that end a sequence or a turn.

Rows come in two shapes, and the rules follow the data:

- **whole rows**: every real token after the first is supervised (plain text, packed chunks);
  with ``expect_eos`` (whole examples, padded), each row ends with a supervised eos, trailing
  whitespace after it allowed;
- **masked rows**: some real tokens are left out (-100) on purpose: a prompt, the user's turns
  of a chat (assistant-only or completion-only SFT). Each supervised span must then end with an
  end-of-turn token that is itself supervised (trailing whitespace after it allowed, as ChatML's
  ``\\n`` after ``<|im_end|>``); the end-of-turn tokens that close unsupervised turns are left out
  by design. A span that runs into the end of a row that fills the batch was cut at max_length,
  and a span at the end of a packed row (``expect_eos`` False) may go on in the next row.

The ids that end a turn are the tokenizer's eos, the token the chat template writes after an
assistant's message (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), and any ``end_ids`` given
(the model's config and generation config, in the setup checks).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch

from lmcheck._finite import probe
from lmcheck._model import IGNORE_INDEX
from lmcheck._validate import as_ids, as_mask, check_bool, check_fraction, check_tokenizer, describe
from lmcheck.errors import InputError
from lmcheck.packing import document_starts
from lmcheck.results import Result

__all__ = ["batch_supervision", "end_of_turn_ids", "template_end_of_turn", "template_turn_headers"]


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """The ids that end a sequence or a turn for ``tokenizer``: its eos and the first token its
    chat template writes after an assistant's message (none where it has no template, or the
    template cannot render a two-message chat)."""
    check_tokenizer(tokenizer)
    ids = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    return ids | template_end_of_turn(tokenizer)


def template_end_of_turn(tokenizer: Any) -> set[int]:
    """The first token ``tokenizer``'s chat template writes after an assistant's message, as a
    set of one id (empty where it has no template, or the template cannot render a two-message
    chat, or what follows is not a special token)."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    marker = "lmcheckpong"
    chat = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        tail = text[text.rindex(marker) + len(marker):]
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    except Exception:  # a template that needs a system turn, tools or other roles: nothing learned
        return set()
    special = set(getattr(tokenizer, "all_special_ids", ()))
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return {ids[0]} if ids and ids[0] in special else set()


def template_turn_headers(tokenizer: Any) -> dict[str, tuple[int, ...]]:
    """The ids the chat template writes before a message of each role (``system``, ``user``,
    ``assistant``), from the token that opens a turn (``<|im_start|>``, ``<|start_header_id|>``,
    ``<start_of_turn>``) to the message's first token: ChatML's ``<|im_start|>user\n``. Read off
    the template's own rendering of a short chat; empty where it has no template, cannot render
    one, or opens its turns with no special token (then the turns cannot be told apart in ids)."""
    if not getattr(tokenizer, "chat_template", None):
        return {}
    contents = {"system": "lmcheckzero", "user": "lmcheckping", "assistant": "lmcheckpong"}
    headers: dict[str, tuple[int, ...]] = {}
    for roles in (("system", "user", "assistant"), ("user", "assistant")):
        try:
            text = tokenizer.apply_chat_template([{"role": r, "content": contents[r]} for r in roles], tokenize=False)
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except Exception:  # a template that refuses a system turn, or a tokenizer without offsets
            continue
        ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
        starts = {}  # role -> the index of its message's first token
        for role in roles:
            at = text.find(contents[role])
            first = next((i for i, (a, _) in enumerate(offsets) if a == at), None)
            if at < 0 or first is None:
                break
            starts[role] = first
        else:
            special = set(getattr(tokenizer, "all_special_ids", ())) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
            ends = template_end_of_turn(tokenizer)
            # the turn opener: the first special token between the user's message and the assistant's
            # that does not end the user's turn
            between = range(starts["user"] + 1, starts["assistant"])
            opener = next((ids[i] for i in between if ids[i] in special and ids[i] not in ends
                           and offsets[i][0] >= text.find(contents["user"]) + len(contents["user"])), None)
            if opener is None:
                return {}
            for role, first in starts.items():
                begin = max((i for i in range(first) if ids[i] == opener), default=None)
                if begin is not None and role not in headers:
                    headers[role] = tuple(ids[begin:first])
    return headers if {"user", "assistant"} <= set(headers) else {}


@probe("batch_supervision")
def batch_supervision(
    batch: Mapping[str, torch.Tensor], tokenizer: Any, *, min_supervised_fraction: float = 0.0,
    expect_eos: bool = False, end_ids: Collection[int] | None = None, bos_id: int | None = None,
    completion_only: bool | None = None, assistant_only: bool = False,
) -> Result:
    """A causal-LM training batch supervises what it should: the silent collator bugs.

    Checks, each locating the first row and position at fault, the root cause first:

    - no row is wholly unsupervised (a completion-only collator that never finds its response
      template labels every token -100 and only warns: trl #598);
    - every real end-of-sequence or end-of-turn token that closes what a row supervises is
      supervised (a collator that pads with eos labels the real eos -100 too, so the model
      never learns to stop: transformers #23530; a chat template that leaves the end-of-turn
      token out of the assistant's mask: trl PR #5988);
    - in masked rows (prompt or user turns left out), each supervised span ends with an
      end-of-turn token; with ``expect_eos=True`` (whole examples), every whole row ends with a
      supervised eos (a tokenizer that adds BOS but no EOS: transformers #22794);
    - padding (``attention_mask == 0``) is labelled -100;
    - a row starts with at most one BOS (a chat template that writes BOS, then a tokenizer that
      adds another: sglang #888);
    - where the tokenizer has a chat template, the rows' turns are found by the ids the template
      writes before each role's message: in a setup that trains on completions only, no token
      of a user or system turn is supervised, nor an assistant's header (the generation prompt:
      a prompt rendered without ``add_generation_prompt=True`` gives it to the completion, trl
      #4147; a dropped assistant mask: nanochat PR #582), and with ``assistant_only`` every
      assistant turn is (but one cut at the end of a full row);
    - ``labels`` does not share memory with ``input_ids``;
    - the supervised share of real tokens is reported, and must reach ``min_supervised_fraction``.

    Args:
        batch: ``input_ids``, ``labels`` (unshifted, -100 ignored), optional ``attention_mask``.
        tokenizer: a Hugging Face tokenizer, for its eos and BOS, its chat template's end-of-turn
            token and which tokens are whitespace; or None.
        end_ids: more ids that end a sequence or a turn (a model's ``eos_token_id``); without a
            tokenizer, the only ones.
        bos_id: the BOS id, where the tokenizer has none (or there is no tokenizer).
        completion_only: the setup trains on completions (or assistant turns) only; None: read
            from the batch, where some row leaves a whole user turn out.
        assistant_only: the setup trains on every assistant turn (TRL's ``assistant_only_loss``).

    Without a tokenizer, ``end_ids`` nor ``bos_id``, the eos and BOS checks are skipped, and the
    explanation says so.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
        raise InputError(f"'batch' must be a mapping of tensors with 'input_ids' and 'labels', as a "
                         f"collator returns (got {describe(batch)})")
    if tokenizer is not None:
        check_tokenizer(tokenizer)
    check_fraction(min_supervised_fraction, "min_supervised_fraction")
    check_bool(expect_eos, "expect_eos")
    check_bool(assistant_only, "assistant_only")
    if completion_only is not None:
        check_bool(completion_only, "completion_only")
    if end_ids is not None and (not isinstance(end_ids, (list, tuple, set, frozenset)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in end_ids)):
        raise InputError(f"'end_ids' must be a list, tuple or set of token ids, ints (got {describe(end_ids)})")
    if bos_id is not None and (not isinstance(bos_id, int) or isinstance(bos_id, bool)):
        raise InputError(f"'bos_id' must be a token id, an int (got {describe(bos_id)})")
    inputs = as_ids(batch["input_ids"], "batch['input_ids']")  # (B, T)
    labels = as_ids(batch["labels"], "batch['labels']")
    if labels.shape != inputs.shape:
        raise InputError(f"'batch['labels']' must have the shape of input_ids {tuple(inputs.shape)} "
                         f"(got {tuple(labels.shape)})")
    mask = batch.get("attention_mask")
    real = (torch.ones_like(inputs, dtype=torch.bool) if mask is None
            else as_mask(mask, inputs, "batch['attention_mask']").bool())
    supervised = labels != IGNORE_INDEX
    target = supervised & real
    target[:, 0] = False  # position 0 is never a target, whatever its label
    problems: list[str] = []
    raw_inputs, raw_labels = batch["input_ids"], batch["labels"]
    if isinstance(raw_inputs, torch.Tensor) and isinstance(raw_labels, torch.Tensor) and \
            raw_inputs.untyped_storage().data_ptr() == raw_labels.untyped_storage().data_ptr():
        problems.append("labels share memory with input_ids: a loss mask written into the labels in "
                        "place (labels[...] = -100) overwrites the inputs too (Fast-LLM #253); clone the "
                        "labels")
    ends = set(end_ids or ()) | (end_of_turn_ids(tokenizer) if tokenizer is not None else set())
    empty = [row for row in range(inputs.shape[0]) if not bool(target[row].any())]
    if empty:
        problems.insert(0, f"{len(empty)} of {inputs.shape[0]} rows supervise no token (first: row {empty[0]}): "
                        f"they add nothing to the loss; a completion-only collator that never found its "
                        f"response template does this (trl #598)")
    masked_rows = 0
    # a packed row's documents (position ids that restart) are judged as rows of their own: a span
    # that runs into the end of the longest document was cut at max_length, as in a full padded row
    documents = _documents(inputs, real, target, batch.get("position_ids"))
    if ends:
        blank = _Whitespace(tokenizer)
        pads = set(inputs[~real].unique().tolist())  # the ids the collator padded with
        if getattr(tokenizer, "pad_token_id", None) is not None:
            pads.add(tokenizer.pad_token_id)
        if documents is None:
            findings = _end_problems(inputs, real, target, ends, blank, expect_eos, set(empty), pads)
        else:
            findings = _end_problems(*documents, ends, blank, expect_eos, set(), pads, documents=True)
            findings.problems = [f"{p} (rows: the packed rows' documents, in order)" for p in findings.problems]
        problems += findings.problems
        masked_rows = findings.masked_rows
    headers = template_turn_headers(tokenizer) if tokenizer is not None else {}
    turns = _Turns(*(documents or (inputs, real, target)), headers) if headers else None
    if turns is not None:
        problems += turns.problems(completion_only, assistant_only, packed=documents is not None)
    padded = ~real & supervised
    if padded.any():
        row, column = (int(i) for i in padded.nonzero()[0])
        problems.append(f"{int(padded.sum())} pad position(s) are supervised (first: row {row}, position "
                        f"{column}): label padding -100")
    bos = bos_id if bos_id is not None else getattr(tokenizer, "bos_token_id", None)
    if bos is not None and inputs.shape[1] > 1:
        rows, kept = (inputs, real) if documents is None else documents[:2]
        first_real = kept.float().argmax(dim=1)  # (B,) the first real position (left padding aside)
        starts = rows.gather(1, first_real[:, None]).squeeze(1)
        following = rows.gather(1, (first_real + 1).clamp(max=rows.shape[1] - 1)[:, None]).squeeze(1)
        doubled = ((starts == bos) & (following == bos)).nonzero()
        if len(doubled):
            problems.append(f"{len(doubled)} row(s) start with two BOS tokens (first: row {int(doubled[0])}): "
                            f"a chat template wrote one and the tokenizer added another "
                            f"(sglang #888): pass add_special_tokens=False after apply_chat_template")
    fraction = float(target[:, 1:].sum()) / max(1, int(real[:, 1:].sum()))
    if fraction < min_supervised_fraction:
        problems.append(f"{fraction:.1%} of real tokens are supervised, below {min_supervised_fraction:.0%}")
    passed = not problems
    if passed:
        explanation = (f"{fraction:.1%} of real tokens supervised; "
                       + (f"each of the {masked_rows} masked rows' supervised spans ends with a supervised "
                          f"end-of-turn token, " if masked_rows else "")
                       + ("every real eos that closes a supervised span supervised, " if ends else "")
                       + ("every whole row ends with a supervised eos, " if expect_eos and ends else "")
                       + (turns.summary() if turns is not None else "")
                       + "no empty row, pads ignored, "
                       + ("one BOS at most, " if bos is not None else "")
                       + "labels a tensor of their own"
                       + ("" if ends else " (no tokenizer and no end ids: eos not checked)")
                       + ("" if bos is not None else " (no BOS known: BOS not checked)"))
    else:
        explanation = "; ".join(problems)
    return Result(name="batch_supervision", passed=passed,
                  metrics={"supervised_fraction": fraction, "rows": int(inputs.shape[0]),
                           "unsupervised_rows": len(empty), "masked_rows": masked_rows,
                           "end_ids": sorted(ends), "turns": turns.count if turns is not None else 0},
                  threshold=min_supervised_fraction, headroom=None, explanation=explanation)


class _Turns:
    """The chat turns of each row (a packed row's documents are rows here), found where the
    template's header of a role starts; a turn runs to the next header or the row's end."""

    def __init__(self, inputs: torch.Tensor, real: torch.Tensor, target: torch.Tensor,
                 headers: dict[str, tuple[int, ...]]) -> None:
        self.target = target
        self.real = real
        self.rows: list[list[tuple[str, int, int, int]]] = []  # per row: (role, start, content start, end)
        for row in range(inputs.shape[0]):
            ids = inputs[row].tolist()
            width = int(real[row].nonzero().max()) + 1 if bool(real[row].any()) else 0
            found = sorted((at, role, len(header)) for role, header in headers.items()
                           for at in _occurrences(ids[:width], header))
            self.rows.append([(role, at, at + size, found[i + 1][0] if i + 1 < len(found) else width)
                              for i, (at, role, size) in enumerate(found)])
        self.count = sum(map(len, self.rows))
        self.prompt_only = False  # set by problems()
        self.user_left_out = any(role != "assistant" and content < end and not bool(target[row, start:end].any())
                                 for row, turns in enumerate(self.rows) for role, start, content, end in turns)

    def problems(self, completion_only: bool | None, assistant_only: bool, *, packed: bool) -> list[str]:
        where = "(rows: the packed rows' documents, in order)" if packed else ""
        trained_prompt: list[tuple[int, int, str, int, int]] = []  # (row, turn, role, supervised, first)
        untrained: list[tuple[int, int]] = []  # (row, turn) of an assistant turn with nothing supervised
        headed: list[tuple[int, int, int]] = []  # (row, turn, position) of a supervised assistant header token
        prompt_only = self.user_left_out if completion_only is None else completion_only or assistant_only
        self.prompt_only = prompt_only
        for row, turns in enumerate(self.rows):
            full = bool(self.real[row, -1])
            for index, (role, start, content, end) in enumerate(turns):
                supervised = self.target[row, start:end]
                if role != "assistant" and bool(supervised.any()):
                    trained_prompt.append((row, index, role, int(supervised.sum()),
                                           start + int(supervised.nonzero()[0])))
                header = self.target[row, start:content]
                if role == "assistant" and bool(header.any()):
                    headed.append((row, index, start + int(header.nonzero()[0])))
                cut = index == len(turns) - 1 and full
                if role == "assistant" and content < end and not bool(self.target[row, content:end].any()) and not cut:
                    untrained.append((row, index))
        out = []
        if prompt_only and trained_prompt:
            row, turn, role, count, first = trained_prompt[0]
            basis = ("the setup trains on completions only" if completion_only or assistant_only else
                     "other rows leave whole user turns out")
            out.append(f"{len(trained_prompt)} prompt turn(s) have supervised tokens, though {basis} (first: row "
                       f"{row}, turn {turn} ({role}): {count} supervised token(s) from position {first}){' ' + where if where else ''}: "
                       f"the model is trained to write the prompt; the completion or assistant mask is wrong "
                       f"(wrong prompt-completion labels: trl #4147; a dropped assistant mask: nanochat PR #582)")
        if prompt_only and headed and not trained_prompt:
            row, turn, position = headed[0]
            out.append(f"{len(headed)} assistant turn header(s) have supervised tokens, though the setup trains on "
                       f"completions only (first: row {row}, turn {turn}, position {position}){' ' + where if where else ''}: "
                       f"the header is the generation prompt, part of the prompt at inference; the prompt was "
                       f"tokenized without add_generation_prompt=True, so its header went to the completion (trl #4147)")
        if assistant_only and untrained:
            row, turn = untrained[0]
            out.append(f"{len(untrained)} assistant turn(s) supervise no token, though the setup trains on every "
                       f"assistant turn (first: row {row}, turn {turn}){' ' + where if where else ''}: the "
                       f"template's assistant mask misses them (a template without {{% generation %}} around "
                       f"every assistant message)")
        return out

    def summary(self) -> str:
        if not self.count:
            return "no chat turn found by the template's headers (turns not checked), "
        return (f"{self.count} chat turns found by the template's headers, "
                + ("no prompt turn supervised, " if self.prompt_only else
                   "prompt turns supervised too (the setup trains on whole conversations), "))


def _occurrences(ids: list[int], header: tuple[int, ...]) -> list[int]:
    """Where ``header`` starts in ``ids``."""
    first, size = header[0], len(header)
    return [i for i, token in enumerate(ids) if token == first and tuple(ids[i:i + size]) == header]


class _Findings:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.masked_rows = 0


def _end_problems(inputs: torch.Tensor, real: torch.Tensor, target: torch.Tensor, ends: set[int],
                  blank: _Whitespace, expect_eos: bool, empty: set[int], pads: set[int], *,
                  documents: bool = False) -> _Findings:
    """The end-of-sequence rules, row by row: at most one message per kind, the first row at fault.
    ``documents``: the rows are packed documents, whole but where as long as the longest."""
    found = _Findings()
    hidden: list[tuple[int, int]] = []  # (row, position) of an unsupervised end closing a span
    unended: list[tuple[int, int, int]] = []  # (row, position, token) of a span's last token
    no_eos: list[tuple[int, int, int]] = []  # whole rows: (row, last position, token)
    width = inputs.shape[1]
    for row in range(inputs.shape[0]):
        if row in empty:
            continue
        positions = real[row].nonzero().flatten().tolist()
        if len(positions) < 2:
            continue
        last_real = positions[-1]
        full = len(positions) == width  # fills the batch: may have been cut at max_length
        ids = inputs[row].tolist()
        is_target = target[row].tolist()
        masked = any(not is_target[p] for p in positions[1:])
        if not masked:
            if expect_eos and not full:
                end = _before_blank(ids, positions, len(positions) - 1, blank)
                if ids[end] not in ends:
                    no_eos.append((row, end, ids[end]))
            continue
        found.masked_rows += 1
        # the supervised spans: maximal runs of supervised real positions, as (first, last)
        # indices into ``positions``
        spans: list[list[int]] = []
        for index, position in enumerate(positions):
            if is_target[position]:
                if spans and spans[-1][1] == index - 1:
                    spans[-1][1] = index
                else:
                    spans.append([index, index])
        for first, last in spans:
            end = last  # the span's last token that is not trailing whitespace
            while end > first and ids[positions[end]] in blank:
                end -= 1
            if ids[positions[end]] in ends:
                continue
            if positions[last] == last_real and (full or not (expect_eos or documents)):
                continue  # cut at max_length, or a packed row that goes on in the next one
            following = positions[last + 1] if last + 1 < len(positions) else None
            if following is not None and ids[following] in ends:
                hidden.append((row, following))
            else:
                unended.append((row, positions[end], ids[positions[end]]))
    if hidden:
        row, position = hidden[0]
        cause = ("a collator that pads with eos labels every pad -100, and the real eos with them "
                 "(transformers #23530): give the tokenizer a pad token of its own"
                 if pads & ends else
                 "a chat template whose assistant mask stops before the end-of-turn token (trl PR #5988), "
                 "or a collator that drops it")
        found.problems.append(f"{len(hidden)} real end-of-sequence token(s) are not supervised (first: row {row}, "
                              f"position {position}), though each closes what its row supervises: the model "
                              f"never learns to stop. {cause[0].upper()}{cause[1:]}")
    if unended:
        row, position, token = unended[0]
        found.problems.append(f"{len(unended)} supervised span(s) of masked rows do not end with an end-of-turn "
                              f"token (first: row {row} ends its span at position {position} with token "
                              f"{token}, not one of {sorted(ends)}): the model never learns to end its turn; "
                              f"append eos to each completion (transformers #22794)")
    if no_eos:
        row, position, token = no_eos[0]
        found.problems.append(f"{len(no_eos)} of {inputs.shape[0]} rows do not end with eos (first: row {row} "
                              f"ends with token {token} at position {position}); the model never learns to "
                              f"stop: append eos when tokenizing (a tokenizer that adds BOS but no EOS does "
                              f"this: transformers #22794)")
    return found


def _documents(inputs: torch.Tensor, real: torch.Tensor, target: torch.Tensor, positions: object,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The documents of packed rows as right-padded rows of their own (ids, real, target), where
    ``positions`` (the batch's position ids) restart inside a row; None where none do."""
    if not isinstance(positions, torch.Tensor) or positions.shape != inputs.shape:
        return None
    pieces = []
    for row in range(inputs.shape[0]):
        kept = real[row].nonzero().flatten()
        if len(kept) < 2:
            continue
        first, last = int(kept[0]), int(kept[-1]) + 1
        bounds = [first + s for s in document_starts(positions[row, first:last])] + [last]
        pieces += [(row, a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    if len(pieces) <= inputs.shape[0]:
        return None
    width = max(b - a for _, a, b in pieces)
    ids = torch.zeros(len(pieces), width, dtype=inputs.dtype)
    kept_out = torch.zeros(len(pieces), width, dtype=torch.bool)
    target_out = torch.zeros(len(pieces), width, dtype=torch.bool)
    for index, (row, a, b) in enumerate(pieces):
        ids[index, :b - a], kept_out[index, :b - a] = inputs[row, a:b], True
        target_out[index, 1:b - a] = target[row, a + 1:b]  # a document's first token is never a target
    return ids, kept_out, target_out


def _before_blank(ids: list[int], positions: list[int], index: int, blank: _Whitespace) -> int:
    """The position of the last token of ``positions[:index + 1]`` that is not whitespace."""
    while index > 0 and ids[positions[index]] in blank:
        index -= 1
    return positions[index]


class _Whitespace:
    """``token in blank``: whether the tokenizer decodes ``token`` to whitespace only (ChatML's
    ``\n`` after ``<|im_end|>``); each id decoded once, and only those a rule asks about."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special = frozenset(getattr(tokenizer, "all_special_ids", ())) if tokenizer is not None else frozenset()
        self.known: dict[int, bool] = {}

    def __contains__(self, token: object) -> bool:
        if self.tokenizer is None or not isinstance(token, int) or token in self.special:
            return False
        if token not in self.known:
            try:
                text = self.tokenizer.decode([token])
            except Exception:  # an id the tokenizer cannot decode is no whitespace
                text = ""
            self.known[token] = text != "" and text.strip() == ""
        return self.known[token]
