"""Qwen3: Llama's block plus per-head RMSNorm of q and k (q_norm, k_norm over head_dim).

Under tensor parallel q/k/v are sharded by whole heads, so the per-head norms act on local heads with their
full head_dim: the forward needs no communication, and the weights stay replicated; but each rank's weight
gradient only sums its own heads, so the norms are `tp_head_norms` (their gradients are all-reduced over tp).
"""

import dataclasses

from .checks import layer_types_slide, sliding_window_limit
from .llama import SPEC as LLAMA


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


# llama's layout and TP plan; the linears' biases differ (no MLP bias flag), plus what is listed here
SPEC = dataclasses.replace(
    LLAMA,
    name="qwen3",
    model_types=("qwen3",),
    tp_head_norms=("self_attn.q_norm", "self_attn.k_norm"),
    read_dims=_dims,
    linears=LLAMA.linears[:4] + (("mlp.gate_proj", "hidden", "ffn", False), ("mlp.up_proj", "hidden", "ffn", False),
                                 ("mlp.down_proj", "ffn", "hidden", False)),
    check_config=_check,
)
