"""Causal-LM loss on plain or vocab-sharded (tensor-parallel) logits."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy in fp32 and the number of counted tokens.

    `labels` are already the next-token targets (the data pipeline shifts them); IGNORE_INDEX is skipped.
    A DTensor `logits` sharded on the vocab dim works inside `loss_parallel_context(True)`.
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(flat, labels.reshape(-1).to(flat.device), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


def loss_parallel_context(enabled: bool):
    """Wrap forward-loss AND backward: torch's loss_parallel must cover both."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()
