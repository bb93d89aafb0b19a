"""FamilySpec: everything trellis needs to know about one HF model family, as data.

Structure (where the embedding, decoder blocks, final norm and head live) drives the pipeline split and
activation checkpointing; `tp_plan` maps module paths *inside one decoder block* to a tensor-parallel
style. Shared code in parallel/tensor_parallel.py and parallel/pipeline.py applies them. `read_dims` and
`linears` describe the family's sizes (parallel/models/dims.py: parallelize's checks and the memory
estimator read them). Adding a family is one file in parallel/models/ with a `SPEC`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]
    # Dotted paths from the *ForCausalLM root.
    backbone: str                      # e.g. "model" (LlamaModel), "transformer" (GPT2Model)
    layers: str                        # ModuleList of decoder blocks
    embed_tokens: str
    final_norm: str
    lm_head: str = "lm_head"
    position_embedding: str | None = None   # learned absolute positions (GPT-2 wpe, OPT embed_positions)
    embed_norm: str | None = None           # BLOOM word_embeddings_layernorm
    rotary_emb: str | None = None           # model-level rotary module (Llama, NeoX)
    attention: str = "self_attn"            # attention submodule inside a block (selective checkpointing)
    # Tensor-parallel styles for modules inside a decoder block:
    #   "colwise"  - out-features sharded (Linear weight Shard(0))
    #   "rowwise"  - in-features sharded, output all-reduced
    #   "colwise_qkv_headmajor" - fused per-head [h, 3, d] layout: contiguous sharding keeps whole heads
    tp_plan: dict[str, str] = field(default_factory=dict)
    # Per-head norms inside a block (Qwen3's q_norm / k_norm over head_dim, input [b, s, heads, head_dim]):
    # replicated weights that each tp rank applies to its own heads, so their gradients are partial sums over
    # the local heads; tensor parallel runs them on a heads-sharded DTensor input so the gradient is all-reduced.
    tp_head_norms: tuple[str, ...] = ()
    # Modules whose parameters are LoRA/adapter targets by default.
    default_lora_targets: tuple[str, ...] = ()
    # Conv1D (in, out) weights that are converted to nn.Linear before parallelization (GPT-2).
    conv1d: bool = False
    # ALiBi slopes depend on the global head index (BLOOM).
    alibi: bool = False
    # Sequence parallel, per decoder block: "norm" - a norm that runs on this rank's sequence slice;
    # "gather" - a module whose first input (positional, or the `hidden_states` keyword) is all-gathered
    # over the sequence before its column-parallel projections. Empty: the family has no SP plan.
    sp_plan: dict[str, str] = field(default_factory=dict)
    # The HF config keys of this family: read_dims(reader) -> ModelDims fields (parallel/models/dims.py).
    read_dims: Callable | None = field(default=None, compare=False)
    # The decoder block's linears as the HF model has them (before parallel/hf_surgery.py): (path, fan_in,
    # fan_out, bias) with sizes "hidden", "ffn", "q" (heads x head_dim), "kv" (kv heads x head_dim) or "3*hidden",
    # and bias True or the ModelDims flag that says. Their TP style is the tp_plan's.
    linears: tuple[tuple[str, str, str, bool | str], ...] = ()
    # Fused linears whose output is [part | part | ...] along the features (not head-interleaved, Phi-3's
    # qkv_proj and gate_up_proj): parallel/hf_surgery.py unfuses each into one Linear per part (sizes as in
    # `linears`, e.g. (("q", "q"), ("k", "kv"), ("v", "kv"))) so TP shards every part on its own; export
    # re-fuses them. The tp_plan names the parts ("self_attn.qkv_proj.q").
    fused: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # Model-dependent limits of what trellis runs exactly: check_config(hf_config, seq_len) -> an error line
    # naming the field and the fix, or None (sliding windows, RoPE scaling types).
    check_config: Callable | None = field(default=None, compare=False)
