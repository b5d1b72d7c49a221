"""Chapter 4: pretraining GPT-2 from scratch, and convincing yourself the loop works."""

from __future__ import annotations

import os

import torch

from lmcheck.curves import finite_loss, generalization_gap, loss_decreases, overfits
from lmcheck.errors import GoldenMissingError
from lmcheck.golden import matches_golden
from lmcheck.loops.pretraining import causal_lm_collator, pretrain_default
from lmcheck.models import gpt2_from_scratch
from lmcheck.recipes import DEFAULTS, PRETRAIN_CPU, PRETRAIN_CPU_QUICK
from lmcheck.report import Report, plot_loss_curve
from lmcheck.training import causal_batch, gradient_flow, loss_at_init, memorizes, params_update
from lmcheck.tutorial import expect

TITLE = "Chapter 4: pretraining from scratch"


def run(report: Report, *, quick: bool = False, out: str = "lmcheck-out") -> None:
    settings = PRETRAIN_CPU
    report.title(TITLE)
    report.text(
        "Before paying for a full run, overfit a tiny subset: the loss must start at ln(V), fall,\n"
        "reach near zero, and the model must then continue its training text verbatim while the\n"
        f"validation loss stays high. On this CPU: GPT-2 '{settings.preset}' (2 layers, 160 wide,\n"
        "the full 50,257-token vocabulary) on the first chunk of every training document, AdamW\n"
        "(the embedding tables at their own rate), at most 20 epochs, stopping once every chunk is\n"
        "memorized."
    )
    run_ = pretrain_default(PRETRAIN_CPU_QUICK if quick else settings)  # quick: the first 4 chunks
    data, curve, model, tokenizer = run_.data, run_.curve, run_.model, run_.tokenizer
    report.text(f"data: {data.description}\ntraining documents: {data.train_stats}")

    fresh = gpt2_from_scratch(tokenizer, preset=settings.preset, seed=DEFAULTS["seed"],
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    batch = torch.tensor(data.train["input_ids"][:4])  # (4, 128): the first 4 chunks
    report.text("\nBefore training:")
    report.result(loss_at_init(fresh, batch))
    report.result(gradient_flow(fresh, batch))
    report.result(params_update(fresh, batch, lr=settings.lr))

    report.result(causal_batch(causal_lm_collator(tokenizer)(
        [{"input_ids": ids} for ids in data.train["input_ids"][:4]])))

    max_steps = settings.steps_for(len(data.train))
    report.text(f"\nTraining ({curve.metadata['backend']} loop, {curve.metadata.get('loss', 'own')} loss, "
                f"lr {settings.lr}, embeddings {settings.embedding_lr}, batch {settings.batch_size}): "
                f"stopped at step {curve.steps} ({curve.stop_reason}), {curve.metadata['train_s']:.1f} s "
                f"of training at {curve.metadata['tokens_per_s']:.0f} tokens/s; memorization checks "
                f"{curve.metadata['memorization_s']:.2f} s")
    valid = dict(curve.valid)
    report.table(("step", "training loss", "validation loss"),
                 ((s, v, valid.get(s)) for s, v in curve.train if s in valid or s == 1))
    report.result(expect("stopped_at_memorization", curve.stop_reason == "memorized",
                         f"stopped at step {curve.steps} of at most {max_steps}: "
                         f"{curve.stop_reason}"))
    if quick:
        report.text("(golden losses: recorded for the full recipe's 49 chunks, so not compared in quick mode)")
    else:
        try:
            report.result(matches_golden(curve))
        except GoldenMissingError as missing:
            report.text(f"(golden losses: {missing})")
    report.result(loss_decreases(curve))
    report.result(overfits(curve, max_loss=1.0, within_steps=max_steps))
    report.result(finite_loss(curve))
    report.result(memorizes(model, tokenizer, data.train, prefix_length=settings.prefix_length,
                            continuation_length=settings.continuation_length))
    report.result(generalization_gap(curve, min_gap=3.0))

    article = data.split["train"][0]
    completion = memorizes(model, tokenizer, [article["text"]], prefix_length=6, continuation_length=12,
                           name="continues_training_article")
    row = completion.details[0]
    report.text(f"\nThe start of the training article {article['title']!r}, continued greedily:\n"
                f"  {row['prompt']!r} -> {row['got']!r}")
    report.result(completion)
    png = plot_loss_curve(curve, os.path.join(out, "pretraining-loss.png"))
    report.text(f"loss curve (the tutorial's Figure 1): {png} (points in {png.with_suffix('.json')})")
