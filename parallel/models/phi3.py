"""Phi-3: fused [q | k | v] qkv_proj and [gate | up] gate_up_proj (contiguous parts, not head-interleaved).

parallel/hf_surgery.py unfuses both on every layout (qkv_proj.{q,k,v}, gate_up_proj.{gate,up}), so tensor
parallel shards each part by whole heads / its own rows like Llama's separate projections, and export
re-fuses them. RoPE: default and LongRoPE ("longrope"; the old "su" name is read as it by transformers).
"""

from .base import FamilySpec
from .checks import sliding_window_limit

_ROPE = ("default", "longrope", "su")


def _dims(c) -> dict:
    h = c.require("hidden_size")
    heads = c.require("num_attention_heads")
    hd = int(c.get("head_dim", default=h // heads))
    return dict(hidden=h, layers=c.require("num_hidden_layers"), heads=heads,
                kv_heads=int(c.get("num_key_value_heads", default=heads)), head_dim=hd,
                ffn=c.require("intermediate_size"),
                tied=c.flag("tie_word_embeddings", False), norm="rms", gated_mlp=True,
                act=c.get("hidden_act", default="silu"),
                rotary_dim=int(hd * float(c.get("partial_rotary_factor", default=1.0))))


def _rope_type(c) -> str:
    rp = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    return str(rp.get("rope_type") or rp.get("type") or "default")


def _check(c, seq_len: int) -> str | None:
    kind = _rope_type(c)
    if kind not in _ROPE:
        return (f"model config: rope_scaling type {kind!r} is not supported for phi3 (supported: default, longrope); "
                "remove rope_scaling from config.json or use a longrope model")
    return sliding_window_limit(c, seq_len, layers_slide=True)  # Phi-3: every layer slides when set


SPEC = FamilySpec(
    name="phi3",
    model_types=("phi3",),
    backbone="model",
    layers="model.layers",
    embed_tokens="model.embed_tokens",
    final_norm="model.norm",
    rotary_emb="model.rotary_emb",
    attention="self_attn",
    tp_plan={
        "self_attn.qkv_proj.q": "colwise",
        "self_attn.qkv_proj.k": "colwise",
        "self_attn.qkv_proj.v": "colwise",
        "self_attn.o_proj": "rowwise",
        "mlp.gate_up_proj.gate": "colwise",
        "mlp.gate_up_proj.up": "colwise",
        "mlp.down_proj": "rowwise",
    },
    default_lora_targets=("qkv_proj.q", "qkv_proj.k", "qkv_proj.v", "o_proj", "gate_up_proj.gate", "gate_up_proj.up",
                          "down_proj"),
    sp_plan={"input_layernorm": "norm", "self_attn": "gather", "post_attention_layernorm": "norm", "mlp": "gather"},
    read_dims=_dims,
    # as HF has them: fused qkv_proj and gate_up_proj (hf_surgery unfuses them into the parts of the TP plan)
    linears=(("self_attn.qkv_proj", "hidden", "q+2*kv", False), ("self_attn.o_proj", "q", "hidden", False),
             ("mlp.gate_up_proj", "hidden", "2*ffn", False), ("mlp.down_proj", "ffn", "hidden", False)),
    fused={"self_attn.qkv_proj": (("q", "q"), ("k", "kv"), ("v", "kv")),
           "mlp.gate_up_proj": (("gate", "ffn"), ("up", "ffn"))},
    check_config=_check,
)
