"""GPT-NeoX / Pythia: fused per-head QKV, partial rotary, optional parallel residual."""

from .base import FamilySpec

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
)
