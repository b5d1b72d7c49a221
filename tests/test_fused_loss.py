"""The lean loop's fused linear cross-entropy: the output layer and the loss in one chunked pass.

It must be the loss the model would have computed, gradients included, or the loop must not use
it: a model whose logits are more than its output layer over its hidden states keeps its own loss.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from lmcheck.loops._fused_loss import linear_cross_entropy
from lmcheck.loops.pretraining import fused_causal_loss


def _reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)


@pytest.mark.parametrize("upstream", [1.0, 2.5])  # 1: the gradients are handed over unscaled
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])  # 1000: one chunk holds every position
def test_loss_gradients_and_argmax_match_the_unfused_computation(chunk: int, upstream: float) -> None:
    """Same loss and gradients as F.cross_entropy over the full logits, -100 ignored; same argmax."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=generator, requires_grad=True)
    weight = torch.randn(300, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 300, (50,), generator=generator)
    targets[[3, 17, 49]] = -100
    loss, predicted = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    (upstream * loss).backward()  # an upstream gradient other than 1 must scale both
    fused = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = _reference(hidden, weight, targets)
    (upstream * expected).backward()
    # measured: differences near 1e-7 (fp32 rounding of sums taken in another order)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], weight.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(predicted, (hidden @ weight.T).argmax(dim=-1))


def test_a_second_backward_is_refused_by_name() -> None:
    """The forward pass hands its gradients to the one backward pass instead of keeping a copy, so
    a second backward through the same graph is an error that says why, not wrong gradients."""
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    loss, _ = linear_cross_entropy(hidden, weight, torch.randint(0, 10, (6,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once per forward"):
        loss.backward()


def test_a_non_finite_hidden_state_gives_a_non_finite_loss() -> None:
    """A NaN anywhere reaches the loss, which the loop records and stops at; it is never hidden."""
    hidden, weight = torch.randn(8, 4), torch.randn(20, 4)
    hidden[5, 2] = float("nan")
    loss, _ = linear_cross_entropy(hidden, weight, torch.arange(8), chunk=3)
    assert math.isnan(float(loss))
    hidden[5, 2] = float("inf")
    assert not math.isfinite(float(linear_cross_entropy(hidden, weight, torch.arange(8), chunk=3)[0]))


def test_a_row_without_targets_adds_nothing() -> None:
    """Every target ignored: loss 0 and no gradient, not a division by zero."""
    hidden = torch.randn(4, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    loss, _ = linear_cross_entropy(hidden, weight, torch.full((4,), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert not hidden.grad.any()
    assert not weight.grad.any()


def _gpt2(**overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    return model


class ScaledGPT2(GPT2LMHeadModel):
    """A model whose logits are not its output layer alone: they are scaled by 10 (as Cohere's
    logit_scale does)."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        output = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        output.logits = 10.0 * output.logits
        if labels is not None:
            output.loss = F.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return output


def test_a_gpt2_trains_through_the_fused_loss_with_its_own_gradients() -> None:
    """On a GPT-2 the fused path is taken, and one backward gives the gradients of the model's own loss."""
    model = _gpt2()
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 10:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    fused = fused_causal_loss(model, batch)
    assert fused is not None
    loss, predicted = fused(batch)
    assert predicted.shape == (3, 15)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model(**batch).loss.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(ours[name], parameter.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_model_whose_logits_are_more_than_its_output_layer_keeps_its_own_loss() -> None:
    """The negative control: a GPT-2 with scaled logits computes another loss, so the loop must not fuse it."""
    healthy, capped = _gpt2(), ScaledGPT2(_gpt2().config)
    capped.load_state_dict(healthy.state_dict())
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "labels": ids}
    assert fused_causal_loss(healthy, batch) is not None
    assert fused_causal_loss(capped, batch) is None
    assert fused_causal_loss(healthy, {"input_ids": ids}) is None  # nothing to compare against


def test_without_gradients_it_gives_the_same_loss_and_the_asked_argmax_only() -> None:
    """Under no_grad (validation) no gradient is made; ``predict`` limits the argmax to its positions."""
    generator = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(10, 8, generator=generator), torch.randn(40, 8, generator=generator)
    targets = torch.randint(0, 40, (10,), generator=generator)
    predict = torch.zeros(10, dtype=torch.bool)
    predict[[2, 7]] = True
    with torch.no_grad():
        loss, predicted = linear_cross_entropy(hidden, weight, targets, predict=predict, chunk=4)
    torch.testing.assert_close(loss, _reference(hidden, weight, targets))
    full = (hidden @ weight.T).argmax(dim=-1)
    assert predicted[[2, 7]].tolist() == full[[2, 7]].tolist()
    assert (predicted[~predict] == -1).all()


def test_where_the_model_keeps_its_own_loss_the_argmax_comes_from_that_call(gpt2_tokenizer):
    """The lean loop's other path (bf16, or a model the fused loss does not fit): the model's own
    loss, and its logits' argmax at the screened positions only, -1 elsewhere."""
    from lmcheck.loops.pretraining import _loss_and_argmax
    from lmcheck.models import gpt2_from_scratch

    model = gpt2_from_scratch(gpt2_tokenizer, preset="gpt2-tiny-cpu").eval()
    ids = torch.randint(0, len(gpt2_tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    wanted = torch.zeros(15, dtype=torch.bool)
    wanted[3:7] = True
    loss, predicted = _loss_and_argmax(model, {"input_ids": ids, "labels": ids}, wanted)
    own = model(input_ids=ids, labels=ids)
    assert torch.equal(loss, own.loss)
    assert predicted.shape == (2, 15)
    assert (predicted[:, ~wanted] == -1).all()
    assert torch.equal(predicted[:, wanted], own.logits[:, :-1][:, wanted].argmax(dim=-1))
    assert _loss_and_argmax(model, {"input_ids": ids, "labels": ids}, torch.zeros(15, dtype=torch.bool))[1] is None


def test_a_plain_module_screens_from_the_logits_behind_its_reference_loss():
    """A model lmcheck did not build and that has no loss of its own: the reference loss, and the
    argmax from the logits of that same call."""
    from lmcheck._model import reference_loss
    from lmcheck.loops.pretraining import _loss_and_argmax
    from tests.plain_models import RotaryLM

    model = RotaryLM().eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    wanted = torch.zeros(11, dtype=torch.bool)
    wanted[4:8] = True
    loss, predicted = _loss_and_argmax(model, {"input_ids": ids, "labels": ids}, wanted)
    logits = model(ids)
    assert torch.allclose(loss, reference_loss(logits, ids))
    assert (predicted[:, ~wanted] == -1).all()
    assert torch.equal(predicted[:, wanted], logits[:, :-1][:, wanted].argmax(dim=-1))
