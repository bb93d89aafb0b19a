"""Model dimensions for the memory estimator: a HF config.json, a preset, or a raw count.

Pure Python (no torch): `ModelDims` and its reader are parallel/models/dims.py (one reader for the engine
and the estimator); `layer_linears` lists each decoder block's linears (the unit for TP sharding, LoRA and
4-bit quantization) from the family spec; `param_counts` gives exact per-module parameter counts, checked in
tests against `sum(p.numel())` of real HF models.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from trellis.configs import PRESET_DIR
from trellis.errors import ConfigError
from trellis.parallel.models import family_for
from trellis.parallel.models.dims import Linear, ModelDims, dims_from_hf_config, linear_shapes

__all__ = ["Linear", "ModelDims", "dims_from_hf_config", "dims_from_params", "layer_linears", "param_counts",
           "preset_names", "resolve_model", "total_params", "with_overrides"]

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2", "opt", "bloom", "gpt_neox", "generic")


def _configs_dir() -> Path:
    return PRESET_DIR / "models"


def preset_dir() -> Path:
    return _configs_dir() / "presets"


def dims_from_params(n: int, *, hidden: int = 0, layers: int = 0, heads: int = 0, kv_heads: int = 0,
                     vocab: int = 0, ffn: int = 0) -> ModelDims:
    """`--params N` with optional dims (needed only for activations and TP/PP splits)."""
    if n <= 0:
        raise ConfigError(f"--params={n}: must be a positive parameter count, e.g. 7e9 or 7B")
    heads = heads or (hidden // 128 if hidden else 0) or 1
    return ModelDims(family="generic", vocab=vocab, hidden=hidden, layers=layers, heads=heads,
                     kv_heads=kv_heads or heads, head_dim=hidden // heads if hidden else 0,
                     ffn=ffn or 4 * hidden, gated_mlp=False, act="gelu", norm="layer", raw_params=int(n),
                     name=f"{n:.4g} params")


def preset_names() -> list[str]:
    shipped = [d.name for d in _configs_dir().iterdir() if (d / "config.json").is_file()]
    return sorted([p.stem for p in preset_dir().glob("*.json")] + shipped)


def resolve_model(spec: str) -> ModelDims:
    """A HF model dir, a config.json path, a shipped model (tiny-llama) or a preset (llama-2-7b)."""
    p = Path(spec)
    if p.is_dir() and (p / "config.json").is_file():
        return dims_from_hf_config(json.loads((p / "config.json").read_text()), name=spec)
    if p.is_file():
        return dims_from_hf_config(json.loads(p.read_text()), name=p.stem if p.name != "config.json" else spec)
    key = spec.lower()
    for cand in (_configs_dir() / key / "config.json", preset_dir() / f"{key}.json"):
        if cand.is_file():
            return dims_from_hf_config(json.loads(cand.read_text()), name=key)
    names = preset_names()
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known presets: {', '.join(names)}"
    raise ConfigError(f"--model {spec!r}: not a HF model directory, a config.json, nor a preset; {hint}")


# ---- parameter counts -------------------------------------------------------------------------------
def layer_linears(d: ModelDims) -> list[Linear]:
    """Each decoder block's linears: the family spec's (parallel/models/<family>.py), or a generic GPT block."""
    if d.family != "generic":
        return linear_shapes(d, family_for(d.family))
    h, f = d.hidden, d.ffn  # generic GPT-style block: fused qkv, 4h MLP, biases
    return [Linear("attn.qkv", h, 3 * h, True, "col"), Linear("attn.out", h, h, True, "row"),
            Linear("mlp.fc1", h, f, True, "col"), Linear("mlp.fc2", f, h, True, "row")]


def _norm_params(d: ModelDims) -> int:
    return d.hidden * (2 if d.norm == "layer" else 1)


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token (+ position, + OPT project_in/out, + BLOOM embedding norm)
    vocab_embedding: int  # the vocab-sized part (sharded over tp)
    per_layer_linear_weights: int
    per_layer_linear_biases: int
    per_layer_norms: int
    final_norm: int
    head: int  # 0 when tied to the embedding

    @property
    def per_layer(self) -> int:
        return self.per_layer_linear_weights + self.per_layer_linear_biases + self.per_layer_norms

    def total(self, layers: int) -> int:
        return self.embedding + layers * self.per_layer + self.final_norm + self.head


def param_counts(d: ModelDims) -> ParamCounts:
    if d.raw_params:
        # --params N: treat everything as decoder layers (no embedding/head split known).
        per = d.raw_params // max(d.layers, 1)
        return ParamCounts(0, 0, per, 0, 0, 0, d.raw_params - per * max(d.layers, 1))
    lin = layer_linears(d)
    w = sum(x.fan_in * x.fan_out for x in lin)
    b = sum(x.fan_out for x in lin if x.bias)
    emb_dim = d.proj_dim or d.hidden
    vocab_emb = d.vocab * emb_dim
    emb = vocab_emb + d.pos_embeddings * d.hidden
    if d.proj_dim:
        emb += 2 * d.proj_dim * d.hidden  # OPT project_in + project_out (no bias)
    if d.embed_norm:
        emb += 2 * d.hidden
    return ParamCounts(embedding=emb, vocab_embedding=vocab_emb, per_layer_linear_weights=w,
                       per_layer_linear_biases=b,
                       per_layer_norms=d.block_norms * _norm_params(d) + (2 * d.head_dim if d.qk_norm else 0),
                       final_norm=_norm_params(d) if d.final_norm else 0,
                       head=0 if d.tied else d.vocab * emb_dim)


def total_params(d: ModelDims) -> int:
    return d.raw_params or param_counts(d).total(d.layers)


def with_overrides(d: ModelDims, **kw) -> ModelDims:
    return replace(d, **{k: v for k, v in kw.items() if v})
