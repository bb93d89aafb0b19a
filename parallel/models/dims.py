"""Model dimensions read from a Hugging Face config: the one reader, for parallelize's layout checks, the
checkpoint's model signature and the memory estimator. Pure Python (no torch import).

`dims_from_hf_config(c)` takes a config.json dict or a `PretrainedConfig` and returns `ModelDims`; each
family's spec (parallel/models/<family>.py) says which config keys hold what (`FamilySpec.read_dims`) and
lists its decoder block's linears (`FamilySpec.linears`), so `linear_shapes(d, spec)` sizes them for the
estimator with the TP style of the family's own tensor-parallel plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trellis.errors import ConfigError

from . import FAMILIES, family_for
from .base import FamilySpec


@dataclass(frozen=True)
class Linear:
    name: str  # HF module name inside the decoder block, e.g. "self_attn.q_proj"
    fan_in: int
    fan_out: int
    bias: bool
    style: str  # "col" (out-features sharded over tp) or "row" (in-features sharded)


@dataclass(frozen=True, kw_only=True)
class ModelDims:
    family: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tied: bool = False
    pos_embeddings: int = 0  # rows of a learned position table (gpt2, opt); 0 = rotary / ALiBi
    norm: str = "rms"  # "rms" (weight only) | "layer" (weight + bias)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    gated_mlp: bool = True
    act: str = "silu"
    proj_dim: int = 0  # OPT word_embed_proj_dim when it differs from hidden (project_in/out)
    embed_norm: bool = False  # BLOOM word_embeddings_layernorm
    final_norm: bool = True
    parallel_residual: bool = False
    rotary_dim: int = 0
    attn_impl: str = "sdpa"  # what the engine runs: sdpa, except BLOOM (ALiBi) and Gemma-2 (softcap) on eager
    block_norms: int = 2  # norms per decoder block (Gemma-2: 4, pre and post attention and MLP)
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3): 2 x head_dim weights per block
    name: str = ""
    # `--params N` without dims: per-layer breakdown unknown, totals only.
    raw_params: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    def signature(self) -> dict[str, int]:
        """The dims a checkpoint records and a resume compares (and the layout checks read)."""
        return {"num_heads": self.heads, "num_kv_heads": self.kv_heads, "num_layers": self.layers,
                "hidden_size": self.hidden, "intermediate_size": self.ffn, "vocab_size": self.vocab}


class ConfigReader:
    """What a family's `read_dims` reads a config through: the first present key, or a clear error."""

    def __init__(self, c: dict, label: str):
        self.c, self.label = c, label

    def get(self, *keys, default=None):
        for k in keys:
            if self.c.get(k) is not None:
                return self.c[k]
        return default

    def require(self, *keys) -> int:
        v = self.get(*keys)
        if v is None:
            raise ConfigError(f"model config {self.label}: missing {' / '.join(keys)}; add it to config.json or "
                              "pass the dimension on the command line")
        return int(v)

    def flag(self, key: str, default: bool) -> bool:
        return bool(self.c.get(key, default))


def dims_from_hf_config(c, name: str = "") -> ModelDims:
    """ModelDims from a HF config.json dict or a transformers `PretrainedConfig`."""
    if not isinstance(c, dict):
        c = c.to_dict()
    mt = c.get("model_type", "")
    label = name or mt or "config.json"
    if not any(mt in f.model_types for f in FAMILIES):
        supported = ", ".join(sorted(t for f in FAMILIES for t in f.model_types))
        raise ConfigError(f"model config {label}: model_type={mt!r} is not supported; supported: {supported} "
                          "(the estimator also takes --params N with --hidden/--layers)")
    r = ConfigReader(c, label)
    vocab = r.require("vocab_size")
    return ModelDims(family=mt, vocab=vocab, name=name, **family_for(mt).read_dims(r))


def _size(d: ModelDims, expr: str) -> int:
    """A linear's width from the spec's expression: "hidden", "ffn", "q" (heads × head_dim), "kv"
    (kv_heads × head_dim), optionally times an integer ("3*hidden"), or a sum of those ("q+2*kv")."""
    if "+" in expr:
        return sum(_size(d, e) for e in expr.split("+"))
    k, _, dim = expr.rpartition("*")
    base = {"q": d.heads * d.head_dim, "kv": d.kv_heads * d.head_dim}.get(dim)
    return (int(k) if k else 1) * (base if base is not None else getattr(d, dim))


def size_of(d: ModelDims, expr: str) -> int:
    """Public form of the width expressions of `FamilySpec.linears` / `FamilySpec.fused`."""
    return _size(d, expr)


def tp_style(spec: FamilySpec, path: str) -> str:
    """"col" or "row": the family's TP style of a block linear (a linear parallel/hf_surgery.py splits, like
    GPT-2's c_attn into q/k/v, takes its parts' style)."""
    kinds = {spec.tp_plan[p] for p in spec.tp_plan if p == path or p.startswith(path + ".")}
    if len(kinds) != 1:
        raise ValueError(f"{spec.name}: linear {path!r} has {'no' if not kinds else 'a mixed'} tensor-parallel style")
    return "row" if kinds.pop() == "rowwise" else "col"


def linear_shapes(d: ModelDims, spec: FamilySpec) -> list[Linear]:
    """The decoder block's linears of `spec` sized for `d` (the unit for TP sharding, LoRA and 4-bit)."""
    out = []
    for path, fan_in, fan_out, bias in spec.linears:
        out.append(Linear(path, _size(d, fan_in), _size(d, fan_out), bias is True or (bias is not False and
                          bool(getattr(d, bias))), tp_style(spec, path)))
    return out
