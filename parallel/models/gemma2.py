"""Gemma-2: Llama-like GQA block with four (1 + w) RMSNorms per block, embeddings scaled by sqrt(hidden)
(inside HF's Gemma2TextScaledWordEmbedding, so every layout gets it), tanh soft-capping of the attention
logits and of the final logits, and sliding-window attention on alternating layers.

transformers' sdpa path refuses soft-capping: the engine runs Gemma-2 on eager attention (engine/model.py),
where the pipeline stages pass an explicit causal mask (parallel/stage_forward.py); the final-logit cap is
applied by the last stage as HF's Gemma2ForCausalLM does. Sequences longer than the sliding window are
refused (the full causal masks trellis builds are exact only within it).
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
                tied=c.flag("tie_word_embeddings", True), norm="rms", qkv_bias=bias, o_bias=bias, gated_mlp=True,
                act=c.get("hidden_activation", "hidden_act", default="gelu_pytorch_tanh"), rotary_dim=hd,
                block_norms=4, attn_impl="eager")


def _check(c, seq_len: int) -> str | None:
    # transformers fills layer_types (alternating sliding / full) when config.json has none
    return sliding_window_limit(c, seq_len, layers_slide=layer_types_slide(c) or not getattr(c, "layer_types", None))


# llama's layout and TP plan; the linears' biases differ (no MLP bias flag), plus what is listed here
SPEC = dataclasses.replace(
    LLAMA,
    name="gemma2",
    model_types=("gemma2",),
    sp_plan={"input_layernorm": "norm", "self_attn": "gather", "post_attention_layernorm": "norm",
             "pre_feedforward_layernorm": "norm", "mlp": "gather", "post_feedforward_layernorm": "norm"},
    read_dims=_dims,
    linears=LLAMA.linears[:4] + (("mlp.gate_proj", "hidden", "ffn", False), ("mlp.up_proj", "hidden", "ffn", False),
                                 ("mlp.down_proj", "ffn", "hidden", False)),
    check_config=_check,
)
