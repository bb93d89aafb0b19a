"""BLOOM: fused per-head QKV, ALiBi position bias (slopes follow the local heads), embedding LayerNorm."""

from .base import FamilySpec

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
)
