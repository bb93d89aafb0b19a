"""GPT-2: Conv1D weights (converted to Linear first), fused [q|k|v] c_attn, tied embeddings."""

from .base import FamilySpec

SPEC = FamilySpec(
    name="gpt2",
    model_types=("gpt2",),
    backbone="transformer",
    layers="transformer.h",
    embed_tokens="transformer.wte",
    position_embedding="transformer.wpe",
    final_norm="transformer.ln_f",
    attention="attn",
    tp_plan={
        "attn.c_attn": "colwise_qkv_concat",
        "attn.c_proj": "rowwise",
        "mlp.c_fc": "colwise",
        "mlp.c_proj": "rowwise",
    },
    default_lora_targets=("c_attn", "c_proj", "c_fc"),
    conv1d=True,
)
