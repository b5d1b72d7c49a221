"""Tiny training setups for the setup checks: a word-level tokenizer, a GPT-2 of a few thousand
parameters, short examples of unequal length, and a healthy plain loop and Trainer built the way
users build them. Each negative control in ``test_setup_checks.py`` changes one thing here.

Everything is built in well under a second on a CPU; the vocabulary has 40 words, so a model
memorizes a handful of batches in tens of steps.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

WORDS = ("the a cat dog sat ran on under mat log big small red blue saw ate fish bird tree sun "
         "moon rain came went home fast slow old new and then it was day night here there up down").split()

# the checks a plain, padded, single-process setup has no use for: its rows are not packed, it
# has no adapter, and it is neither a preference nor an RL trainer
ONLY_SOME = {"packing_equivalence": "n/a", "preference_at_init": "n/a", "importance_ratio": "n/a", "adapters": "n/a"}


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")


def texts(count: int = 16, seed: int = 0) -> list[str]:
    """Sentences of 4 to 14 words: unequal lengths, so batches need padding."""
    pick = random.Random(seed)
    return [" ".join(pick.choice(WORDS) for _ in range(pick.randint(4, 14))) for _ in range(count)]


def examples(tok: PreTrainedTokenizerFast, count: int = 16) -> list[dict[str, list[int]]]:
    """Tokenized examples, each ending with eos (as a tokenizer set to add it would)."""
    return [{"input_ids": tok(t)["input_ids"] + [tok.eos_token_id]} for t in texts(count)]


def model(tok: PreTrainedTokenizerFast, *, seed: int = 0, dropout: float = 0.0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(config)
    # transformers 5.24 derives loss_type from the class name, and "GPT2LMHeadModel" matches no
    # loss: the Trainer then counts the tokens before the shift (transformers #46204). Named, the
    # Trainer counts them after it, as check_trainer's accumulation check demands.
    model.loss_type = "ForCausalLM"
    return model


def collator(tok: PreTrainedTokenizerFast) -> DataCollatorForLanguageModeling:
    return DataCollatorForLanguageModeling(tok, mlm=False)


def loader(tok: PreTrainedTokenizerFast, *, batch_size: int = 4, seed: int = 0, shuffle: bool = True,
           collate: Callable[[Any], Any] | None = None, data: list[Any] | None = None) -> torch.utils.data.DataLoader:
    """The examples (or ``data``) in shuffled batches, collated by ``collate`` (default: the
    causal-LM collator)."""
    return torch.utils.data.DataLoader(data if data is not None else examples(tok), batch_size=batch_size,
                                       shuffle=shuffle,
                                       collate_fn=collate or collator(tok),
                                       generator=torch.Generator().manual_seed(seed))


def warmup(optimizer: torch.optim.Optimizer, steps: int = 10) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / steps))


class Loop:
    """A healthy plain loop with gradient accumulation, clipping and a warmup schedule, written as
    users write it; the ``fault`` names one documented bug to put in it instead, and
    ``max_grad_norm=None`` turns clipping off (clipping hides the scale of an update)."""

    def __init__(self, net: torch.nn.Module, *, accumulate: int = 2, lr: float = 1e-2,
                 max_grad_norm: float | None = 1.0, fault: str | None = None) -> None:
        self.model, self.accumulate, self.max_grad_norm, self.fault = net, accumulate, max_grad_norm, fault
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
        self.scheduler = warmup(self.optimizer)
        self.calls = 0
        self.pending: list[dict[str, torch.Tensor]] = []

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One micro-batch. The right normalisation over k micro-batches of unequal length is the
        summed loss divided by the step's total token count, so the step keeps the micro-batches
        until the k-th and then runs them, as the Trainer's num_items_in_batch does."""
        self.model.train()
        self.calls += 1
        if self.fault == "scheduler_per_micro_batch":
            self.scheduler.step()
        self.pending.append(batch)
        if len(self.pending) < self.accumulate:
            return torch.tensor(0.0)
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in self.pending)
        total = 0.0
        for micro in self.pending:
            output = self.model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"])
            logits = output.logits[:, :-1]
            targets = micro["labels"][:, 1:]
            summed = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
            count = int((targets != -100).sum())
            if self.fault == "mean_per_micro_batch":  # transformers #34191
                loss = summed / count / self.accumulate
            elif self.fault == "no_division_by_k":
                loss = summed / count
            else:
                loss = summed / tokens
            loss.backward()
            total += float(loss.detach())
        self.pending.clear()
        if self.fault != "no_clip" and self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        if self.fault != "scheduler_per_micro_batch" and self.fault != "no_scheduler_step":
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.tensor(total)


def ids_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plainest step: a (B, T) tensor of ids in, the model's own loss on them, one update."""
    def step(ids: torch.Tensor) -> torch.Tensor:
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def trainer(tok: PreTrainedTokenizerFast, output_dir: str, *, seed: int = 0, accumulate: int = 2,
            trainer_class: type[Trainer] = Trainer, dropout: float = 0.0, net: torch.nn.Module | None = None,
            data: list[Any] | None = None, collate: Callable[[Any], Any] | None = None,
            **arguments: Any) -> Trainer:
    """A healthy Trainer over the tiny examples (or ``data``, collated by ``collate``): warmup,
    clipping, accumulation; ``arguments`` override the TrainingArguments."""
    import datasets

    settings = dict(output_dir=output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=accumulate,
                    learning_rate=1e-2, warmup_steps=5, lr_scheduler_type="linear", max_steps=400,
                    max_grad_norm=1.0, weight_decay=0.0, seed=seed, report_to="none", save_strategy="steps",
                    save_steps=1, use_cpu=True, disable_tqdm=True, logging_steps=1)
    settings.update(arguments)
    return trainer_class(model=net if net is not None else model(tok, seed=seed, dropout=dropout),
                         args=TrainingArguments(**settings),
                         train_dataset=datasets.Dataset.from_list(data if data is not None else examples(tok)),
                         eval_dataset=datasets.Dataset.from_list(data[:8] if data is not None else examples(tok, 8)),
                         data_collator=collate or collator(tok), processing_class=tok)


def ln(vocab: int) -> float:
    return math.log(vocab)


class ResumableLoop:
    """A healthy plain loop that checkpoints and resumes exactly, as a careful user writes one:
    fixed-length chunks of text (so the mean loss of a micro-batch, divided by k, is the step's
    mean), dropout on, accumulation over ``accumulate`` micro-batches counted across epochs, an
    AMP GradScaler (on the CPU), a warmup schedule, a new order each epoch, and a checkpoint that
    holds the model, the optimizer, the scheduler, the scaler, the torch generator and how many
    micro-batches were trained (where the data is: the first epoch after a resume skips what
    was trained). ``fault`` names one documented resume bug to put in it instead."""

    def __init__(self, seed: int = 0, *, fault: str | None = None, accumulate: int = 2, count: int = 20,
                 batch_size: int = 4, dropout: float = 0.1,
                 order: Callable[[int, int], list[int]] | None = None, device: str = "cpu") -> None:
        self.tok = tokenizer()
        stream = [i for e in examples(self.tok, 2 * count) for i in e["input_ids"]]
        self.data = [{"input_ids": stream[12 * i:12 * (i + 1)]} for i in range(count)]
        self.collate = collator(self.tok)
        self.model = model(self.tok, seed=seed, dropout=dropout).to(device)
        self.device = torch.device(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.0)
        self.scheduler = warmup(self.optimizer)
        # the scale doubles every 2 steps without an overflow: its state changes as the run goes
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0 ** 10, growth_interval=2)
        self.seed, self.fault, self.accumulate, self.batch_size = seed, fault, accumulate, batch_size
        self.order = order or (lambda epoch, n: torch.randperm(
            n, generator=torch.Generator().manual_seed(1000 * self.seed + epoch)).tolist())
        self.calls = 0  # micro-batches trained: where the data is
        self.steps = 0
        self.resume_at: int | None = None  # after a load: the micro-batches trained before it

    def batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """What the loop does at an epoch's start, then the epoch's batches not trained yet."""
        if self.fault == "zero_grad_each_epoch":  # ultralytics PR #11217: the partial accumulation is lost
            self.optimizer.zero_grad(set_to_none=True)
        order = self.order(epoch, len(self.data))
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        done = 0
        if self.resume_at is not None:  # the epoch the resume falls in: its batches trained before it skipped
            done, self.resume_at = self.resume_at - epoch * len(chunks), None
        batches = [self.collate([self.data[i] for i in chunk]) for chunk in chunks[max(done, 0):]]
        if self.fault == "loader_seed_after_restore":
            # a DataLoader without a generator of its own: iter() draws its base seed from the torch
            # generator, after the checkpoint restored it (NVIDIA-NeMo/Megatron-Bridge #5257)
            yield from torch.utils.data.DataLoader(batches, batch_size=None)
        else:
            yield from batches

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.model.train()
        loss = self.model(**{k: v.to(self.device) for k, v in batch.items()}).loss / self.accumulate
        self.scaler.scale(loss).backward()
        self.calls += 1
        if self.calls % self.accumulate == 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1
        return loss.detach()

    def save(self, folder: str) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng": torch.get_rng_state(), "calls": self.calls, "steps": self.steps}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        for fault, key in (("no_scheduler", "scheduler"), ("no_scaler", "scaler"), ("no_rng", "rng")):
            if self.fault == fault:
                del state[key]
        torch.save(state, os.path.join(folder, "state.pt"))

    def load(self, folder: str) -> None:
        state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
        self.model.load_state_dict(state["model"])
        if self.fault != "adam_reset":  # Adam's moments left at zero (Megatron-Bridge PR #3832)
            self.optimizer.load_state_dict(state["optimizer"])
        for key, item in (("scheduler", self.scheduler), ("scaler", self.scaler)):
            if key in state:
                item.load_state_dict(state[key])
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.fault != "no_rng":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.calls, self.steps = state["calls"], state["steps"]
        self.resume_at = self.calls
        per_epoch = -(-len(self.data) // self.batch_size)
        if self.fault == "restart_epoch":  # the loader starts the epoch again: its first batches replayed
            self.resume_at -= self.calls % per_epoch
        if self.fault == "skip_steps":  # skips global_step batches, not global_step x k (transformers #5605)
            self.resume_at = self.steps

    def setup(self) -> dict[str, Any]:
        """check_loop's arguments for this loop."""
        return {"model": self.model, "train_step": self.step, "batches": self.batches,
                "checkpoint": (self.save, self.load), "scheduler": self.scheduler, "stateful": [self.scaler],
                "tokenizer": self.tok, "max_grad_norm": 1.0}
