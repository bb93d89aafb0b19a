"""Qwen3: Llama's block plus per-head RMSNorm of q and k (q_norm, k_norm over head_dim).

Under tensor parallel q/k/v are sharded by whole heads, so the per-head norms act on local heads with their
full head_dim: the forward needs no communication, and the weights stay replicated; but each rank's weight
gradient only sums its own heads, so the norms are `tp_head_norms` (their gradients are all-reduced over tp).
"""

from .base import FamilySpec
from .checks import layer_types_slide, sliding_window_limit


def _dims(c) -> dict:
    h = c.require("hidden_size")
    heads = c.require("num_attention_heads")
    hd = int(c.get("head_dim", default=h // heads))
    bias = c.flag("attention_bias", False)
    return dict(hidden=h, layers=c.require("num_hidden_layers"), heads=heads,
                kv_heads=int(c.get("num_key_value_heads", default=heads)), head_dim=hd,
                ffn=c.require("intermediate_size"),
                tied=c.flag("tie_word_embeddings", False), norm="rms", qkv_bias=bias, o_bias=bias, gated_mlp=True,
                act=c.get("hidden_act", default="silu"), rotary_dim=hd, qk_norm=True)


def _check(c, seq_len: int) -> str | None:
    return sliding_window_limit(c, seq_len, layers_slide=layer_types_slide(c))


SPEC = FamilySpec(
    name="qwen3",
    model_types=("qwen3",),
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
    tp_head_norms=("self_attn.q_norm", "self_attn.k_norm"),
    default_lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    sp_plan={"input_layernorm": "norm", "self_attn": "gather", "post_attention_layernorm": "norm", "mlp": "gather"},
    read_dims=_dims,
    linears=(("self_attn.q_proj", "hidden", "q", "qkv_bias"), ("self_attn.k_proj", "hidden", "kv", "qkv_bias"),
             ("self_attn.v_proj", "hidden", "kv", "qkv_bias"), ("self_attn.o_proj", "q", "hidden", "o_bias"),
             ("mlp.gate_proj", "hidden", "ffn", False), ("mlp.up_proj", "hidden", "ffn", False),
             ("mlp.down_proj", "ffn", "hidden", False)),
    check_config=_check,
)
