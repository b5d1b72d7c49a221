"""The architecture matrix: lmcheck's batteries and training probes on every transformers LM.

Every class in transformers' causal-LM and masked-LM auto mappings is built at a tiny size by one
rule (:func:`tiny_config`: width 64, 2 layers, 4 heads of 16, 2 KV heads, 4 experts of which 2
per token, the tokenizer's vocabulary and special ids), with the few per-architecture settings in
:data:`OVERRIDES`, randomly initialised with a fixed seed, and run through lmcheck's ready
battery for its family and the training probes. :data:`LEFT_OUT` gives the reason for every class
of the mappings that is not a decoder-only or masked language model lmcheck checks.

Each cell is a probe's outcome (pass, fail, n/a, error). :data:`KNOWN_DEFECTS` lists the cells
that fail (or raise inside the model's own code) because of the model, each with the words its
explanation must contain and the cause; every other cell must pass or be not applicable. A class
whose tiny model cannot be built, or whose own forward raises on a plain batch before any probe,
is reported with that error as its reason.

Run ``python tests/architectures.py --write docs/architectures.md`` to write the matrix as a
docs page; ``tests/test_architectures.py`` holds each architecture to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PretrainedConfig,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

import lmcheck
from lmcheck.batteries import CAUSAL_CHECKS, DEFAULT_PROMPTS, GREEDY_STEPS, MASKED_CHECKS, run_check
from lmcheck.results import Result, raised_at
from lmcheck.setup.trainer import (
    quiet as _quiet,  # the Trainer driver's: transformers' logs and warnings off
)

# ------------------------------------------------------------------ sizes by rule

WIDTH, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 2, 4, 2, 16
# every size a config may name, set where the config has it (attribute maps included)
SIZES: dict[str, Any] = {
    "hidden_size": WIDTH, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "intermediate_size": 4 * WIDTH, "num_heads": HEADS,
    "max_position_embeddings": 512, "embedding_size": WIDTH, "dim_model_base": WIDTH, "rotary_dim": HEAD_DIM // 2,
    # mixture of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "n_shared_experts": 1, "moe_num_experts": 4, "moe_topk": 2,
    "shared_expert_intermediate_size": 32, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    # latent attention
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    # state spaces and recurrences
    "state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 1,
    "ssm_state_size": 8, "time_step_rank": 8, "lru_width": WIDTH,
}

# per-architecture settings that the rule cannot give (each with why)
OVERRIDES: dict[str, dict[str, Any]] = {
    # a decoder only with is_decoder=True, as transformers' warning says; else it attends both ways
    "bert-generation": {"is_decoder": True},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},  # its default repeats 3 kinds
    "gemma3n_text": {"num_kv_shared_layers": 0},  # two layers cannot share a cache
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},  # one global, one local layer
    "mamba2": {"num_heads": 8, "head_dim": 16},  # heads x head_dim = expand x width
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},  # a Mamba layer, then attention
    "bamba": {"attn_layer_indices": [1]},
    "xlnet": {"d_head": WIDTH // HEADS},  # its default 64 assumes its default width
    "helium": {"head_dim": WIDTH // HEADS},  # its output projection assumes heads x head_dim = width
    # head_dim left None by default, and read as if set (getattr(config, "head_dim", default))
    **{name: {"head_dim": HEAD_DIM} for name in ("ministral", "hunyuan_v1_dense", "hunyuan_v1_moe")},
    "dory": {"head_dim": WIDTH // HEADS},
    "xglm": {"pad_token_id": 1},  # its sinusoidal table's padding row must lie inside the table
    "esmc": {"num_key_value_heads": HEADS},  # no grouped-query attention
    "zaya": {"num_experts_per_tok": 1},  # one expert per token only
    "xlstm": {"qk_dim_factor": 1.0},
    # its looped layers start at 6 by default: with 2 layers nothing loops (message_input unused)
    "inkling2_loop_text": {"num_hidden_layers": 4, "loop_layer_index_start": 2, "loop_layer_index_end": 4,
                           "n_layers_per_attn_res_block": 1},
}

# classes of the mappings that are not a decoder-only or masked LM lmcheck checks, and why
LEFT_OUT: dict[str, str] = {
    "trocr-causal": "the text decoder of an image-to-text encoder-decoder (its layers read encoder states)",
    "dory-causal": ("its tiny model's own attention raises: eager on a plain batch (a 32 against 16 size "
                    "mismatch), sdpa on a left-padded one (a mask of 15 positions for 30 keys); not "
                    "reduced further"),
    "xlnet-causal": ("a permutation LM: it predicts left to right only when given a perm_mask and a "
                     "target_mapping, which a causal-LM caller (generate, a Trainer) does not pass"),
    "tapas-masked": ("a table encoder: its token_type_ids are (B, T, 7) table coordinates that only its "
                     "own tokenizer makes; a text tokenizer's (B, T) ones make its embedding raise"),
    "perceiver-masked": ("PerceiverForMaskedLM decodes a fixed number of positions whatever the input's "
                         "length (logits of (B, 512, V) for any input), so no row of its logits is an "
                         "input position's; its tokenizer pads every input to 512 bytes"),
}


@dataclass(frozen=True)
class Architecture:
    """One class to check: its model type, family (``causal`` or ``masked``) and class name."""

    model_type: str
    family: str
    class_name: str

    @property
    def key(self) -> str:
        return f"{self.model_type}-{self.family}"


def every_class() -> list[Architecture]:
    """Every class of the installed transformers' causal-LM and masked-LM mappings."""
    return [Architecture(model_type, family, class_name)
            for family, mapping in (("causal", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                                    ("masked", MODEL_FOR_MASKED_LM_MAPPING_NAMES))
            for model_type, class_name in sorted(mapping.items())]


_PART_CONFIGS = {"attn_config", "ffn_config", "esmfold_config"}  # parts of one text model


def left_out(arch: Architecture) -> str | None:
    """Why lmcheck's matrix leaves the class out, or None: the rules, then :data:`LEFT_OUT`."""
    if arch.key in LEFT_OUT:
        return LEFT_OUT[arch.key]
    config = CONFIG_MAPPING[arch.model_type]  # the class: some defaults cannot be built
    if getattr(config, "is_encoder_decoder", False) or "decoder_layers" in getattr(config, "attribute_map", {}) \
            or hasattr(config, "encoder_layers"):
        return ("an encoder-decoder model's decoder (its causal-LM class reads encoder states)"
                if arch.family == "causal" else
                "an encoder-decoder model: its masked-LM class generates a sequence from an encoded one")
    if set(getattr(config, "sub_configs", None) or ()) - _PART_CONFIGS:
        return ("a composite (multimodal or multi-part) config: its text model's own type is in "
                "the matrix where transformers maps one")
    if arch.family == "causal" and arch.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return ("an encoder with a decoder head (is_decoder=True): checked as the masked LM it is "
                "built to be")
    return None


def architectures() -> list[Architecture]:
    """Every class of the mappings that the matrix checks (:func:`left_out` gives None)."""
    return [arch for arch in every_class() if left_out(arch) is None]


def tiny_config(arch: Architecture, tokenizer: Any) -> PretrainedConfig:
    """The architecture's config at the tiny size: each of :data:`SIZES` the config has, the
    tokenizer's vocabulary and special ids, then :data:`OVERRIDES`."""
    default = AutoConfig.for_model(arch.model_type)
    kind = type(default)
    settings = {key: value for key, value in SIZES.items() if hasattr(default, key) and _settable(kind, key)}
    if hasattr(default, "kv_lora_rank"):  # latent attention: every head has its own keys and values
        settings["num_key_value_heads"] = HEADS
    types = getattr(default, "layer_types", None)
    if isinstance(types, list) and types and _settable(kind, "layer_types"):
        # one layer of each kind the default mixes (hybrids)
        distinct = list(dict.fromkeys(types))
        settings["layer_types"] = (distinct * LAYERS)[:max(LAYERS, len(distinct))]
        settings["num_hidden_layers"] = len(settings["layer_types"])
    settings["vocab_size"] = len(tokenizer)
    if hasattr(default, "unpadded_vocab_size"):  # an output head narrower than the table (Inkling)
        settings["unpadded_vocab_size"] = len(tokenizer)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and hasattr(default, name):
            settings[name] = value
    settings.update(OVERRIDES.get(arch.key, OVERRIDES.get(arch.model_type, {})))
    layers = settings.get("num_hidden_layers")
    if "layer_types" in settings and isinstance(layers, int) and len(settings["layer_types"]) != layers:
        settings["layer_types"] = (list(dict.fromkeys(settings["layer_types"])) * layers)[:layers]
    return AutoConfig.for_model(arch.model_type, **settings)


def _settable(kind: type, key: str) -> bool:
    """Whether a config class takes ``key`` as a setting (not a read-only property, directly or
    through its attribute map)."""
    target = getattr(kind, "attribute_map", {}).get(key, key)
    return not any(isinstance(getattr(kind, name, None), property) for name in (key, target))


# what a user does to a freshly built model before using it, where its class asks for it
PREPARE: dict[str, Callable[[torch.nn.Module], Any]] = {
    "xmod": lambda model: model.set_default_language(model.config.languages[0]),  # adapters per language
}


def attentions(arch: Architecture) -> tuple[str, ...]:
    """The attention implementations to check the class with: eager, and sdpa where it has both."""
    import transformers

    cls = getattr(transformers, arch.class_name, None)
    return ("eager", "sdpa") if getattr(cls, "_supports_sdpa", False) else ("eager",)


def build(arch: Architecture, tokenizer: Any, *, attention: str = "eager") -> torch.nn.Module:
    """The tiny model, seeded, in eval mode, with the given attention implementation."""
    config = tiny_config(arch, tokenizer)
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if arch.family == "causal" else AutoModelForMaskedLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_config(config, attn_implementation=attention)
    if arch.model_type in PREPARE:
        PREPARE[arch.model_type](model)
    return model.eval()


# ------------------------------------------------------------------ the probes of a cell

Probe = Callable[[torch.nn.Module, Any], Result]


def _ids(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


_TEXTS = ("The quick brown fox jumps over the lazy dog while the farmer watches from the old barn.",
          "Swimming at the beach is a great way to spend a sunny afternoon with friends and family.",
          "The capital of France is Paris, a city known for its museums, cafes and long history.",
          "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # slow")


def _unpadded_ids(tokenizer: Any) -> torch.Tensor:
    """Four rows of 16 real tokens: what a loss at init is computed on."""
    return tokenizer(list(_TEXTS), truncation=True, max_length=16, return_tensors="pt")["input_ids"]


def _training_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    rows = tokenizer(list(DEFAULT_PROMPTS) + ["The quick brown fox jumps over the lazy dog."],
                     padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    labels = rows["input_ids"].clone()
    labels[rows["attention_mask"] == 0] = -100
    return {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"], "labels": labels}


def causal_probes() -> dict[str, Probe]:
    probes: dict[str, Probe] = {name: lambda m, t, check=check: check(m, t, DEFAULT_PROMPTS, GREEDY_STEPS)
                                for name, check in CAUSAL_CHECKS.items()}
    probes["loss_at_init"] = lambda m, t: lmcheck.loss_at_init(m, _unpadded_ids(t), tolerance=1.0)
    probes["loss_matches_reference"] = lambda m, t: lmcheck.loss_matches_reference(m, _training_batch(t))
    probes["gradient_flow"] = lambda m, t: lmcheck.gradient_flow(m, _training_batch(t))
    probes["params_update"] = lambda m, t: lmcheck.params_update(m, _training_batch(t))
    return probes


def masked_probes() -> dict[str, Probe]:
    return {name: lambda m, t, check=check: check(m, t, None) for name, check in MASKED_CHECKS.items()}


# cells that fail because of the model: (model type-family, probe) -> (status, words the
# explanation must contain, the cause as the docs page states it)
_DSA = ("by design, and a trap for training: a DeepSeek Sparse Attention indexer picks each query's "
        "keys by top-k, an index with no gradient, so the language-model loss never reaches its "
        "weights; DeepSeek-V3.2 trains it with a separate loss (KL to the main attention, its input "
        "detached) that transformers' forward does not compute, so training with the LM loss alone "
        "leaves the indexer at its initialisation (upstream: transformers PR #48863, 'currently the "
        "indexer can't be trained on these models and is inference-only'; torchtitan #4802 for V4)")
_MAMBA = ("the cached step treats the whole sequence's attention mask otherwise than the full pass "
          "(transformers' generate drops the mask for Mamba and FalconMamba, and trims it for Mamba2); "
          "the prompt pass agrees to 1e-6 and the steps after it part (related upstream reports: "
          "transformers #31540, padded or batched Mamba generation differs; PR #47087, the "
          "recurrent layers' padding mask skipped on continued forwards)")
_NO_EFFECT = "the attention mask it takes has no effect on its logits"
_CPMANT_MASK = ("CPM-Ant's forward takes attention_mask as a 'dummy parameter for the text-generation "
                "pipeline' (its signature's comment) and ignores it")
KNOWN_DEFECTS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("rwkv-causal", "greedy_matches_generate"): (
        "fail", "the model's cached step is what differs",
        "RWKV's cached step (its `state`) returns (B, B, V) logits for a batch of B > 1, and generate reads "
        "them as (B, 1, V); reproduced without lmcheck: `model(ids[:, 5:], state=model(ids[:, :5], "
        "use_cache=True).state).logits.shape` is (3, 3, V) for 3 rows; no upstream report found"),
    ("rwkv-causal", "padding_invariance"): ("fail", "the attention mask has no effect", f"{_NO_EFFECT}: RWKV's "
                                            "forward logs that attention_mask 'is unused in this model'; "
                                            "reproduced: the logits with and without a mask of pads are equal"),
    ("rwkv-causal", "batch_invariance"): ("fail", "the attention mask has no effect", f"{_NO_EFFECT} (as above)"),
    **{(f"{m}-causal", p): ("fail", "no attention layer", _MAMBA) for m in ("mamba", "falcon_mamba")
       for p in ("kv_cache_matches_full", "padding_invariance", "batch_invariance")},
    ("falcon_mamba-causal", "greedy_matches_generate"): (
        "fail", "generate chose",
        f"{_MAMBA}; on transformers 5.25, measured on one unpadded prompt: with the mask of ones at each cached "
        f"step (as lmcheck's loop gives it) the greedy tokens part from the full pass's at step 14, without it "
        f"they agree, and generate drops it"),
    ("cpmant-causal", "greedy_matches_generate"): (
        "fail", "the model's cached step is what differs",
        "CPM-Ant's cached step raises when given its cache back (the mask it builds is 36 wide for a "
        "cache of 33: it counts its 32 prompt positions once too often), so lmcheck's loop recomputes "
        "while generate goes on through its own path; the tokens part at step 1"),
    ("cpmant-causal", "padding_invariance"): ("fail", "the attention mask has no effect", _CPMANT_MASK),
    ("cpmant-causal", "batch_invariance"): ("fail", "the attention mask has no effect", _CPMANT_MASK),
    ("cpmant-causal", "causality"): (
        "fail", "sees the future",
        "measured: position 0's logits change by about 29 when the later tokens change, so CPM-Ant's "
        "attention reaches the future; the gradient criterion cannot be read, since it embeds its 32 "
        "prompt tokens with the input"),
    ("cpmant-causal", "loss_at_init"): ("fail", "far from uniform",
                                        "the default config's init_std = 1.0 gives logits far from uniform"),
    ("cpmant-causal", "loss_matches_reference"): (
        "fail", "without the shift",
        "CpmAntForCausalLM computes CrossEntropyLoss(logits, labels) without shifting the labels "
        "(modeling_cpmant.py), the bug of transformers #27517"),
    ("deepseek_v4-causal", "padding_invariance"): (
        "fail", "logits differ from the prompt alone",
        "its compressed attention pools keys in fixed blocks of positions, pads included: transformers' "
        "own tests skip left padding for pooled-KV models ('logits diverge from the unpadded run by design')"),
    ("deepseek_v4-causal", "batch_invariance"): ("fail", "logits differ from the prompt alone",
                                                 "as for padding_invariance: pooled keys take in the pads"),
    ("deepseek_v4-causal", "gradient_flow"): ("fail", "compressor", _DSA),
    ("deepseek_v4-causal", "params_update"): ("fail", "compressor", _DSA),
    **{(f"{m}-causal", p): ("fail", "indexer", _DSA) for m in ("axk2", "deepseek_v32", "glm_moe_dsa", "hy_v4")
       for p in ("gradient_flow", "params_update")},
    ("convbert-masked", "encoder_padding_invariance"): (
        "fail", "the pads reach the real tokens",
        "ConvBERT's span-based convolution (key_conv_attn_layer in modeling_convbert.py) runs over the "
        "hidden states unmasked; the attention mask reaches only the attention scores, so neighbouring "
        "pads enter the real tokens' outputs"),
    ("nystromformer-masked", "encoder_padding_invariance"): (
        "fail", "the pads reach the real tokens",
        "Nystromformer adds a depthwise convolution of the unmasked values to the attention's output "
        "(context_layer += self.conv(value_layer), modeling_nystromformer.py): the pads beside the last "
        "real tokens enter them"),
    ("yoso-masked", "encoder_padding_invariance"): (
        "fail", "the pads reach the real tokens",
        "YOSO rebuilds a 0/1 mask from transformers' additive one as (1.0 + mask / 10000.0).int() "
        "(modeling_yoso.py), made for a -10000 mask; the pads still reach the real tokens"),
    ("mra-masked", "bidirectionality"): (
        "fail", "depends on no other token",
        "at a 20-token input the logits at a mask move by exactly 0 when any other token changes, left or "
        "right: MRA's attention works on blocks of 32 positions (modeling_mra.py) and mixes nothing in an "
        "input shorter than one; not reduced further"),
    ("neomme-masked", "bidirectionality"): (
        "fail", "depends on no other token",
        "at a 20-token input the prediction at a mask depends on no other token, left or right (its "
        "patches are 32 positions)"),
}

# what the matrix shows that a reader may not expect, said on the docs page
NOTES: dict[str, str] = {
    "recurrent_gemma": (
        "passes padding and batch invariance although its recurrent layers do not read the mask: they "
        "reset their state where position_ids is 0 (modeling_recurrent_gemma.py), and lmcheck, as "
        "generate, numbers positions over the real tokens, so the first real token is position 0 and "
        "the state the pads left is dropped; its cache is not one lmcheck can take back, so "
        "kv_cache_matches_full is n/a"),
    "openai-gpt": "returns no cache: kv_cache_matches_full is n/a, the greedy loop recomputes",
    "minimax": ("passes with one full-attention and one linear-attention layer (its default's order): "
                "the decode-step mask sized from a linear-attention layer that an earlier sweep met does "
                "not show at this size in this transformers"),
    "xlstm": ("its forward has no attention_mask parameter, only **kwargs, and a mask with a pad leaves "
              "its logits unchanged: the padded checks are n/a, found by trying"),
    "fnet": "takes no attention mask: encoder_padding_invariance is n/a, and its loss at init runs unpadded",
    "doge": ("its dt_proj sits behind a zero-initialised gate: zero gradient at the first step, non-zero "
             "from the second; gradient_flow and params_update pass and name it"),
    "phimoe": ("its router's gradient is exactly zero at the first step of the 4 x 16 batch and non-zero "
               "at the second: the probes pass and name it (an expert no batch of the user's reaches "
               "is given a random 8 x 64 batch instead)"),
    "afmoe": "its expert_bias is frozen by the class itself (a load-balancing bias): not counted as a mistake",
    "ernie4_5_moe": "its e_score_correction_bias is frozen by the class itself: not counted as a mistake",
    "ctrl": "scales its input embeddings in place: causality's gradient criterion hands it a copy of the leaf",
    "roberta": ("numbers positions from padding_idx + 1: lmcheck's context is max_position_embeddings - "
                "padding_idx - 1 (roberta-base's 514 positions hold 512 tokens; the tiny one's 512 hold 510), "
                "for its whole family: XLM-R, CamemBERT, data2vec-text, RoBERTa-PreLayerNorm, MPNet"),
    "ibert": "its QuantEmbedding has no num_embeddings: the vocabulary is read from the table's weight",
}

# a dozen architectures, one of each family of design, that the default suite runs
REPRESENTATIVE = ("gpt2-causal", "llama-causal", "qwen3_moe-causal", "phimoe-causal", "doge-causal",
                  "ctrl-causal", "openai-gpt-causal", "rwkv-causal", "mamba-causal", "bert-masked",
                  "roberta-masked", "fnet-masked", "ibert-masked")


# ------------------------------------------------------------------ running a row


@dataclass
class Row:
    """One architecture's outcomes: probe -> (status, explanation), and how long it took."""

    arch: Architecture
    attention: str
    cells: dict[str, tuple[str, str]] = field(default_factory=dict)
    build_error: str = ""
    seconds: float = 0.0


def run_row(arch: Architecture, tokenizer: Any, *, attention: str = "eager") -> Row:
    row = Row(arch, attention)
    start = time.perf_counter()
    try:
        model = build(arch, tokenizer, attention=attention)
    except Exception as error:  # a config the rule cannot build: the row says why
        row.build_error = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        row.seconds = time.perf_counter() - start
        return row
    try:  # the model's own forward at the tiny size, before any probe: a failure here is the config's
        with _quiet(), torch.no_grad():
            model(**{k: v for k, v in _training_batch(tokenizer).items() if k == "input_ids"})
    except Exception as error:
        row.build_error = (f"its own forward raises at the tiny size: {type(error).__name__}: "
                           f"{' '.join(str(error).split())[:300]} ({raised_at(error)})")
        row.seconds = time.perf_counter() - start
        return row
    probes = causal_probes() if arch.family == "causal" else masked_probes()
    if attention != "eager":  # the attention-sensitive checks: the batteries' (gradients are eager's)
        probes = {n: p for n, p in probes.items() if n in CAUSAL_CHECKS or n in MASKED_CHECKS}
    for name, probe in probes.items():
        with _quiet():
            result = run_check(name, probe, model, tokenizer)  # isolated, as the battery runs it
        row.cells[name] = (result.status, result.error or result.explanation)
    row.seconds = time.perf_counter() - start
    return row


def tokenizers() -> Mapping[str, Any]:
    causal = lmcheck.load_tokenizer("gpt2")
    if causal.pad_token is None:
        causal.pad_token = causal.eos_token
    return {"causal": causal, "masked": lmcheck.load_tokenizer("bert-base-uncased")}


_MARKS = {"pass": "pass", "fail": "**fail**", "n/a": "n/a", "error": "**error**"}


def markdown(rows: list[Row]) -> str:
    """The matrix as a docs page: one line per architecture and probe, then each failure's cause,
    then every class left out and why."""
    import platform

    import transformers

    rows = sorted(rows, key=lambda r: (r.arch.family, r.arch.model_type, r.attention))
    checked = [r for r in rows if not r.build_error and r.attention == "eager"]
    sdpa = {r.arch.key: r for r in rows if not r.build_error and r.attention == "sdpa"}
    probes = list(dict.fromkeys(p for r in checked for p in r.cells))
    lines = ["# Architecture matrix", "",
             f"lmcheck's ready batteries and training probes on a tiny, randomly initialised model of "
             f"every causal-LM and masked-LM class in transformers {transformers.__version__} (torch "
             f"{torch.__version__}, {platform.machine()}; eager attention, and sdpa where the class "
             f"has both). Written by "
             f"`python tests/architectures.py --write docs/architectures.md`; "
             f"`tests/test_architectures.py` holds every row to it.", "",
             f"Sizes by one rule: width {WIDTH}, {LAYERS} layers (one of each kind a hybrid mixes), "
             f"{HEADS} heads, {KV_HEADS} KV heads, 4 experts with 2 per token, the GPT-2 tokenizer's "
             f"vocabulary for causal LMs and BERT's for masked LMs; per-architecture settings in "
             f"`OVERRIDES`. {len(checked)} architectures checked, "
             f"{sum(1 for r in checked if all(c[0] in ('pass', 'n/a') for c in r.cells.values()))} "
             f"with no failure.", ""]
    for family in ("causal", "masked"):
        family_probes = [p for p in probes if any(p in r.cells for r in checked if r.arch.family == family)]
        lines += [f"## {family.capitalize()} LMs", "",
                  "Cells are eager attention's; the sdpa column says where sdpa differs in the "
                  "battery's checks, which sdpa runs too (— where the class has eager only).", "",
                  "| architecture | class | " + " | ".join(family_probes) + " | sdpa |",
                  "|---|---|" + "---|" * (len(family_probes) + 1)]
        for r in checked:
            if r.arch.family == family:
                cells = [_MARKS[r.cells[p][0]] if p in r.cells else "" for p in family_probes]
                twin = sdpa.get(r.arch.key)
                differs = [] if twin is None else [f"{p}: {twin.cells[p][0]}" for p in twin.cells
                                                   if twin.cells[p][0] != r.cells.get(p, ("",))[0]]
                lines.append(f"| {r.arch.model_type} | {r.arch.class_name} | " + " | ".join(cells) + " | "
                             + ("—" if twin is None else "; ".join(differs) or "same") + " |")
        lines.append("")
    lines += ["## Failures and their causes", "",
              "Each is the model's, reproduced without lmcheck where a source is given.", ""]
    for r in checked + list(sdpa.values()):
        for probe, (status, text) in r.cells.items():
            if r.attention == "sdpa" and r.cells[probe][0] == next(
                    (c.cells.get(probe, ("",))[0] for c in checked if c.arch.key == r.arch.key), ""):
                continue  # said once, under eager
            if status in ("fail", "error"):
                cause = KNOWN_DEFECTS.get((r.arch.key, probe), ("", "", "not classified yet"))[2]
                lines.append(f"- **{r.arch.model_type}** ({r.arch.family}, {r.arch.class_name}, "
                             f"{r.attention}), `{probe}` ({status}): {cause}. lmcheck says: "
                             f"{_cell(text)}")
    lines += ["", "## Notes", ""]
    lines += [f"- **{model_type}**: {note}." for model_type, note in NOTES.items()]
    lines += ["", "## Left out", ""]
    for arch in every_class():
        reason = left_out(arch)
        if reason is not None:
            lines.append(f"- {arch.model_type} ({arch.class_name}): {reason}")
    for r in rows:
        if r.build_error and r.attention == "eager":
            lines.append(f"- {r.arch.model_type} ({r.arch.class_name}): the tiny model cannot be built "
                         f"or run by the rule: {_cell(r.build_error)}")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")[:400]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("only", nargs="*", help="model types to run (default: all)")
    parser.add_argument("--family", choices=("causal", "masked"))
    parser.add_argument("--write", metavar="PATH", help="write the matrix as a Markdown page to PATH")
    parser.add_argument("--rows", metavar="PATH",
                        help="with --write: keep the outcomes in PATH (JSON), or render from it if it exists")
    args = parser.parse_args(argv)
    if args.write and args.rows and Path(args.rows).is_file():
        rows = [_row_from(item) for item in json.loads(Path(args.rows).read_text())]
        return _write(args.write, rows)
    rows = []
    toks = tokenizers()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for arch in architectures():
        if args.only and arch.model_type not in args.only:
            continue
        if args.family and arch.family != args.family:
            continue
        for attention in attentions(arch) if args.write else ("eager",):
            row = run_row(arch, toks[arch.family], attention=attention)
            rows.append(row)
            if row.build_error:
                print(f"{arch.key:32} {attention:5} BUILD {row.build_error}", flush=True)
                break
            bad = {k: v for k, v in row.cells.items() if v[0] not in ("pass",)}
            print(f"{arch.key:32} {attention:5} {row.seconds:5.1f}s " + ("ok" if not bad else ""), flush=True)
            for name, (status, text) in bad.items():
                print(f"    {status:5} {name}: {text[:400]}", flush=True)
    if args.write and args.rows:
        Path(args.rows).write_text(json.dumps([_row_to(r) for r in rows]))
    return _write(args.write, rows) if args.write else 0


def _write(path: str, rows: list[Row]) -> int:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(markdown(rows))
    print(f"written to {path}")
    return 0


def _row_to(row: Row) -> dict[str, Any]:
    return {"model_type": row.arch.model_type, "family": row.arch.family, "class_name": row.arch.class_name,
            "attention": row.attention, "cells": row.cells, "build_error": row.build_error,
            "seconds": row.seconds}


def _row_from(item: dict[str, Any]) -> Row:
    return Row(Architecture(item["model_type"], item["family"], item["class_name"]), item["attention"],
               {k: (v[0], v[1]) for k, v in item["cells"].items()}, item["build_error"], item["seconds"])


if __name__ == "__main__":
    sys.exit(main())
