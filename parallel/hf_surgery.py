"""Family-specific module surgery applied to every layout (so parameter names and shapes are the same
whether or not a run is tensor parallel, and checkpoints stay layout independent) and its inverse for
Hugging Face export.

GPT-2 is the only family that needs it: its Conv1D layers store weights as (in, out), which DTensor's
parallel styles do not understand, and its fused c_attn is [q | k | v] along the output, which a
contiguous shard would cut across q/k/v. We turn every Conv1D into an nn.Linear (weight transposed) and
c_attn into a `FusedQKV` of three Linears (q, k, v) whose outputs are concatenated, so each of them can
be sharded column-wise on its own.
"""

from __future__ import annotations

import torch
from torch import nn

from .models.base import FamilySpec


class FusedQKV(nn.Module):
    """Three projections whose outputs are concatenated: the unfused form of GPT-2's c_attn."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear):
        super().__init__()
        self.q, self.k, self.v = q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def _linear_from_conv1d(conv) -> nn.Linear:
    lin = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    lin.weight.requires_grad_(conv.weight.requires_grad)
    return lin


def prepare_model(model: nn.Module, spec: FamilySpec) -> None:
    """In place, before PEFT/TP/PP; idempotent."""
    if not spec.conv1d:
        return
    from transformers.pytorch_utils import Conv1D

    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Conv1D):
                lin = _linear_from_conv1d(child)
                if child_name == "c_attn":
                    h = lin.out_features // 3
                    parts = []
                    for i in range(3):
                        p = nn.Linear(lin.in_features, h, bias=lin.bias is not None, device=lin.weight.device,
                                      dtype=lin.weight.dtype)
                        with torch.no_grad():
                            p.weight.copy_(lin.weight[i * h:(i + 1) * h])
                            if lin.bias is not None:
                                p.bias.copy_(lin.bias[i * h:(i + 1) * h])
                        parts.append(p)
                    setattr(mod, child_name, FusedQKV(*parts))
                else:
                    setattr(mod, child_name, lin)


def to_hf_state_dict(sd: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Inverse of prepare_model on a (full, unsharded) state dict: back to the HF layout."""
    if model_type != "gpt2":
        return sd
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if ".c_attn." in k:
            prefix, rest = k.split(".c_attn.", 1)
            part, kind = rest.split(".", 1)  # q.weight
            fused.setdefault(f"{prefix}.c_attn.{kind}", {})[part] = v
        elif k.endswith(".weight") and any(f".{n}." in k for n in ("c_proj", "c_fc")):
            out[k] = v.t().contiguous()
        else:
            out[k] = v
    for k, parts in fused.items():
        cat = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[k] = cat.t().contiguous() if k.endswith("weight") else cat
    return out
