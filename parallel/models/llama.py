"""Llama, Mistral, Qwen2: q/k/v/gate/up column-parallel, o/down row-parallel; GQA kv heads sharded."""

from .base import FamilySpec

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
)
