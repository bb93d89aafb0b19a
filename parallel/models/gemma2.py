"""Gemma-2: Llama-like GQA block with four (1 + w) RMSNorms per block, embeddings scaled by sqrt(hidden)
(inside HF's Gemma2TextScaledWordEmbedding, so every layout gets it), tanh soft-capping of the attention
logits and of the final logits, and sliding-window attention on alternating layers.

transformers' sdpa path refuses soft-capping: the engine runs Gemma-2 on eager attention (engine/model.py),
where the pipeline stages pass an explicit causal mask (parallel/stage_forward.py); the final-logit cap is
applied by the last stage as HF's Gemma2ForCausalLM does. Sequences longer than the sliding window are
refused (the full causal masks trellis builds are exact only within it).
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
                tied=c.flag("tie_word_embeddings", True), norm="rms", qkv_bias=bias, o_bias=bias, gated_mlp=True,
                act=c.get("hidden_activation", "hidden_act", default="gelu_pytorch_tanh"), rotary_dim=hd,
                block_norms=4, attn_impl="eager")


def _check(c, seq_len: int) -> str | None:
    # transformers fills layer_types (alternating sliding / full) when config.json has none
    return sliding_window_limit(c, seq_len, layers_slide=layer_types_slide(c) or not getattr(c, "layer_types", None))


SPEC = FamilySpec(
    name="gemma2",
    model_types=("gemma2",),
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
    sp_plan={"input_layernorm": "norm", "self_attn": "gather", "post_attention_layernorm": "norm",
             "pre_feedforward_layernorm": "norm", "mlp": "gather", "post_feedforward_layernorm": "norm"},
    read_dims=_dims,
    linears=(("self_attn.q_proj", "hidden", "q", "qkv_bias"), ("self_attn.k_proj", "hidden", "kv", "qkv_bias"),
             ("self_attn.v_proj", "hidden", "kv", "qkv_bias"), ("self_attn.o_proj", "q", "hidden", "o_bias"),
             ("mlp.gate_proj", "hidden", "ffn", False), ("mlp.up_proj", "hidden", "ffn", False),
             ("mlp.down_proj", "ffn", "hidden", False)),
    check_config=_check,
)
