"""The micro-batch every backend, the pipeline and the Python API share, and its loss normaliser."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from trellis.parallel.loss import IGNORE_INDEX


@dataclass
class Batch:
    """One micro-batch. The contract every backend, the pipeline and the Python API share:

    - input_ids [b, s] int64; labels [b, s] int64 next-token targets, IGNORE_INDEX (-100) where a position is
      not counted (prompt/user tokens, padding, the last token of a packed sample);
    - segment_ids [b, s] int32 or None: 0 = padding, k >= 1 = the k-th sample of its row. Attention stays inside
      a segment (block-diagonal causal mask). None = each row is one causal sequence (concat packing);
    - position_ids [b, s] int64 or None: per-sample positions (0 at each sample's first token); None = 0..s-1;
    - attention_mask [b, s] 1/0 or None: a padding mask as users pass it (Python API); it means the same as
      segment_ids = attention_mask (one sample per row);
    - extra: any other keys a user's loss function reads (Python API), moved to the device with the batch.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def map_tensors(b: Batch, fn) -> Batch:
    """`b` with `fn` applied to every tensor it carries (the extras too); other values unchanged."""
    def f(v):
        return fn(v) if torch.is_tensor(v) else v

    return replace(b, input_ids=f(b.input_ids), labels=f(b.labels), segment_ids=f(b.segment_ids),
                   position_ids=f(b.position_ids), attention_mask=f(b.attention_mask),
                   extra={k: f(v) for k, v in b.extra.items()})


def local_token_count(micro_batches: list[Batch]) -> int:
    """Counted (non-ignored) target tokens of these micro-batches (host-side: no device sync)."""
    return sum(int((b.labels != IGNORE_INDEX).sum()) for b in micro_batches)


def global_token_count(micro_batches: list[Batch], group=None) -> int:
    """Counted (non-ignored) target tokens of one step over `group`: the loss normaliser. The sampler's
    batches carry it (StepBatches.global_tokens: no collective); other batches (a user's loop) cost one
    all-reduce before the first forward."""
    known = getattr(micro_batches, "global_tokens", None)
    if known is not None:
        return int(known)
    n = torch.tensor([sum(int((b.labels != IGNORE_INDEX).sum()) for b in micro_batches)], dtype=torch.float64)
    dist.all_reduce(n, group=group)
    return int(n.item())
