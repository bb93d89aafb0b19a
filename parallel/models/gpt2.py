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
        # c_attn is unfused into q/k/v Linears by parallel/hf_surgery.py (every layout)
        "attn.c_attn.q": "colwise",
        "attn.c_attn.k": "colwise",
        "attn.c_attn.v": "colwise",
        "attn.c_proj": "rowwise",
        "mlp.c_fc": "colwise",
        "mlp.c_proj": "rowwise",
    },
    default_lora_targets=("c_attn.q", "c_attn.k", "c_attn.v", "c_proj", "c_fc"),
    conv1d=True,
    sp_plan={"ln_1": "norm", "attn": "gather", "ln_2": "norm", "mlp": "gather"},
)
