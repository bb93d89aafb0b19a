"""A decoder block's column- and row-parallel linears computed on local shards, with Megatron's collectives.

The parameters are sharded exactly as torch's ColwiseParallel / RowwiseParallel shard them (weight Shard(0) /
Shard(1), colwise bias Shard(0), rowwise bias Replicate) and stay DTensors, so checkpoints (DCP re-sharding),
clipping, per-mesh grad norms and ZeRO see the same parameters as before. Only the forward differs: it takes
each parameter's local shard (`to_local()`, whose backward hands the gradient back as a DTensor in the
parameter's layout) and runs `F.linear` on plain tensors, with explicit autograd collectives
(parallel/collectives.py) where the math needs them:

- column-parallel (q/k/v, gate/up, fc1, a fused qkv or gate_up): input `f` — identity forward, all-reduce of the
  input gradient backward. The f is shared by the linears of one block that read the *same input tensor*
  (`SharedInput`): q, k and v (gate and up) each leave a partial input gradient, autograd adds them locally,
  and one all-reduce reduces the sum — one per attention block and one per MLP, Megatron's volume, where
  DTensor's per-module styles reduced each linear's input gradient on its own. Sharing is keyed on tensor
  identity, so nothing is assumed about how a family wires its projections: a lone linear gets its own f.
- row-parallel (o_proj, down_proj, ...): `g` — all-reduce of the partial output forward, identity backward;
  the replicated bias is added after the reduction.
- sequence parallel: the block's "gather" modules (the family's sp_plan) all-gather their input along the
  sequence forward and reduce-scatter its gradient backward (`gather_seq`: f's place, so the column-parallel
  linears inside reduce nothing themselves); row-parallel outputs are reduce-scattered back to the sequence
  slice (`scatter_seq`: g's place), the replicated bias then sees only this rank's tokens, so its gradient
  is summed over tp in backward.
Everything is derived from the family's tp_plan / sp_plan (no per-family code). PEFT adapters wrap these
linears as base layers (parallel/peft_tp.py); the f sits at the base layer's input, so an adapter branch
reading the unreduced input keeps the full gradient its own plan gives it.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.distributed.tensor.parallel.style import ParallelStyle

from .collectives import reduce_from, scatter_seq, sum_grad_over


def _local(p: torch.Tensor | None) -> torch.Tensor | None:
    return p.to_local() if isinstance(p, DTensor) else p


class SharedInput:
    """One `f` per distinct input tensor among the column-parallel linears of a block: the first linear that
    reads `x` applies sum_grad_over; the others reading the same `x` reuse its output (their input gradients
    then add up before the one all-reduce). `reset()` (block entry and exit) drops the references."""

    def __init__(self, group):
        self.group = group
        self._src: torch.Tensor | None = None
        self._out: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._src:
            self._src, self._out = x, sum_grad_over(x, self.group)
        return self._out

    def reset(self, *_args, **_kwargs) -> None:
        self._src = self._out = None


def _colwise_forward(self, x):
    if self._trellis_tp_input is not None:
        x = self._trellis_tp_input(x)
    return F.linear(x, _local(self.weight), _local(self.bias))


def _rowwise_forward(self, x):
    y = F.linear(x, _local(self.weight))
    if self._trellis_tp_sp:
        y = scatter_seq(y, self._trellis_tp_group)
    else:
        y = reduce_from(y, self._trellis_tp_group)
    if self.bias is not None:
        b = _local(self.bias)
        if self._trellis_tp_sp:  # added to this rank's tokens only: the bias gradient is a partial sum
            b = sum_grad_over(b, self._trellis_tp_group)
        y = y + b
    return y


class LocalColwise(ParallelStyle):
    """Shard like ColwiseParallel; forward on local shards behind the block's shared `f` (None under sequence
    parallel: the gather module's reduce-scatter reduces the input gradient)."""

    def __init__(self, shared: SharedInput | None):
        super().__init__()
        self.shared = shared

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(f"column-parallel: {type(module).__name__} is not an nn.Linear")
        ColwiseParallel()._partition_linear_fn("", module, device_mesh)
        module._trellis_tp_input = self.shared
        module.forward = types.MethodType(_colwise_forward, module)
        return module


class LocalRowwise(ParallelStyle):
    """Shard like RowwiseParallel; forward on local shards, output all-reduced (`g`), or reduce-scattered
    along the sequence under sequence parallel."""

    def __init__(self, sequence_parallel: bool):
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(f"row-parallel: {type(module).__name__} is not an nn.Linear")
        RowwiseParallel()._partition_linear_fn("", module, device_mesh)
        module._trellis_tp_group = device_mesh.get_group()
        module._trellis_tp_sp = self.sequence_parallel
        module.forward = types.MethodType(_rowwise_forward, module)
        return module


__all__ = ["LocalColwise", "LocalRowwise", "SharedInput"]
