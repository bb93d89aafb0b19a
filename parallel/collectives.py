"""The tensor-parallel f / g autograd operators (Megatron-LM's names) on a plain process group.

DTensor's parallel styles place these collectives themselves; code that works on local shards outside
DTensor (the 4-bit TP shard in parallel/quant4bit.py, PEFT prefix tuning's replicated encoder) uses these:
- f = `sum_grad_over`: identity forward, all-reduce (sum) of the gradient in backward — in front of a
  column-parallel layer, whose every rank computed only its part of the input's gradient;
- g = `reduce_from`: all-reduce (sum) of partial outputs in forward, identity backward — after a
  row-parallel layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _SumGradOver(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over `group`."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def sum_grad_over(x: torch.Tensor, group) -> torch.Tensor:
    """x unchanged; its gradient is summed over `group` (Megatron's 'f' operator in front of a column-parallel
    layer: every rank of the group computed only its part of the input's gradient)."""
    return _SumGradOver.apply(x, group)


class _ReduceFrom(torch.autograd.Function):
    """All-reduce forward of partial sums; identity backward (the row-parallel 'g' operator)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def reduce_from(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of `x` over `group` in forward; the gradient passes through unchanged (Megatron's 'g')."""
    return _ReduceFrom.apply(x, group)
