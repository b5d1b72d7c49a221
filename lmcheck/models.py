"""Model presets and builders: tiny named configurations, and models built from them.

Presets are plain dictionaries in the style of minGPT (``'gpt-nano': dict(n_layer=3, ...)``):
the tutorial's full-size models and small ones that train in seconds on a CPU. Builders align a
configuration with a tokenizer (vocabulary size, special ids, positions) so that the two can
never disagree silently.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmcheck import assets
from lmcheck._validate import check_int, check_seed, check_tokenizer, describe
from lmcheck.errors import InputError

__all__ = [
    "BERT_PRESETS",
    "GPT2_PRESETS",
    "bert_config",
    "bert_from_scratch",
    "gpt2_config",
    "gpt2_from_scratch",
    "load_causal_lm",
    "load_language_model",
    "load_smollm2",
    "smollm2_folder",
]

MAX_CONTEXT = 2**20  # positions; a longer context is a typo, and its table would not fit in memory

GPT2_PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),  # the tutorial's 124M
    "gpt2-small-cpu": dict(n_layer=4, n_head=4, n_embd=256, n_positions=256),
    "gpt2-tiny-cpu": dict(n_layer=2, n_head=2, n_embd=128, n_positions=256),
    "gpt2-mini-cpu": dict(n_layer=2, n_head=2, n_embd=160, n_positions=256),  # chapter 4's CPU default
}

BERT_PRESETS: dict[str, dict[str, int]] = {
    "bert-base": dict(num_hidden_layers=12, num_attention_heads=12, hidden_size=768,
                      intermediate_size=3072, max_position_embeddings=512),
    "bert-tiny-cpu": dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=128,
                          intermediate_size=512, max_position_embeddings=256),
}


def _preset(presets: dict[str, dict[str, int]], preset: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(preset, Mapping):
        return dict(preset)
    if not isinstance(preset, str) or preset not in presets:
        raise InputError(f"'preset' must be one of {', '.join(presets)} or a dict (got {describe(preset)})")
    return dict(presets[preset])


def gpt2_config(
    tokenizer: PreTrainedTokenizerBase, *, preset: str | Mapping[str, Any] = "gpt2",
    context_length: int | None = None, **overrides: Any,
) -> GPT2Config:
    """A GPT-2 configuration aligned with ``tokenizer``: vocabulary size, bos/eos, pad = eos.

    ``context_length`` raises ``n_positions`` to at least that. ``overrides`` go to GPT2Config.
    """
    check_tokenizer(tokenizer)
    settings = _preset(GPT2_PRESETS, preset)
    if context_length is not None:
        check_int(context_length, "context_length", 1, MAX_CONTEXT, "2**20")
        settings["n_positions"] = max(settings.get("n_positions", 1024), context_length)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else len(tokenizer) - 1
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    settings.update(vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    settings.update(overrides)
    return _config(GPT2Config, settings)


def gpt2_from_scratch(
    tokenizer: PreTrainedTokenizerBase, *, preset: str | Mapping[str, Any] = "gpt2", seed: int = 42,
    context_length: int | None = None, **overrides: Any,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT2LMHeadModel (seeded) whose configuration fits ``tokenizer``.

    Example:
        >>> model = gpt2_from_scratch(load_tokenizer("gpt2"), preset="gpt2-tiny-cpu")
        >>> model.config.vocab_size
        50257
    """
    check_seed(seed)
    config = gpt2_config(tokenizer, preset=preset, context_length=context_length, **overrides)
    with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's RNG state is kept
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    # transformers maps GPT2LMHeadModel to no loss type and warns at every forward with labels;
    # it is a plain causal-LM loss (shifted labels).
    model.loss_type = "ForCausalLM"
    return model


def bert_config(
    tokenizer: PreTrainedTokenizerBase, *, preset: str | Mapping[str, Any] = "bert-base", **overrides: Any,
) -> BertConfig:
    """A BERT configuration aligned with ``tokenizer``: vocabulary size and pad id."""
    check_tokenizer(tokenizer)
    settings = _preset(BERT_PRESETS, preset)
    settings.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0)
    settings.update(overrides)
    return _config(BertConfig, settings)


def _config(kind: type[Any], settings: dict[str, Any]) -> Any:
    """``kind(**settings)``, with a bad preset or override named instead of a traceback."""
    try:
        return kind(**settings)
    except (TypeError, ValueError) as error:
        raise InputError(f"'preset' and overrides must be valid {kind.__name__} settings "
                         f"(got {describe(settings)}: {error})") from None


def bert_from_scratch(
    tokenizer: PreTrainedTokenizerBase, *, preset: str | Mapping[str, Any] = "bert-base", seed: int = 42,
    **overrides: Any,
) -> BertForMaskedLM:
    """A randomly initialised BertForMaskedLM (seeded) whose configuration fits ``tokenizer``."""
    check_seed(seed)
    config = bert_config(tokenizer, preset=preset, **overrides)
    with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's RNG state is kept
        torch.manual_seed(seed)
        return BertForMaskedLM(config)


def parameter_count(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) in seen or (trainable_only and not parameter.requires_grad):
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    return total


SMOLLM2_ASSET = "smollm2-135m-instruct-gguf"
SMOLLM2_DERIVED = "smollm2-135m-instruct"  # the safetensors conversion, in the asset cache


def load_smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from the offline assets, in float32 and eval mode, with its tokenizer.

    The first use converts the GGUF file (:func:`smollm2_folder`, about 8 s on 2 cores); later
    uses load the converted folder (a few seconds).

    Example:
        >>> model, tokenizer = load_smollm2()
        >>> model.config.vocab_size
        49152
    """
    return load_causal_lm(smollm2_folder())


def smollm2_folder() -> Path:
    """The folder of SmolLM2-135M-Instruct as safetensors (model and tokenizer), converted from
    the GGUF asset on first use and kept in the asset cache (``lmcheck assets fetch`` makes it).

    The conversion dequantizes the GGUF file to float32, writes a temporary folder and renames it
    into place under a file lock, so parallel test workers never see half a model.
    """
    folder = assets.derived_dir(SMOLLM2_DERIVED)
    converted = folder / "model"
    with FileLock(str(folder / ".convert.lock")):
        if not (converted / "model.safetensors").is_file():
            gguf = assets.asset_path(SMOLLM2_ASSET)
            with _gguf_parsed_once():
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            # The GGUF loader marks the model as quantized although its weights are now plain
            # float32, and save_pretrained refuses quantized models: drop that mark first.
            setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a Module attribute)
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            partial = tempfile.mkdtemp(dir=folder, prefix=".model-")
            os.chmod(partial, 0o755)  # mkdtemp makes it private; the cache is shared
            try:
                model.save_pretrained(partial)
                tokenizer.save_pretrained(partial)
                shutil.rmtree(converted, ignore_errors=True)
                os.replace(partial, converted)  # atomic: readers see no folder or a whole one
            finally:
                shutil.rmtree(partial, ignore_errors=True)
    return converted


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, gguf's file reader and tensor-name map are made once per argument.

    transformers parses a GGUF file three times (for the config, the weights and the tokenizer)
    and builds gguf's tensor-name map once per submodule. For SmolLM2 that was 12 of the
    conversion's 16 s on 2 cores. The reader only reads and the map only answers lookups, so
    sharing them changes nothing that transformers computes. transformers imports both from
    ``gguf`` at each call, which is where they are replaced.
    """
    import gguf

    make_reader, make_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = make_reader(path, mode)  # type: ignore[arg-type]
        return readers[key]

    with mock.patch.object(gguf, "GGUFReader", reader), \
            mock.patch.object(gguf, "get_tensor_name_map", functools.cache(make_name_map)):
        yield


def load_causal_lm(
    name_or_path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
    local_files_only: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any causal LM and its tokenizer from a local folder or the Hugging Face cache, in eval mode.

    ``"smollm2"`` gives :func:`load_smollm2`'s offline model. Weights load from safetensors only,
    and a repository's own code is never run (``trust_remote_code=False``).
    ``local_files_only`` never touches the network (the local Hugging Face cache only).

    Raises:
        InputError: the name is not a string or path, or nothing loadable is found under it.
    """
    return _load(name_or_path, AutoModelForCausalLM, "causal LM", dtype, local_files_only)


def load_language_model(
    name_or_path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
    local_files_only: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal or a masked LM, as its config's ``architectures`` names it (``BertForMaskedLM``
    loads as a masked LM, anything else as :func:`load_causal_lm` does)."""
    if isinstance(name_or_path, (str, os.PathLike)) and str(name_or_path) and str(name_or_path) != "smollm2":
        try:
            config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=False,
                                                local_files_only=local_files_only)
        except (OSError, ValueError):
            config = None  # load_causal_lm says what is missing
        if any(str(a).endswith("ForMaskedLM") for a in getattr(config, "architectures", None) or ()):
            return _load(name_or_path, AutoModelForMaskedLM, "masked LM", dtype, local_files_only)
    return load_causal_lm(name_or_path, dtype=dtype, local_files_only=local_files_only)


def _load(name_or_path: str | os.PathLike[str], auto: Any, what: str, dtype: torch.dtype,
          local_files_only: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise InputError(
            f"'name_or_path' must be a model name or folder (got {describe(name_or_path)})"
        )
    if str(name_or_path) == "smollm2":
        return load_smollm2()
    try:
        model = auto.from_pretrained(
            str(name_or_path), dtype=dtype, use_safetensors=True, trust_remote_code=False,
            local_files_only=local_files_only,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(name_or_path), trust_remote_code=False, local_files_only=local_files_only,
        )
    except (OSError, ValueError) as error:
        raise InputError(
            f"{what} {str(name_or_path)!r} is neither a local folder with safetensors weights "
            f"nor in the Hugging Face cache ({str(error).splitlines()[0]})"
        ) from None
    return model.eval(), tokenizer
