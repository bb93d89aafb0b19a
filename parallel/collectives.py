"""The tensor-parallel f / g autograd operators (Megatron-LM's names) on a plain process group.

The decoder blocks' tensor-parallel linears run on local shards with these (parallel/tp_linear.py), as do the
4-bit TP shard (parallel/quant4bit.py) and PEFT prefix tuning's replicated encoder:
- f = `sum_grad_over`: identity forward, all-reduce (sum) of the gradient in backward — in front of a
  column-parallel layer, whose every rank computed only its part of the input's gradient;
- g = `reduce_from`: all-reduce (sum) of partial outputs in forward, identity backward — after a
  row-parallel layer;
- with sequence parallel, `gather_seq` (all-gather forward / reduce-scatter backward) takes f's place and
  `scatter_seq` (reduce-scatter forward / all-gather backward) g's.
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


# ---- sequence parallel: the all-gather / reduce-scatter pair along the sequence dim ----------------

def _gather_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((n * x0.shape[0], *x0.shape[1:]))
    dist.all_gather_single(out, x0, group=group)
    return out.movedim(0, dim)


def _reduce_scatter_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((x0.shape[0] // n, *x0.shape[1:]))
    dist.reduce_scatter_single(out, x0, group=group)
    return out.movedim(0, dim)


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather_dim(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_dim(g, ctx.dim, ctx.group), None, None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter_dim(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_dim(g, ctx.dim, ctx.group), None, None


def gather_seq(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sequence parallel's entry into a block's column-parallel projections: all-gather `x` along `dim`
    forward; backward reduce-scatters the (partial, per-rank) input gradient back to this rank's slice."""
    return _GatherSeq.apply(x, dim, group)


def scatter_seq(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sequence parallel's row-parallel exit: reduce-scatter the partial outputs along `dim` forward (each
    rank keeps its sequence slice of the sum); backward all-gathers the gradient."""
    return _ScatterSeq.apply(x, dim, group)
