"""The setup checks on a PyTorch Lightning setup, through Lightning's own ``Trainer.fit``: a
LightningModule around a tiny Llama, its ``configure_optimizers`` with a warm-up stepped per
optimizer step, accumulation and clipping set on the Trainer. Healthy, it passes; a warm-up
stepped per epoch (Lightning's default interval) stays at 0 for the whole first epoch, and a
collator that pads with eos hides the real eos (transformers #23530).
"""

from __future__ import annotations

from typing import Any

import pytest
import stacks
import torch
from transformers import DataCollatorForLanguageModeling

import lmcheck
from lmcheck.setup import SETUP_CHECKS

pl = pytest.importorskip("lightning.pytorch")


class LitLM(pl.LightningModule):
    def __init__(self, tok: Any, *, interval: str = "step", collate: Any = None, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = stacks.llama(tok)
        self.tok, self.interval, self.lr = tok, interval, lr
        self.collate = collate or DataCollatorForLanguageModeling(tok, mlm=False)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 3))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": self.interval}}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        rows = [{"input_ids": self.tok(s)["input_ids"] + [self.tok.eos_token_id]} for s in stacks.sentences(16)]
        # one length per row: 16 rows of 4 micro-batches of equal token counts would hide
        # nothing, so rows keep their own lengths and the loss is Lightning's mean per micro-batch
        return torch.utils.data.DataLoader(rows, batch_size=4, shuffle=True, collate_fn=self.collate,
                                           generator=torch.Generator().manual_seed(0))


def trainer(**settings: Any) -> Any:
    options: dict[str, Any] = dict(accelerator="cpu", devices=1, max_steps=100, accumulate_grad_batches=1,
                                   gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                                   enable_progress_bar=False)
    options.update(settings)
    return pl.Trainer(**options)


@pytest.fixture(scope="module")
def tok():
    return stacks.chat_tokenizer()


def test_a_healthy_lightning_setup_passes_through_fit(tok):
    """Lightning's own loop: its clipping (seen through, as Lightning calls clip_grad_norm_), its
    scheduler stepped per optimizer step (replayed), its precision; the module is put back."""
    module = LitLM(tok)
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    report = lmcheck.check_lightning(trainer(), module, tokenizer=tok)
    statuses = {r.name: r.status for r in report}
    assert set(statuses) == set(SETUP_CHECKS)
    assert {n for n, s in statuses.items() if s != "pass"} == {"reproducible", "resume", "packing_equivalence",
                                                                     "preference_at_init", "importance_ratio", "adapters"}, \
        {r.name: r.explanation for r in report if r.status != "pass"}
    assert "LambdaLR stepped once per optimizer step" in report["lr_schedule"].explanation
    assert report.setup["scheduler interval"] == "step (every 1)"
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in weights.items())
    assert module._trainer is None


def test_lightning_accumulation_is_lightnings_mean_per_micro_batch(tok):
    """With ``accumulate_grad_batches=2`` on padded rows of unequal length, Lightning divides each
    micro-batch's mean loss by 2: short rows weigh as much as long ones (transformers #34191)."""
    report = lmcheck.check_lightning(trainer(accumulate_grad_batches=2), LitLM(tok), tokenizer=tok,
                                     overfit_steps=10)
    assert report["accumulation"].status == "fail"
    assert "#34191" in report["accumulation"].explanation


def test_a_warmup_stepped_per_epoch_stays_at_zero(tok):
    """Lightning's default scheduler interval is the epoch: a warm-up written per step then
    holds the learning rate at 0 for the whole first epoch. lr_schedule says so first; the
    overfitting run that fails follows from it."""
    report = lmcheck.check_lightning(trainer(), LitLM(tok, interval="epoch"), tokenizer=tok, overfit_steps=10)
    result = report["lr_schedule"]
    assert result.status == "fail"
    assert "the learning rate is 0 at optimizer steps" in result.explanation
    assert report.setup["scheduler interval"] == "epoch (every 1)"
    assert report.failures()[0].name == "lr_schedule"  # the root cause leads
    follows = report["overfits"]  # 4 steps an epoch: from the second epoch on the rate is 1/3 of the peak
    assert follows.status == "fail"
    assert follows.metrics["follows_from"] == "lr_schedule"
    assert follows.explanation.startswith("follows from lr_schedule, which failed first")


def test_pad_equal_to_eos_in_a_lightning_collator(tok):
    eos_padded = stacks.chat_tokenizer()
    eos_padded.pad_token = eos_padded.eos_token
    module = LitLM(tok, collate=DataCollatorForLanguageModeling(eos_padded, mlm=False))
    report = lmcheck.check_lightning(trainer(), module, overfit_steps=10)
    assert report.failures()[0].name == "batch_supervision"
    assert "#23530" in report["batch_supervision"].explanation


def test_bad_arguments_are_named(tok):
    with pytest.raises(lmcheck.InputError, match="'trainer' must be a lightning.pytorch.Trainer"):
        lmcheck.check_lightning(object(), LitLM(tok))
    with pytest.raises(lmcheck.InputError, match="'module' must be a lightning.pytorch.LightningModule"):
        lmcheck.check_lightning(trainer(), torch.nn.Linear(2, 2))
    with pytest.raises(lmcheck.InputError, match="'model' must be the language model inside 'module'"):
        lmcheck.check_lightning(trainer(), LitLM(tok), model=torch.nn.Linear(2, 2))
