"""batch_supervision against the conversation: the chat template's turn headers locate each
turn in the ids, and a setup that trains on completions (or assistant turns) only must leave
every user and system token out and, with ``assistant_only``, train every assistant turn. The
rules on TRL's SFTTrainer are in ``test_stacks.py``."""

from __future__ import annotations

import pytest
import stacks
import torch

import lmcheck
from lmcheck.errors import InputError
from lmcheck.supervision import template_turn_headers


@pytest.fixture(scope="module")
def tok():
    return stacks.chat_tokenizer()


def exchange(tok, question, answer, *more, train_prompt=False, untrained=()):
    """A ChatML conversation rendered by the template (a question and answer, then ``more`` of
    them), the answers and their <|im_end|> supervised but the ``untrained``-th ones."""
    pairs = [(question, answer), *zip(more[::2], more[1::2], strict=True)]
    messages = [{"role": r, "content": c} for q, a in pairs for r, c in (("user", q), ("assistant", a))]
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer_of = torch.tensor(ids["assistant_masks"]).diff(prepend=torch.tensor([0])).clamp(min=0).cumsum(0) - 1
    return ids["input_ids"], [t if (m and int(a) not in untrained) or train_prompt else -100
                              for t, m, a in zip(ids["input_ids"], ids["assistant_masks"], answer_of, strict=True)]


def batch(rows, pad):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([m + [-100] * (width - len(m)) for _, m in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_the_template_headers_are_read_off_its_rendering(tok):
    headers = template_turn_headers(tok)
    assert {role: tok.decode(list(ids)) for role, ids in headers.items()} == {
        "system": "<|im_start|>system\n", "user": "<|im_start|>user\n", "assistant": "<|im_start|>assistant\n"}
    plain = stacks.chat_tokenizer()
    plain.chat_template = None
    assert template_turn_headers(plain) == {}


def test_healthy_completion_only_rows_pass_and_say_the_turns(tok):
    rows = [exchange(tok, "the cat sat", "a dog ran"), exchange(tok, "the sun came up", "it was day")]
    result = lmcheck.batch_supervision(batch(rows, tok.pad_token_id), tok, completion_only=True)
    assert result.passed, result.explanation
    assert result.metrics["turns"] == 4
    assert "4 chat turns found by the template's headers, no prompt turn supervised" in result.explanation


def test_a_row_that_trains_its_prompt_beside_rows_that_do_not_fails(tok):
    """trl #4147: wrong prompt-completion labels in one row. The other rows leave their user
    turns out, so the setup trains on completions; the row and the turn are named."""
    rows = [exchange(tok, "the cat sat", "a dog ran"), exchange(tok, "the sun came up", "it was day", train_prompt=True)]
    result = lmcheck.batch_supervision(batch(rows, tok.pad_token_id), tok)
    assert not result.passed
    assert "1 prompt turn(s) have supervised tokens, though other rows leave whole user turns out" in result.explanation
    assert "row 1, turn 0 (user)" in result.explanation
    assert "trl #4147" in result.explanation


def test_an_assistant_header_trained_as_completion_fails(tok):
    """trl #4147: the prompt rendered without ``add_generation_prompt=True``, so the assistant's
    header (``<|im_start|>assistant\n``) counts as completion and is trained."""
    ids, labels = exchange(tok, "the cat sat", "a dog ran")
    header = len(template_turn_headers(tok)["assistant"])
    first = next(i for i, label in enumerate(labels) if label != -100)
    labels[first - header:first] = ids[first - header:first]
    result = lmcheck.batch_supervision(batch([(ids, labels)], tok.pad_token_id), tok, completion_only=True)
    assert not result.passed
    assert f"1 assistant turn header(s) have supervised tokens, though the setup trains on completions only " \
           f"(first: row 0, turn 1, position {first - header})" in result.explanation
    assert "add_generation_prompt=True" in result.explanation
    assert "trl #4147" in result.explanation


def test_whole_conversations_trained_pass_unless_the_setup_trains_on_completions(tok):
    """Training on every token of a chat is a choice; declared completion-only, it is the bug."""
    rows = [exchange(tok, "the cat sat", "a dog ran", train_prompt=True)]
    whole = lmcheck.batch_supervision(batch(rows, tok.pad_token_id), tok)
    assert whole.passed, whole.explanation
    assert "prompt turns supervised too (the setup trains on whole conversations)" in whole.explanation
    declared = lmcheck.batch_supervision(batch(rows, tok.pad_token_id), tok, completion_only=True)
    assert not declared.passed
    assert "though the setup trains on completions only (first: row 0, turn 0 (user)" in declared.explanation


def test_an_assistant_turn_left_untrained_fails_where_every_one_is_trained(tok):
    """A dropped assistant mask (nanochat PR #582): the second row's answer supervises nothing."""
    rows = [exchange(tok, "the cat sat", "a dog ran"),
            exchange(tok, "the sun came up", "it was day", "a bird", "a fish", untrained=(0,))]
    made = batch(rows, tok.pad_token_id)
    assert lmcheck.batch_supervision(made, tok).passed  # not declared: an unsupervised exchange may be by design
    result = lmcheck.batch_supervision(made, tok, assistant_only=True)
    assert not result.passed
    assert "1 assistant turn(s) supervise no token, though the setup trains on every assistant turn " \
           "(first: row 1, turn 1)" in result.explanation


def test_the_turn_options_are_validated(tok):
    rows = batch([exchange(tok, "the cat sat", "a dog ran")], tok.pad_token_id)
    with pytest.raises(InputError, match="'completion_only' must be"):
        lmcheck.batch_supervision(rows, tok, completion_only="yes")
    with pytest.raises(InputError, match="'assistant_only' must be"):
        lmcheck.batch_supervision(rows, tok, assistant_only=None)
