"""Offline conversion of a native checkpoint (no process group needed): full fp32 weights, HF directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from trellis.errors import CheckpointError, ConfigError
from trellis.parallel.hf_surgery import to_hf_state_dict

from . import io
from .safe_load import dcp_full_state


def require_native(path: Path, meta: dict, why: str) -> None:
    """CheckpointError unless the checkpoint's metadata says the native backend wrote it (DeepSpeed's
    files are layout-bound and read by DeepSpeed's own tools)."""
    writer = meta.get("zero", {}).get("backend", "native")
    if writer != "native":
        raise CheckpointError(f"{path}: written by the {writer} backend; {why}")


def full_sections(path: Path, sections: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Top-level sections ("model", "optim", "adalora", ...) of a native checkpoint's state as unsharded
    tensors keyed as saved (FQNs for "model"), whatever layout wrote it, from one read of the checkpoint;
    {} for a section the checkpoint lacks."""
    meta = io.verify(path)
    require_native(path, meta, "convert it with its fp32/universal tools")
    state = dcp_full_state(path / "state")  # allow-listed unpickling (checkpoint/safe_load.py)

    def section(name: str) -> dict[str, torch.Tensor]:
        if isinstance(state.get(name), dict):  # DCP keeps the nesting of what we saved
            return dict(state[name])
        return {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}

    return {name: section(name) for name in sections}


def full_model_state(path: Path) -> dict[str, torch.Tensor]:
    """Unsharded model tensors (FQN -> tensor) of a native checkpoint, whatever layout wrote it."""
    return full_sections(path, ("model",))["model"]


def to_fp32_safetensors(path: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    sd = {k: v.float().contiguous() for k, v in full_model_state(path).items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"))
    return out / "model.safetensors"


def write_hf_extras(out: Path, checkpoint: Path, config) -> list[str]:
    """What `from_pretrained` users expect next to the weights: the run's tokenizer files (so
    `AutoTokenizer.from_pretrained(out)` works) and a generation_config.json (bos/eos/pad ids from the model
    config). The tokenizer is the one training used (model.tokenizer, else the model directory's, else the
    shipped one: engine/tokenizer.py find_tokenizer), read from the checkpoint's config.toml. Returns the files
    written; a tokenizer that is no longer where the run found it is a warning, not a lost export."""
    from transformers import GenerationConfig

    from trellis import configs

    from ..model import resolve_model_dir
    from ..tokenizer import find_tokenizer, load_tokenizer

    before = {f.name for f in out.iterdir()}
    if not (out / "generation_config.json").is_file():
        GenerationConfig.from_model_config(config).save_pretrained(str(out))
    try:
        cfg = configs.load(str(checkpoint / "config.toml"))
        tok = load_tokenizer(find_tokenizer(resolve_model_dir(cfg.model.path), cfg.model.tokenizer))
    except (ConfigError, OSError) as e:
        print(f"warning: {out}: no tokenizer files written ({e}); copy the run's tokenizer there", file=sys.stderr)
    else:
        tok.save_pretrained(str(out))
    return sorted({f.name for f in out.iterdir()} - before)


def to_hf(path: Path, out: Path) -> Path:
    """A directory `AutoModelForCausalLM.from_pretrained` loads (full fine-tuning checkpoints)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = io.verify(path)
    if meta.get("peft", "none") != "none":
        raise CheckpointError(f"{path}: a PEFT checkpoint holds adapters only; use `trellis export adapter` / `merged`")
    hf = dict(meta["hf_config"])
    config = AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sd = to_hf_state_dict(full_model_state(path), config.model_type)
    missing = set(model.state_dict()) - set(sd)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if missing - tied:
        raise CheckpointError(f"{path}: checkpoint lacks {sorted(missing - tied)[:5]}")
    model.load_state_dict(sd, strict=False, assign=True)
    if tied:
        model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    write_hf_extras(out, path, config)
    (out / "trellis_checkpoint.json").write_text(json.dumps({"source": str(path), "step": meta["step"]}))
    return out
