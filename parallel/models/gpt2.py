"""GPT-2: Conv1D weights (converted to Linear first), fused [q|k|v] c_attn, tied embeddings."""

from .base import FamilySpec


def _dims(c) -> dict:
    h = c.require("n_embd", "hidden_size")
    heads = c.require("n_head", "num_attention_heads")
    return dict(hidden=h, layers=c.require("n_layer"), heads=heads, kv_heads=heads, head_dim=h // heads,
                ffn=int(c.get("n_inner") or 4 * h), tied=c.flag("tie_word_embeddings", True),
                pos_embeddings=int(c.get("n_positions", default=1024)), norm="layer", qkv_bias=True, o_bias=True,
                mlp_bias=True, gated_mlp=False, act=c.get("activation_function", default="gelu_new"))


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
    read_dims=_dims,
    # as HF has them: one fused c_attn (hf_surgery unfuses it into the q/k/v of the TP plan)
    linears=(("attn.c_attn", "hidden", "3*hidden", True), ("attn.c_proj", "hidden", "hidden", True),
             ("mlp.c_fc", "hidden", "ffn", True), ("mlp.c_proj", "ffn", "hidden", True)),
)
