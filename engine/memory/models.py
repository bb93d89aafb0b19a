"""Model dimensions for the memory estimator: read from a HF config.json, a preset, or a raw count.

Pure Python (no torch): `ModelDims` holds what the arithmetic needs, per family; `layer_linears` lists
each decoder block's linears (the unit for TP sharding, LoRA and 4-bit quantization); `param_counts`
gives exact per-module parameter counts, checked in tests against `sum(p.numel())` of real HF models.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from trellis.errors import ConfigError

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "opt", "bloom", "gpt_neox", "generic")


def _configs_dir() -> Path:
    from trellis.configs import PRESET_DIR

    return PRESET_DIR / "models"


def preset_dir() -> Path:
    return _configs_dir() / "presets"


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
    attn_impl: str = "sdpa"  # what the engine runs: sdpa, except BLOOM (ALiBi) on eager
    name: str = ""
    # `--params N` without dims: per-layer breakdown unknown, totals only.
    raw_params: int = 0
    extra: dict = field(default_factory=dict, compare=False)


def _get(c: dict, *keys, default=None):
    for k in keys:
        if c.get(k) is not None:
            return c[k]
    return default


def _require(c: dict, name: str, *keys):
    v = _get(c, *keys)
    if v is None:
        raise ConfigError(f"model config {name}: missing {' / '.join(keys)}; add it to config.json or pass "
                          f"the dimension on the command line")
    return v


def dims_from_hf_config(c: dict, name: str = "") -> ModelDims:
    """ModelDims from a HF config.json dict (llama/mistral/qwen2, gpt2, opt, bloom, gpt_neox)."""
    mt = c.get("model_type", "")
    label = name or mt or "config.json"
    vocab = int(_require(c, label, "vocab_size"))
    if mt in ("llama", "mistral", "qwen2"):
        h = int(_require(c, label, "hidden_size"))
        heads = int(_require(c, label, "num_attention_heads"))
        hd = int(_get(c, "head_dim", default=h // heads))
        qkv_bias = bool(c.get("attention_bias", False)) or mt == "qwen2"
        return ModelDims(family=mt, vocab=vocab, hidden=h, layers=int(_require(c, label, "num_hidden_layers")),
                         heads=heads, kv_heads=int(_get(c, "num_key_value_heads", default=heads)), head_dim=hd,
                         ffn=int(_require(c, label, "intermediate_size")),
                         tied=bool(c.get("tie_word_embeddings", False)), norm="rms", qkv_bias=qkv_bias,
                         o_bias=bool(c.get("attention_bias", False)), mlp_bias=bool(c.get("mlp_bias", False)),
                         gated_mlp=True, act=c.get("hidden_act", "silu"), rotary_dim=hd, name=name)
    if mt == "gpt2":
        h = int(_require(c, label, "n_embd", "hidden_size"))
        heads = int(_require(c, label, "n_head", "num_attention_heads"))
        return ModelDims(family="gpt2", vocab=vocab, hidden=h, layers=int(_require(c, label, "n_layer")),
                         heads=heads, kv_heads=heads, head_dim=h // heads,
                         ffn=int(_get(c, "n_inner", default=None) or 4 * h),
                         tied=bool(c.get("tie_word_embeddings", True)),
                         pos_embeddings=int(_get(c, "n_positions", default=1024)), norm="layer", qkv_bias=True,
                         o_bias=True, mlp_bias=True, gated_mlp=False, act=c.get("activation_function", "gelu_new"),
                         name=name)
    if mt == "opt":
        h = int(_require(c, label, "hidden_size"))
        heads = int(_require(c, label, "num_attention_heads"))
        proj = int(_get(c, "word_embed_proj_dim", default=h))
        bias = bool(c.get("enable_bias", True))
        final = bool(c.get("do_layer_norm_before", True)) and not c.get("_remove_final_layer_norm", False)
        return ModelDims(family="opt", vocab=vocab, hidden=h, layers=int(_require(c, label, "num_hidden_layers")),
                         heads=heads, kv_heads=heads, head_dim=h // heads, ffn=int(_require(c, label, "ffn_dim")),
                         tied=bool(c.get("tie_word_embeddings", True)),
                         pos_embeddings=int(_get(c, "max_position_embeddings", default=2048)) + 2,  # offset 2
                         norm="layer", qkv_bias=bias, o_bias=bias, mlp_bias=bias, gated_mlp=False,
                         act=c.get("activation_function", "relu"), proj_dim=proj if proj != h else 0,
                         final_norm=final, name=name)
    if mt == "bloom":
        h = int(_require(c, label, "hidden_size", "n_embed"))
        heads = int(_require(c, label, "n_head", "num_attention_heads"))
        return ModelDims(family="bloom", vocab=vocab, hidden=h, layers=int(_require(c, label, "n_layer")),
                         heads=heads, kv_heads=heads, head_dim=h // heads, ffn=4 * h,
                         tied=bool(c.get("tie_word_embeddings", True)), norm="layer", qkv_bias=True, o_bias=True,
                         mlp_bias=True, gated_mlp=False, act="bloom_gelu", embed_norm=True, attn_impl="eager",
                         name=name)
    if mt == "gpt_neox":
        h = int(_require(c, label, "hidden_size"))
        heads = int(_require(c, label, "num_attention_heads"))
        hd = h // heads
        bias = bool(c.get("attention_bias", True))
        return ModelDims(family="gpt_neox", vocab=vocab, hidden=h, layers=int(_require(c, label, "num_hidden_layers")),
                         heads=heads, kv_heads=heads, head_dim=hd, ffn=int(_require(c, label, "intermediate_size")),
                         tied=bool(c.get("tie_word_embeddings", False)), norm="layer", qkv_bias=bias, o_bias=bias,
                         mlp_bias=True, gated_mlp=False, act=c.get("hidden_act", "gelu"),
                         parallel_residual=bool(c.get("use_parallel_residual", True)),
                         rotary_dim=int(hd * float(c.get("rotary_pct", 0.25))), name=name)
    raise ConfigError(f"model config {label}: model_type={mt!r} is not supported by the estimator; supported: "
                      "llama, mistral, qwen2, gpt2, opt, bloom, gpt_neox (or use --params N with --hidden/--layers)")


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
    h, f = d.hidden, d.ffn
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    if d.family in ("llama", "mistral", "qwen2"):
        mlp = [Linear("mlp.gate_proj", h, f, d.mlp_bias, "col"), Linear("mlp.up_proj", h, f, d.mlp_bias, "col"),
               Linear("mlp.down_proj", f, h, d.mlp_bias, "row")]
        return [Linear("self_attn.q_proj", h, q, d.qkv_bias, "col"), Linear("self_attn.k_proj", h, kv, d.qkv_bias, "col"),
                Linear("self_attn.v_proj", h, kv, d.qkv_bias, "col"), Linear("self_attn.o_proj", q, h, d.o_bias, "row"),
                *mlp]
    if d.family == "gpt2":
        return [Linear("attn.c_attn", h, 3 * h, True, "col"), Linear("attn.c_proj", h, h, True, "row"),
                Linear("mlp.c_fc", h, f, True, "col"), Linear("mlp.c_proj", f, h, True, "row")]
    if d.family == "opt":
        return [Linear(f"self_attn.{n}_proj", h, h, d.qkv_bias, "col") for n in "qkv"] + [
            Linear("self_attn.out_proj", h, h, d.o_bias, "row"), Linear("fc1", h, f, d.mlp_bias, "col"),
            Linear("fc2", f, h, d.mlp_bias, "row")]
    if d.family == "bloom":
        return [Linear("self_attention.query_key_value", h, 3 * h, True, "col"),
                Linear("self_attention.dense", h, h, True, "row"), Linear("mlp.dense_h_to_4h", h, f, True, "col"),
                Linear("mlp.dense_4h_to_h", f, h, True, "row")]
    if d.family == "gpt_neox":
        return [Linear("attention.query_key_value", h, 3 * h, d.qkv_bias, "col"),
                Linear("attention.dense", h, h, d.o_bias, "row"), Linear("mlp.dense_h_to_4h", h, f, True, "col"),
                Linear("mlp.dense_4h_to_h", f, h, True, "row")]
    # generic GPT-style block: fused qkv, 4h MLP, biases
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
                       per_layer_linear_biases=b, per_layer_norms=2 * _norm_params(d),
                       final_norm=_norm_params(d) if d.final_norm else 0,
                       head=0 if d.tied else d.vocab * emb_dim)


def total_params(d: ModelDims) -> int:
    return d.raw_params or param_counts(d).total(d.layers)


def with_overrides(d: ModelDims, **kw) -> ModelDims:
    return replace(d, **{k: v for k, v in kw.items() if v})
