"""LoRA-aware tensor-parallel plans: an adapter's sharding is derived from its base layer's style.

- column-parallel base (out-features sharded): base_layer and lora_B column-parallel (local shards,
  parallel/tp_linear.py), lora_A replicated. The block's one input `f` sits at the LoRA layer's input, so
  base and LoRA branch share it: the branch's partial input gradient (lora_A^T times this rank's share of the
  gradient at lora_A's output) is added to the base's before the block's single all-reduce. lora_A's weight
  gradient is therefore a partial sum too: it is all-reduced over tp (r x in values), so every tp rank gets
  the same, complete lora_A gradient (replicas never drift).
- row-parallel base (in-features sharded): base_layer and lora_A row-parallel (the r-dim intermediate
  is all-reduced: r × tokens values), lora_B replicated on the replicated intermediate.
- DoRA: the magnitude vector follows the out-features (Shard(0) under a colwise base, replicated under a
  rowwise one). Its weight norm is per output row: local under colwise; under rowwise the row's squared
  sums are all-reduced over tp (peft detaches the norm, so no collective is needed in backward).
- IA3: the vector follows the dim it scales: output scaling (out, 1) is sharded under colwise and
  replicated under rowwise; input scaling (feed-forward modules, (1, in)) is replicated under colwise
  and sharded under rowwise.
- QLoRA (peft.quantize_base under tp > 1): the base layer is replaced by this rank's 4-bit shard
  (parallel/quant4bit.py).
Sharded vectors are DTensors (optimizer, grad norm and checkpoints see their true layout); peft's
forward would mix them with the local activations, so those layers get a forward that uses the local
shard. Replicated ones stay plain tensors: their gradients are identical on every tp rank because every
input to their gradient is replicated.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.distributed.tensor.parallel.style import ParallelStyle

from trellis.errors import ConfigError
from .data_parallel import local as _local
from .collectives import sum_grad_over
from .quant4bit import QUANT_ATTR, TPLinear4bit, dequantized_weight
from .tp_linear import LocalColwise


def _kind_of(mod: nn.Module) -> str:
    if hasattr(mod, "lora_A"):
        return "lora"
    if hasattr(mod, "ia3_l"):
        return "ia3"
    return type(mod).__name__


def _shard_param(module: nn.Module, name: str, mesh, dim: int) -> None:
    p = module[name] if isinstance(module, nn.ParameterDict) else getattr(module, name)
    new = nn.Parameter(distribute_tensor(p.data, mesh, [Shard(dim)]), requires_grad=p.requires_grad)
    if isinstance(module, nn.ParameterDict):
        module[name] = new
    else:
        module.register_parameter(name, new)


# ---- DoRA -----------------------------------------------------------------------------------------

def _dora_forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
    with torch.no_grad():
        w = dequantized_weight(base_layer) if not isinstance(base_layer.weight, DTensor) else _local(base_layer.weight)
        w = w.to(x.dtype) + scaling * (_local(lora_B.weight) @ _local(lora_A.weight)).to(x.dtype)
        sq = (w.float() ** 2).sum(dim=1)
        if self._trellis_row:
            dist.all_reduce(sq, group=self._trellis_group)
        weight_norm = sq.sqrt().to(x.dtype)
    mag_norm_scale = (_local(self.weight) / weight_norm).view(1, -1)
    lora_result = lora_B(lora_A(x))
    if base_result is None:  # peft passes None when dropout is active: recompute the base output
        base_result = base_layer(x)
    bias = getattr(base_layer, "bias", None)
    if bias is not None:
        base_result = base_result - _local(bias)
    return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling


class _DoraMagnitude(ParallelStyle):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if self.kind != "rowwise":
            _shard_param(module, "weight", device_mesh, 0)
        module._trellis_row = self.kind == "rowwise"
        module._trellis_group = device_mesh.get_group()
        module.forward = types.MethodType(_dora_forward, module)
        return module


# ---- IA3 ------------------------------------------------------------------------------------------

def _ia3_forward(self, x, *args, **kwargs):
    if self.disable_adapters or self.merged:
        raise RuntimeError("IA3 under tensor parallel: merge/disable are not supported on the sharded model")
    scale = 1
    dtype = x.dtype
    for a in self.active_adapters:
        if a in self.ia3_l:
            v = _local(self.ia3_l[a])
            dtype = v.dtype
            scale = scale * v.flatten()
    if self.is_feedforward:
        return self.base_layer((x.to(dtype) * scale).to(x.dtype), *args, **kwargs)
    y = self.base_layer(x, *args, **kwargs)
    return (y.to(dtype) * scale).to(y.dtype)


class _IA3Vectors(ParallelStyle):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        row = self.kind == "rowwise"
        # output scaling (out, 1): sharded iff the output is (colwise); input scaling (1, in): iff the input is.
        sharded_dim = (1 if row else None) if module.is_feedforward else (None if row else 0)
        if sharded_dim is not None:
            for name in list(module.ia3_l):
                _shard_param(module.ia3_l, name, device_mesh, sharded_dim)
        module.forward = types.MethodType(_ia3_forward, module)
        return module


# ---- QLoRA: quantize this rank's shard of the base ---------------------------------------------------

class _QuantizedBase(ParallelStyle):
    def __init__(self, kind: str, q, input_reduced: bool):
        super().__init__()
        self.kind, self.q, self.input_reduced = kind, q, input_reduced

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        module.base_layer = TPLinear4bit(module.base_layer, self.kind, device_mesh, self.q,
                                         input_reduced=self.input_reduced)
        return module


# ---- LoRA on a column-parallel base: one input f for base and branch ---------------------------------

class _SharedInputAt(ParallelStyle):
    """The block's shared `f` applied to the (LoRA) layer's input, for its base layer and branch alike."""

    def __init__(self, shared):
        super().__init__()
        self.shared = shared

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        shared = self.shared

        def hook(mod, args, kwargs):
            if args:
                return (shared(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "x": shared(kwargs["x"])}

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module


class _SummedGrad(ParallelStyle):
    """A replicated linear whose weight gradient is a partial sum over tp (lora_A under a shared input f):
    its forward passes the weight through sum_grad_over, so backward all-reduces the weight's gradient. In
    the graph, not a parameter hook: FSDP2 replaces the parameter objects, and the unsharded weight it
    hands the forward is what the gradient flows to."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(f"lora_A: {type(module).__name__} is not an nn.Linear")
        module._trellis_tp_group = device_mesh.get_group()
        module.forward = types.MethodType(_summed_grad_linear, module)
        return module


def _summed_grad_linear(self, x):
    g = self._trellis_tp_group
    w = sum_grad_over(self.weight, g) if self.weight.requires_grad else self.weight
    b = self.bias
    if b is not None and b.requires_grad:
        b = sum_grad_over(b, g)
    return F.linear(x, w, b)


class _Both(ParallelStyle):
    """Two styles on one module, in order."""

    def __init__(self, first: ParallelStyle, second: ParallelStyle):
        super().__init__()
        self.first, self.second = first, second

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        return self.second._apply(self.first._apply(module, device_mesh), device_mesh)


# ---- the plan ---------------------------------------------------------------------------------------

def adapter_plan(block: nn.Module, path: str, base_style, kind: str) -> dict:
    """The plan entries for module `path` inside `block`: itself, or its base layer and adapters."""
    mod = block.get_submodule(path)
    if not hasattr(mod, "base_layer"):
        if getattr(mod, QUANT_ATTR, None) is not None:
            raise ConfigError(f"peft.quantize_base with parallel.tp > 1 needs an adapter on every decoder-block "
                              f"linear; {path} has none: leave peft.target_modules empty (the family default) "
                              "or add it")
        return {path: base_style}
    method = _kind_of(mod)
    if method not in ("lora", "ia3") or type(mod).__module__.endswith(".bnb"):
        raise ConfigError(f"peft.method: {type(mod).__name__} adapters on {path} have no tensor-parallel plan; use "
                          "lora, rslora, dora, qlora or ia3 with parallel.tp > 1, or parallel.tp=1")
    q = getattr(mod.base_layer, QUANT_ATTR, None)
    # LoRA on a column-parallel base with the block's shared f (not under sequence parallel): the f moves to
    # the LoRA layer's input, shared by base and branch
    shared = getattr(base_style, "shared", None) if method == "lora" and kind != "rowwise" else None
    if shared is not None:
        base_style = LocalColwise(None)
    plan = {f"{path}.base_layer": base_style} if q is None else {path: _QuantizedBase(kind, q, shared is not None)}
    if method == "ia3":
        plan[path] = _IA3Vectors(kind)  # after base_layer's entry: dict order = application order
        return plan
    if shared is not None:
        plan[f"{path}"] = _SharedInputAt(shared) if q is None else _Both(plan[path], _SharedInputAt(shared))
    for name in mod.lora_A:
        if kind == "rowwise":
            plan[f"{path}.lora_A.{name}"] = RowwiseParallel(output_layouts=Replicate())
        elif shared is not None:
            plan[f"{path}.lora_A.{name}"] = _SummedGrad()
            plan[f"{path}.lora_B.{name}"] = LocalColwise(None)
        else:
            plan[f"{path}.lora_B.{name}"] = ColwiseParallel(input_layouts=Replicate())
        if mod.use_dora.get(name, False):
            if q is not None:
                raise ConfigError("peft.method='dora' with peft.quantize_base under parallel.tp > 1 is not "
                                  "supported; use lora (QLoRA) or parallel.tp=1")
            plan[f"{path}.lora_magnitude_vector.{name}"] = _DoraMagnitude(kind)
    return plan
