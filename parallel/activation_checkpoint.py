"""Activation checkpointing per decoder block: "full" recomputes the whole block in backward,
"selective" only its attention. Applied by replacing the module's forward on the instance, so parameter
names (and therefore checkpoints) are unchanged; FSDP/TP hooks run around it as usual."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from .models.base import FamilySpec


def _checkpoint_forward(module: torch.nn.Module) -> None:
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward
    module._trellis_checkpointed = True


def apply_activation_checkpointing(blocks: list[torch.nn.Module], spec: FamilySpec, mode: str) -> int:
    """Returns how many modules were wrapped."""
    if mode == "none":
        return 0
    n = 0
    for block in blocks:
        target = block if mode == "full" else block.get_submodule(spec.attention)
        _checkpoint_forward(target)
        n += 1
    return n
