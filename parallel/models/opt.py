"""OPT: separate q/k/v/out projections, fc1/fc2 MLP, learned positions, tied embeddings.

No sequence-parallel plan: OPTDecoderLayer flattens hidden states to (tokens, hidden) before fc1, so the
sequence dim is gone where the MLP would have to all-gather it.
"""

from .base import FamilySpec

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
)
