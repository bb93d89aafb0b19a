"""Context parallel over the mesh's "cp" axis: the sequence of every micro-batch is split across cp ranks.

Method: all-to-all over heads (DeepSpeed-Ulysses). Every module outside attention (embeddings, norms, MLPs,
the loss) is per-token and runs on this rank's contiguous sequence chunk [b, s/cp, ...] unchanged. Inside
attention, after the q/k/v projections and rotary (computed from the chunk's GLOBAL positions), one
all-to-all turns q, k, v from sequence-sharded [b, heads, s/cp, d] into head-sharded [b, heads/cp, s, d]; the
family's own attention kernel (sdpa or eager) runs on the full sequence for its heads, with the full causal or
block-causal mask; a second all-to-all turns the output back. Exact for any mask and any kernel, which is why it
is the method here (ring attention needs a kernel that returns its log-sum-exp, which CPU sdpa does not).

Costs per attention layer and micro-batch, forward: all-to-all of q, k, v and the output, each (cp-1)/cp of
its [b, s/cp, heads, d] chunk; the backward sends the same again. Heads must divide cp (after tensor parallel:
heads/tp); key/value heads that do not (grouped-query attention with fewer kv heads than cp·tp) are replicated
to the query heads before the all-to-all: exact, at heads/kv_heads times their bytes.

The hook is HF's attention interface: attention modules look their kernel up by `config._attn_implementation`;
trellis registers "trellis_cp" there and gives each attention module the kernel it had. That name has no mask
function in HF's mask interface, so HF builds no mask of its own: the engine passes the full-sequence 4D mask of
a packed batch (parallel/attention.py) or none, and the kernel then runs causal over the whole sequence. A
family whose attention does not go through that interface (BLOOM's ALiBi, Gemma-2's eager softcapping) is
refused (`cp_family_errors`).

Gradients: a parameter is replicated over cp like over dp, each cp rank holding the gradient of its tokens;
the engine reduces gradients over the flattened ("dp", "cp") mesh (ZeRO-0/1 all-reduce, FSDP2 over dp x cp as
torchtitan does), so ZeRO shards over dp x cp ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

ATTN_IMPLEMENTATION = "trellis_cp"
# Families whose attention runs through HF's attention interface with sdpa (see the module docstring).
SUPPORTED_FAMILIES = ("llama", "qwen3", "phi3", "gpt2", "gpt_neox", "opt")


@dataclass
class ContextParallel:
    """This rank's place on the cp axis (kept by the model and its pipeline stages)."""

    group: object
    rank: int
    size: int

    def chunk(self, t: torch.Tensor | None, dim: int = 1) -> torch.Tensor | None:
        """This rank's contiguous slice of `t` along the sequence `dim`."""
        if t is None:
            return None
        n = t.shape[dim] // self.size
        return t.narrow(dim, self.rank * n, n)


def cp_family_errors(family: str, cp: int) -> list[str]:
    if cp > 1 and family not in SUPPORTED_FAMILIES:
        return [f"parallel.cp={cp}: context parallel is not supported for the {family} family (its attention does "
                f"not run through Hugging Face's attention interface); supported: {', '.join(SUPPORTED_FAMILIES)}. "
                "Use parallel.cp=1"]
    return []


class _AllToAll(torch.autograd.Function):
    """Scatter `x` along `scatter_dim` over the group, gather the pieces received along `gather_dim` (rank
    order); the backward is the inverse exchange."""

    @staticmethod
    def forward(ctx, x, group, size, scatter_dim, gather_dim):
        ctx.args = (group, size, gather_dim, scatter_dim)
        return _exchange(x, group, size, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, g):
        return _exchange(g.contiguous(), *ctx.args), None, None, None, None


def _exchange(x: torch.Tensor, group, size: int, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    parts = x.movedim(scatter_dim, 0)
    shape = parts.shape
    send = parts.reshape(size, shape[0] // size, *shape[1:]).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j]: rank j's sequence chunk of the heads this rank keeps
    pieces = [recv[j].movedim(0, scatter_dim) for j in range(size)]
    return torch.cat(pieces, dim=gather_dim)


def seq_to_heads(x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """[b, heads, s/cp, d] sequence-sharded -> [b, heads/cp, s, d] head-sharded."""
    return _AllToAll.apply(x, cp.group, cp.size, 1, 2)


def heads_to_seq(x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """[b, s, heads/cp, d] (HF kernels' output layout) -> [b, s/cp, heads, d]."""
    return _AllToAll.apply(x, cp.group, cp.size, 1, 2)


def ulysses_attention(module, query, key, value, attention_mask, **kwargs):
    """HF attention-interface kernel "trellis_cp": all-to-all to heads, the module's own kernel on the full
    sequence, all-to-all back. `module.trellis_cp`: the ContextParallel; `module.trellis_cp_kernel`: the HF name
    of the kernel it had."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward, repeat_kv

    cp, inner = module.trellis_cp, module.trellis_cp_kernel
    s = query.shape[2] * cp.size
    if attention_mask is not None and attention_mask.shape[-2] != s:
        raise RuntimeError(f"context parallel: the attention mask covers {attention_mask.shape[-2]} queries, not the "
                           f"full sequence of {s}: the engine passes the full-sequence mask")
    if attention_mask is None and inner == "eager":  # eager attention without a mask is bidirectional
        keep = torch.ones(s, s, dtype=torch.bool, device=query.device).tril()
        attention_mask = torch.zeros(s, s, dtype=query.dtype, device=query.device).masked_fill(
            ~keep, torch.finfo(query.dtype).min)[None, None]
    groups = query.shape[1] // key.shape[1]
    if key.shape[1] % cp.size:  # fewer kv heads than cp: replicate them to the query heads (exact)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        groups = 1
    q, k, v = (seq_to_heads(t, cp) for t in (query, key, value))
    saved = getattr(module, "num_key_value_groups", None)
    if saved is not None:
        module.num_key_value_groups = groups
    try:
        fn = eager_attention_forward if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
        out, weights = fn(module, q, k, v, attention_mask, **kwargs)
    finally:
        if saved is not None:
            module.num_key_value_groups = saved
    return heads_to_seq(out.contiguous(), cp), weights


def apply_context_parallel(model: torch.nn.Module, spec, cp_mesh) -> ContextParallel:
    """Route every attention module of `model` through the all-to-all kernel over `cp_mesh`; returns the
    ContextParallel the engine and the pipeline stages shard the sequence with."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, ulysses_attention)
    cp = ContextParallel(group=cp_mesh.get_group(), rank=cp_mesh.get_local_rank(), size=cp_mesh.size())
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    configs[id(model.config)] = model.config
    inner = model.config._attn_implementation or "sdpa"
    blocks = model.get_submodule(spec.layers)
    for block in blocks:
        attn = block.get_submodule(spec.attention)
        attn.trellis_cp, attn.trellis_cp_kernel = cp, inner
    for c in configs.values():
        c._attn_implementation = ATTN_IMPLEMENTATION
    model.trellis_cp = cp
    return cp
