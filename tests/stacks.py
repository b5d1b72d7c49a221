"""Healthy setups on the stacks people train with, each tiny, for the setup checks' record on
code that lmcheck did not write: TRL's ``SFTTrainer`` (plain text, assistant-only chat,
prompt-completion), a PEFT LoRA through the Trainer, a loop written as nanoGPT's ``train.py``
is, an ``accelerate`` loop, and a Trainer on a tiny Llama (with and without an optimizer of the
user's own). ``test_stacks.py`` checks that each passes, and that one documented bug put into it
fails with its cause named.

The tokenizer is a byte-level BPE trained in milliseconds on the tiny corpus, with ChatML's
special tokens and a ChatML chat template that marks the assistant's turns with
``{% generation %}`` (as TRL's training templates do), so TRL can mask everything but them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("the a cat dog sat ran on under mat log big small red blue saw ate fish bird tree sun "
         "moon rain came went home fast slow old new and then it was day night here there up down").split()

CHATML = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}{%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")


def sentences(count: int, seed: int = 0, low: int = 3, high: int = 9) -> list[str]:
    pick = random.Random(seed)
    return [" ".join(pick.choice(WORDS) for _ in range(pick.randint(low, high))) for _ in range(count)]


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """ChatML's tokens (eos ``<|im_end|>``, pad ``<|endoftext|>``) over a byte-level BPE."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([" ".join(WORDS)] * 4 + ["user\nassistant\nsystem\n"] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def llama(tok: PreTrainedTokenizerFast, *, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def plain_texts(count: int = 16) -> list[dict[str, str]]:
    return [{"text": s} for s in sentences(count)]


def conversations(count: int = 16) -> list[dict[str, Any]]:
    questions, answers = sentences(count, seed=1, low=2, high=5), sentences(count, seed=2, low=2, high=6)
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(questions, answers, strict=True)]


def two_turn_conversations(count: int = 16) -> list[dict[str, Any]]:
    """Two exchanges each: the user's end-of-turn tokens are not supervised, by design."""
    first, second = conversations(count), conversations(count)
    return [{"messages": a["messages"] + b["messages"]} for a, b in zip(first, second[::-1], strict=True)]


def prompt_completions(count: int = 16) -> list[dict[str, Any]]:
    return [{"prompt": c["messages"][:1], "completion": c["messages"][1:]} for c in conversations(count)]


def trl_settings(output_dir: str, *, learning_rate: float) -> dict[str, Any]:
    """TRL's trainers' arguments as their documentation sets them: a cosine schedule with
    warm-up, accumulation, clipping at 1; on the CPU, quiet, saving nothing."""
    return dict(
        output_dir=output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=3, max_steps=100, max_grad_norm=1.0,
        weight_decay=0.0, max_length=64, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
        seed=0, logging_strategy="no", dataset_num_proc=None)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[Any], torch.Tensor]:
    """A plain loop's step: the model's own loss on the batch, backward, step, gradients cleared."""
    def step(batch: Any) -> torch.Tensor:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def sft_trainer(tok: PreTrainedTokenizerFast, output_dir: str, data: list[dict[str, Any]], *,
                model: torch.nn.Module | None = None, **arguments: Any) -> Any:
    """TRL's SFTTrainer as its documentation builds it: a cosine schedule with warm-up,
    accumulation, clipping at 1."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    settings = {**trl_settings(output_dir, learning_rate=1e-2), **arguments}
    return SFTTrainer(model=model if model is not None else llama(tok), args=SFTConfig(**settings),
                      train_dataset=datasets.Dataset.from_list(data), processing_class=tok)


def lora(model: torch.nn.Module, **options: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    settings: dict[str, Any] = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    settings.update(options)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))


def pretrained_llama(tok: PreTrainedTokenizerFast, folder: str, *, steps: int = 40) -> LlamaForCausalLM:
    """A Llama trained a little on text like the fine-tuning data, saved and loaded back, as a
    pretrained base is (its config names the folder). A LoRA over random weights has too little
    to work with to memorize anything in a few hundred steps."""
    model = llama(tok, seed=3)
    rows = [tok(s)["input_ids"] + [tok.eos_token_id] for s in sentences(32, seed=9)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder)


# ---------------------------------------------------------------- a loop as nanoGPT's train.py


class NanoGPTLoop:
    """nanoGPT's ``train.py``, in small: random windows of a token stream (``get_batch``,
    sampling with replacement), ``get_lr(iter_num)`` cosine decay with warm-up set into the
    param groups by hand, the loss divided by the accumulation steps, clipping at 1, AdamW."""

    def __init__(self, model: torch.nn.Module, stream: torch.Tensor, *, block_size: int = 16, batch_size: int = 4,
                 accumulate: int = 2, learning_rate: float = 6e-3, warmup_iters: int = 5,
                 lr_decay_iters: int = 60, min_lr: float = 6e-4, divide: bool = True, seed: int = 0) -> None:
        self.model, self.stream, self.block_size, self.batch_size = model, stream, block_size, batch_size
        self.accumulate, self.learning_rate, self.warmup_iters = accumulate, learning_rate, warmup_iters
        self.lr_decay_iters, self.min_lr, self.divide = lr_decay_iters, min_lr, divide
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(seed)
        self.iter_num = 0
        self.micro_step = 0

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(self.stream) - self.block_size, (self.batch_size,), generator=self.generator)
        x = torch.stack([self.stream[i: i + self.block_size] for i in ix])
        y = torch.stack([self.stream[i + 1: i + 1 + self.block_size] for i in ix])
        return x, y

    def batches(self, count: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.get_batch() for _ in range(count)]

    def get_lr(self, it: int) -> float:
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        if it > self.lr_decay_iters:
            return self.min_lr
        ratio = (it - self.warmup_iters) / (self.lr_decay_iters - self.warmup_iters)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.learning_rate - self.min_lr)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self.micro_step == 0:
            for group in self.optimizer.param_groups:
                group["lr"] = self.get_lr(self.iter_num)
        x, y = batch
        _, loss = self.model(x, y)
        if self.divide:
            loss = loss / self.accumulate
        loss.backward()
        self.micro_step += 1
        if self.micro_step == self.accumulate:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.micro_step = 0
            self.iter_num += 1
        return loss.detach()


def token_stream(tok: PreTrainedTokenizerFast, count: int = 40) -> torch.Tensor:
    ids: list[int] = []
    for sentence in sentences(count, seed=5):
        ids += tok(sentence)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids)


# ---------------------------------------------------------------- an accelerate loop


class AccelerateLoop:
    """A loop as accelerate's examples write it: everything through ``accelerator.prepare``,
    ``accelerator.accumulate``, ``accelerator.backward`` and ``accelerator.clip_grad_norm_``,
    the prepared scheduler stepped with the optimizer."""

    def __init__(self, model: torch.nn.Module, loader: torch.utils.data.DataLoader, *, accumulate: int = 2,
                 lr: float = 1e-2) -> None:
        from accelerate import Accelerator
        from transformers import get_linear_schedule_with_warmup

        self.accelerator = Accelerator(gradient_accumulation_steps=accumulate, cpu=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        scheduler = get_linear_schedule_with_warmup(optimizer, 3, 200)
        self.model, self.optimizer, self.loader, self.scheduler = self.accelerator.prepare(
            model, optimizer, loader, scheduler)

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.model.train()
        with self.accelerator.accumulate(self.model):
            loss = self.model(**batch).loss
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return loss.detach()


def padded_loader(tok: PreTrainedTokenizerFast, *, batch_size: int = 4, seed: int = 0,
                  collate: Callable[[Any], Any] | None = None) -> torch.utils.data.DataLoader:
    from transformers import DataCollatorForLanguageModeling

    examples = [{"input_ids": tok(s)["input_ids"] + [tok.eos_token_id]} for s in sentences(16, seed=7)]
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=True,
                                       collate_fn=collate or DataCollatorForLanguageModeling(tok, mlm=False),
                                       generator=torch.Generator().manual_seed(seed))


def chunk_loader(tok: PreTrainedTokenizerFast, *, length: int = 12, batch_size: int = 4,
                 seed: int = 0) -> torch.utils.data.DataLoader:
    """Packed chunks of the token stream, all of one length (no padding), as pretraining reads them."""
    stream = token_stream(tok, 60)
    rows = [{"input_ids": stream[i: i + length], "labels": stream[i: i + length].clone()}
            for i in range(0, len(stream) - length, length)][:16]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


# trl PR #5988: a training template whose assistant mask stops before the end-of-turn token
CHATML_STOP_UNTRAINED = CHATML.replace(
    "{%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}",
    "{%- generation %}{{- message.content }}{%- endgeneration %}{{- '<|im_end|>' }}")


def training_arguments(output_dir: str, **arguments: Any) -> Any:
    from transformers import TrainingArguments

    settings: dict[str, Any] = dict(
        output_dir=output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2,
        lr_scheduler_type="cosine", warmup_steps=3, max_steps=100, max_grad_norm=1.0, weight_decay=0.0,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    settings.update(arguments)
    return TrainingArguments(**settings)


def examples(tok: PreTrainedTokenizerFast, count: int = 16) -> Any:
    import datasets

    return datasets.Dataset.from_list([{"input_ids": tok(s)["input_ids"] + [tok.eos_token_id]}
                                       for s in sentences(count)])


# ---------------------------------------------------------------- the loops with their own checkpointing


class _Progress:
    """How many micro-batches the loop has trained: where the data is, saved with the checkpoint."""

    def __init__(self) -> None:
        self.calls = 0

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.calls = state["calls"]


def resumable_accelerate(tok: PreTrainedTokenizerFast, seed: int = 0, *, seedable: bool = True) -> dict[str, Any]:
    """The accelerate loop resumed as accelerate's ``complete_nlp_example.py`` resumes:
    ``save_state``/``load_state`` (model, optimizer, scheduler, generators, the registered
    progress) and ``skip_first_batches`` in the epoch the resume falls in, with the sampler set
    to each epoch. ``seedable``: ``DataLoaderConfiguration(use_seedable_sampler=True)``, whose
    order is a function of the seed and the epoch; without it the loader's generator, which no
    checkpoint holds, draws each epoch's order."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from transformers import get_linear_schedule_with_warmup

    model = llama(tok, seed=seed)
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=seedable))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 3, 200)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, chunk_loader(tok, seed=seed), scheduler)
    progress, resumed = _Progress(), {"at": None}
    accelerator.register_for_checkpointing(progress)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        model.train()
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        progress.calls += 1
        return loss.detach()

    def batches(epoch: int) -> Any:
        loader.set_epoch(epoch)
        skip = 0
        if resumed["at"] is not None:  # the epoch the resume falls in: what it trained already skipped
            skip, resumed["at"] = resumed["at"] - epoch * len(loader), None
        return accelerator.skip_first_batches(loader, skip) if skip > 0 else loader

    def load(folder: str) -> None:
        accelerator.load_state(folder)
        resumed["at"] = progress.calls

    return {"model": model, "train_step": step, "batches": batches, "scheduler": scheduler, "tokenizer": tok,
            "max_grad_norm": 1.0, "checkpoint": (accelerator.save_state, load)}


def resumable_nanogpt(tok: PreTrainedTokenizerFast, seed: int = 0, *, save_generator: bool = False) -> dict[str, Any]:
    """The nanoGPT loop with nanoGPT's own checkpoint: the model, the optimizer and ``iter_num``
    (``train.py`` saves those, with the model's arguments and the best loss). ``get_batch``
    draws from a generator seeded at the start; ``save_generator`` also saves its state."""
    from plain_models import Config, NanoGPT

    import lmcheck

    torch.manual_seed(seed)
    net = NanoGPT(Config(vocab_size=len(tok), block_size=16))
    loop = NanoGPTLoop(net, token_stream(tok), seed=seed)

    def save(folder: str) -> None:
        state = {"model": net.state_dict(), "optimizer": loop.optimizer.state_dict(), "iter_num": loop.iter_num}
        if save_generator:
            state["generator"] = loop.generator.get_state()
        torch.save(state, f"{folder}/ckpt.pt")

    def load(folder: str) -> None:
        state = torch.load(f"{folder}/ckpt.pt", weights_only=True)
        net.load_state_dict(state["model"])
        loop.optimizer.load_state_dict(state["optimizer"])
        loop.iter_num = state["iter_num"]
        if "generator" in state:
            loop.generator.set_state(state["generator"])

    return {"model": lmcheck.adapt(net, logits=lambda ids: net(ids, ids)[0]), "train_step": loop.step,
            "batches": lambda epoch: (loop.get_batch() for _ in range(8)), "tokenizer": tok,
            "max_grad_norm": 1.0, "sampling": "with_replacement", "checkpoint": (save, load)}


# ---------------------------------------------------------------- a loop of one's own over packed rows


def packed_examples(tok: PreTrainedTokenizerFast, count: int = 32, seed: int = 7) -> list[dict[str, list[int]]]:
    """Short sentences, each ending with its eos: the documents a packing collator puts in a row."""
    return [{"input_ids": tok(s)["input_ids"] + [tok.eos_token_id]} for s in sentences(count, seed=seed)]


class Packer:
    """A collator of one's own that packs each batch of examples into one row; ``fault`` names a
    documented packing bug to put in it: ``"all_ones_mask"`` (a 2-D all-ones attention mask
    beside the packed position ids: transformers PR #46634), ``"arange_positions"`` (position
    ids that never restart: trl #3705, legacy wrapped packing), ``"labels_cross"`` (every
    document's first token labelled, so the last of the one before predicts it)."""

    def __init__(self, fault: str | None = None) -> None:
        self.fault = fault

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([t for e in examples for t in e["input_ids"]])[None]
        positions = torch.cat([torch.arange(len(e["input_ids"])) for e in examples])[None]
        labels = ids.clone()
        if self.fault != "labels_cross":
            labels[positions == 0] = -100
        if self.fault == "arange_positions":
            positions = torch.arange(ids.shape[1])[None]
        batch = {"input_ids": ids, "position_ids": positions, "labels": labels}
        if self.fault == "all_ones_mask":
            batch["attention_mask"] = torch.ones_like(ids)
        return batch


class PackingLoop:
    """A plain loop over packed rows, written as a padding-free user writes it: ``model(**batch)``
    with the collator's keys, AdamW, clipping at 1. ``use_cache`` is the model's
    ``config.use_cache`` in training (a Llama built from its config has True; the Trainer sets
    False): True leaves transformers without a document mask."""

    def __init__(self, tok: PreTrainedTokenizerFast, *, collator: Any = None, use_cache: bool = False,
                 seed: int = 0, batch_size: int = 4) -> None:
        from transformers import DataCollatorWithFlattening

        self.model = llama(tok, seed=seed)
        self.model.config.use_cache = use_cache
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        self.loader = torch.utils.data.DataLoader(
            packed_examples(tok), batch_size=batch_size, shuffle=True, generator=generator,
            collate_fn=collator if collator is not None else DataCollatorWithFlattening(return_tensors="pt"))

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.model.train()
        loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# ---------------------------------------------------------------- TRL's DPOTrainer


def preference_pairs(count: int = 16) -> list[dict[str, Any]]:
    """Conversational preference data: one user turn, a chosen and a rejected assistant reply."""
    questions = sentences(count, seed=11, low=2, high=5)
    chosen, rejected = sentences(count, seed=12, low=2, high=6), sentences(count, seed=13, low=2, high=6)
    return [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for q, c, r in zip(questions, chosen, rejected, strict=True)]


def dpo_trainer(tok: PreTrainedTokenizerFast, output_dir: str, base: str, *, ref_model: torch.nn.Module | None = None,
                model: torch.nn.Module | None = None, **arguments: Any) -> Any:
    """TRL's DPOTrainer as its documentation builds it, on the tiny Llama saved in ``base``
    (TRL loads the reference from the same folder): the sigmoid loss, beta 0.1, a cosine schedule
    with warm-up, accumulation, clipping at 1."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    settings = {**trl_settings(output_dir, learning_rate=1e-3), **arguments}
    return DPOTrainer(model=model if model is not None else LlamaForCausalLM.from_pretrained(base),
                      ref_model=ref_model, args=DPOConfig(**settings),
                      train_dataset=datasets.Dataset.from_list(preference_pairs()), processing_class=tok)
