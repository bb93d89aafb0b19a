"""LoRA-aware tensor-parallel plans: an adapter's sharding is derived from its base layer's style.

- column-parallel base (out-features sharded): base_layer and lora_B column-parallel, lora_A replicated.
  lora_B's input is declared Replicate, so in backward the gradient reaching lora_A's output is
  all-reduced over tp: every tp rank gets the same, complete lora_A gradient (replicas never drift).
- row-parallel base (in-features sharded): base_layer and lora_A row-parallel (the r-dim intermediate
  is all-reduced: r × tokens values), lora_B replicated on the replicated intermediate.
Methods whose extra parameters need their own sharding (DoRA magnitude, IA3 vectors, LoKr/LoHa
factors) are refused under tp > 1 by the engine until they have a plan.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from trellis.errors import ConfigError


def _is_lora_layer(mod: nn.Module) -> bool:
    return hasattr(mod, "base_layer") and hasattr(mod, "lora_A")


def adapter_plan(block: nn.Module, path: str, base_style, kind: str) -> dict:
    """The plan entries for module `path` inside `block`: itself, or its base layer and adapters."""
    mod = block.get_submodule(path)
    if not hasattr(mod, "base_layer"):
        return {path: base_style}
    if not _is_lora_layer(mod) or getattr(mod, "use_dora", {}).get("default", False):
        raise ConfigError(f"peft.method: adapters on {path} have no tensor-parallel plan yet; use peft.method='lora' "
                          "or 'rslora' with parallel.tp > 1, or parallel.tp=1")
    plan = {f"{path}.base_layer": base_style}
    for name in mod.lora_A:
        if kind == "rowwise":
            plan[f"{path}.lora_A.{name}"] = RowwiseParallel(output_layouts=Replicate())
        else:
            plan[f"{path}.lora_B.{name}"] = ColwiseParallel(input_layouts=Replicate())
    return plan
