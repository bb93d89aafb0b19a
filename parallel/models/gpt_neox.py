"""GPT-NeoX / Pythia: fused per-head QKV, partial rotary, optional parallel residual."""

from .base import FamilySpec


def _dims(c) -> dict:
    h = c.require("hidden_size")
    heads = c.require("num_attention_heads")
    hd = h // heads
    bias = c.flag("attention_bias", True)
    return dict(hidden=h, layers=c.require("num_hidden_layers"), heads=heads, kv_heads=heads, head_dim=hd,
                ffn=c.require("intermediate_size"), tied=c.flag("tie_word_embeddings", False), norm="layer",
                qkv_bias=bias, o_bias=bias, mlp_bias=True, gated_mlp=False, act=c.get("hidden_act", default="gelu"),
                parallel_residual=c.flag("use_parallel_residual", True),
                rotary_dim=int(hd * float(c.get("rotary_pct", default=0.25))))


SPEC = FamilySpec(
    name="gpt_neox",
    model_types=("gpt_neox",),
    backbone="gpt_neox",
    layers="gpt_neox.layers",
    embed_tokens="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    rotary_emb="gpt_neox.rotary_emb",
    attention="attention",
    tp_plan={
        "attention.query_key_value": "colwise_qkv_headmajor",
        "attention.dense": "rowwise",
        "mlp.dense_h_to_4h": "colwise",
        "mlp.dense_4h_to_h": "rowwise",
    },
    default_lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    sp_plan={"input_layernorm": "norm", "attention": "gather", "post_attention_layernorm": "norm", "mlp": "gather"},
    read_dims=_dims,
    linears=(("attention.query_key_value", "hidden", "3*hidden", "qkv_bias"), ("attention.dense", "hidden", "hidden", "o_bias"),
             ("mlp.dense_h_to_4h", "hidden", "ffn", True), ("mlp.dense_4h_to_h", "ffn", "hidden", True)),
)
