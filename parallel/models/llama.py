"""Llama, Mistral, Qwen2: q/k/v/gate/up column-parallel, o/down row-parallel; GQA kv heads sharded."""

from .base import FamilySpec


def _dims(c) -> dict:
    h = c.require("hidden_size")
    heads = c.require("num_attention_heads")
    hd = int(c.get("head_dim", default=h // heads))
    mt = c.get("model_type")
    return dict(hidden=h, layers=c.require("num_hidden_layers"), heads=heads,
                kv_heads=int(c.get("num_key_value_heads", default=heads)), head_dim=hd, ffn=c.require("intermediate_size"),
                tied=c.flag("tie_word_embeddings", False), norm="rms",
                qkv_bias=c.flag("attention_bias", False) or mt == "qwen2", o_bias=c.flag("attention_bias", False),
                mlp_bias=c.flag("mlp_bias", False), gated_mlp=True, act=c.get("hidden_act", default="silu"), rotary_dim=hd)


SPEC = FamilySpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    backbone="model",
    layers="model.layers",
    embed_tokens="model.embed_tokens",
    final_norm="model.norm",
    rotary_emb="model.rotary_emb",
    attention="self_attn",
    tp_plan={
        "self_attn.q_proj": "colwise",
        "self_attn.k_proj": "colwise",
        "self_attn.v_proj": "colwise",
        "self_attn.o_proj": "rowwise",
        "mlp.gate_proj": "colwise",
        "mlp.up_proj": "colwise",
        "mlp.down_proj": "rowwise",
    },
    default_lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    sp_plan={"input_layernorm": "norm", "self_attn": "gather", "post_attention_layernorm": "norm", "mlp": "gather"},
    read_dims=_dims,
    linears=(("self_attn.q_proj", "hidden", "q", "qkv_bias"), ("self_attn.k_proj", "hidden", "kv", "qkv_bias"),
             ("self_attn.v_proj", "hidden", "kv", "qkv_bias"), ("self_attn.o_proj", "q", "hidden", "o_bias"),
             ("mlp.gate_proj", "hidden", "ffn", "mlp_bias"), ("mlp.up_proj", "hidden", "ffn", "mlp_bias"),
             ("mlp.down_proj", "ffn", "hidden", "mlp_bias")),
)
