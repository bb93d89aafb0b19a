"""Build the HF causal LM (random init from a config, or from_pretrained from a local directory)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trellis.configs import PRESET_DIR
from trellis.errors import ConfigError

# Families transformers cannot run with sdpa attention (BLOOM: ALiBi; Gemma-2: soft-capped attention logits).
_NO_SDPA = ("bloom", "gemma2")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def shipped_models_dir() -> Path:
    return PRESET_DIR / "models"


def resolve_model_dir(path: str) -> Path:
    """A directory with config.json, a config.json file's directory, or a shipped model name."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if p.is_file() and p.name.endswith(".json"):
        return p.parent
    shipped = shipped_models_dir() / path
    if (shipped / "config.json").is_file():
        return shipped
    names = sorted(d.name for d in shipped_models_dir().iterdir() if (d / "config.json").is_file())
    raise ConfigError(f"model.path={path!r}: not a directory with config.json nor a shipped model "
                      f"({', '.join(names)})")


def has_weights(model_dir: Path) -> bool:
    return any((model_dir / f).is_file() for f in _WEIGHT_FILES)


def load_hf_config(model_cfg):
    from transformers import AutoConfig

    model_dir = resolve_model_dir(model_cfg.path)
    p = Path(model_cfg.path)
    if p.is_file():
        hf = AutoConfig.for_model(**json.loads(p.read_text()))
    else:
        hf = AutoConfig.from_pretrained(str(model_dir))
    hf.use_cache = False
    return model_dir, hf


def build_model(model_cfg, *, seed: int, device: str | torch.device = "cpu"):
    """The full (unsharded) model in fp32 on `device`; parallelize() shards it afterwards.

    Random init is seeded, so every rank builds bit-identical weights without a broadcast.
    """
    from transformers import AutoModelForCausalLM

    model_dir, hf_config = load_hf_config(model_cfg)
    pretrained = model_cfg.init == "pretrained" or (model_cfg.init == "auto" and has_weights(model_dir))
    if model_cfg.init == "pretrained" and not has_weights(model_dir):
        raise ConfigError(f"model.init='pretrained' but {model_dir} has no weights ({', '.join(_WEIGHT_FILES)})")
    attn = model_cfg.attn_implementation
    if attn == "sdpa" and hf_config.model_type in _NO_SDPA:
        attn = "eager"  # BLOOM: ALiBi needs the eager path (its model-level mask is causal); Gemma-2: softcap
    if pretrained:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), config=hf_config, dtype=torch.float32, attn_implementation=attn)
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    # from_pretrained returns the model in eval mode: dropout off (and on CPUs with AVX512-BF16, bitsandbytes repacks
    # an eval-mode 4-bit linear whose input needs no grad into its bf16 inference kernel). A model built for
    # training trains.
    model.train()
    return model.to(device), model_dir


def check_vocab(model, tokenizer) -> None:
    """The model's embedding may have more rows than the tokenizer has tokens (a padded vocabulary: Qwen2.5,
    Pythia/GPT-NeoX, OPT and BLOOM publish embeddings rounded up to a multiple of 64 or 128); fewer is an error.

    Padded rows are never targets: every id the engine trains on comes from the tokenizer (engine/data tokenizes
    text, prompt/response, chat and preference records with it; packing and padding use its eos/pad ids; the eval
    set and DPO's chosen/rejected labels are built the same way; ignored positions are -100), so labels are always
    < len(tokenizer). The padded rows only receive logits, which the softmax of the loss pushes down."""
    v_model = model.config.vocab_size
    v_tok = len(tokenizer)
    if v_model < v_tok:
        raise ConfigError(
            f"model vocab_size={v_model} < tokenizer size {v_tok}: the tokenizer has ids the model has no embedding "
            "for; set model.tokenizer to the tokenizer the model was built for, or set vocab_size >= "
            f"{v_tok} in the model's config.json")


def check_family_config(hf_config, seq_len: int) -> None:
    """The family's own limits (parallel/models/<family>.py `check_config`): sliding windows, RoPE types."""
    from trellis.parallel.models import family_for

    check = family_for(hf_config.model_type).check_config
    msg = check(hf_config, seq_len) if check is not None else None
    if msg:
        raise ConfigError(msg)
