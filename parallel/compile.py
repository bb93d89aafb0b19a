"""torch.compile per decoder block (`train.compile = true`).

Each block's forward is compiled on the instance (`block.forward = torch.compile(block.forward)`), like
activation checkpointing replaces it (parallel/activation_checkpoint.py): parameter names — and so
checkpoints, PEFT adapters and FSDP2's per-block groups — are unchanged (wrapping the block in an
OptimizedModule would add `_orig_mod.` to every name). The order is torchtitan's: after tensor parallel and
activation checkpointing (the compiled region includes the checkpoint wrapper and the DTensor linears), before
FSDP2, whose pre/post-forward hooks run outside the compiled region in the module's `__call__`. All blocks
share one code object; the recompile limit is raised to the number of blocks so that a deep model is never
silently left eager when guards differ per block.
"""

from __future__ import annotations

import torch


def apply_compile(blocks: list[torch.nn.Module]) -> int:
    """Compile each block's forward in place; returns how many were compiled."""
    import torch._dynamo

    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, limit, max(getattr(cfg, limit), 2 * len(blocks)))
    for block in blocks:
        block.forward = torch.compile(block.forward)
        block._trellis_compiled = True
    return len(blocks)
