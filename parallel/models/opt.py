"""OPT: separate q/k/v/out projections, fc1/fc2 MLP, learned positions, tied embeddings.

No sequence-parallel plan: OPTDecoderLayer flattens hidden states to (tokens, hidden) before fc1, so the
sequence dim is gone where the MLP would have to all-gather it.
"""

from .base import FamilySpec


def _dims(c) -> dict:
    h = c.require("hidden_size")
    heads = c.require("num_attention_heads")
    proj = int(c.get("word_embed_proj_dim", default=h))
    bias = c.flag("enable_bias", True)
    final = c.flag("do_layer_norm_before", True) and not c.c.get("_remove_final_layer_norm", False)
    return dict(hidden=h, layers=c.require("num_hidden_layers"), heads=heads, kv_heads=heads, head_dim=h // heads,
                ffn=c.require("ffn_dim"), tied=c.flag("tie_word_embeddings", True),
                pos_embeddings=int(c.get("max_position_embeddings", default=2048)) + 2,  # offset 2
                norm="layer", qkv_bias=bias, o_bias=bias, mlp_bias=bias, gated_mlp=False,
                act=c.get("activation_function", default="relu"), proj_dim=proj if proj != h else 0, final_norm=final)


SPEC = FamilySpec(
    name="opt",
    model_types=("opt",),
    backbone="model.decoder",
    layers="model.decoder.layers",
    embed_tokens="model.decoder.embed_tokens",
    position_embedding="model.decoder.embed_positions",
    final_norm="model.decoder.final_layer_norm",
    attention="self_attn",
    tp_plan={
        "self_attn.q_proj": "colwise",
        "self_attn.k_proj": "colwise",
        "self_attn.v_proj": "colwise",
        "self_attn.out_proj": "rowwise",
        "fc1": "colwise",
        "fc2": "rowwise",
    },
    default_lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    read_dims=_dims,
    linears=(("self_attn.q_proj", "hidden", "hidden", "qkv_bias"), ("self_attn.k_proj", "hidden", "hidden", "qkv_bias"),
             ("self_attn.v_proj", "hidden", "hidden", "qkv_bias"), ("self_attn.out_proj", "hidden", "hidden", "o_bias"),
             ("fc1", "hidden", "ffn", "mlp_bias"), ("fc2", "ffn", "hidden", "mlp_bias")),
)
