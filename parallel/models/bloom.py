"""BLOOM: fused per-head QKV, ALiBi position bias (slopes follow the local heads), embedding LayerNorm."""

from .base import FamilySpec


def _dims(c) -> dict:
    h = c.require("hidden_size", "n_embed")
    heads = c.require("n_head", "num_attention_heads")
    return dict(hidden=h, layers=c.require("n_layer"), heads=heads, kv_heads=heads, head_dim=h // heads, ffn=4 * h,
                tied=c.flag("tie_word_embeddings", True), norm="layer", qkv_bias=True, o_bias=True, mlp_bias=True,
                gated_mlp=False, act="bloom_gelu", embed_norm=True, attn_impl="eager")


SPEC = FamilySpec(
    name="bloom",
    model_types=("bloom",),
    backbone="transformer",
    layers="transformer.h",
    embed_tokens="transformer.word_embeddings",
    embed_norm="transformer.word_embeddings_layernorm",
    final_norm="transformer.ln_f",
    attention="self_attention",
    tp_plan={
        "self_attention.query_key_value": "colwise_qkv_headmajor",
        "self_attention.dense": "rowwise",
        "mlp.dense_h_to_4h": "colwise",
        "mlp.dense_4h_to_h": "rowwise",
    },
    default_lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    alibi=True,
    sp_plan={"input_layernorm": "norm", "self_attention": "gather", "post_attention_layernorm": "norm", "mlp": "gather"},
    read_dims=_dims,
    linears=(("self_attention.query_key_value", "hidden", "3*hidden", True), ("self_attention.dense", "hidden", "hidden", True),
             ("mlp.dense_h_to_4h", "hidden", "ffn", True), ("mlp.dense_4h_to_h", "ffn", "hidden", True)),
)
