"""Family-specific module surgery applied to every layout (so parameter names and shapes are the same
whether or not a run is tensor parallel, and checkpoints stay layout independent) and its inverse for
Hugging Face export.

GPT-2: its Conv1D layers store weights as (in, out), which DTensor's parallel styles do not understand, and
its fused c_attn is [q | k | v] along the output, which a contiguous shard would cut across q/k/v. We turn
every Conv1D into an nn.Linear (weight transposed) and c_attn into a `FusedQKV` of three Linears (q, k, v)
whose outputs are concatenated, so each of them can be sharded column-wise on its own.

Phi-3 (`FamilySpec.fused`): qkv_proj = [q | k | v] and gate_up_proj = [gate | up] become `FusedParts` of one
Linear per part, the same way. Phi3Attention slices the fused output at `config.num_attention_heads *
head_dim`, a global count: each attention gets a config view whose `num_attention_heads` is its own
`num_heads` attribute, which tensor parallel localizes like the other head counts.
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


class FusedParts(nn.Module):
    """One Linear per part of a fused [a | b | ...] projection, outputs concatenated (Phi-3's qkv_proj and
    gate_up_proj); the parts are children named as in the family's `fused` entry."""

    def __init__(self, parts: dict[str, nn.Linear]):
        super().__init__()
        self.names = tuple(parts)
        for n, lin in parts.items():
            self.add_module(n, lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, n)(x) for n in self.names], dim=-1)


class _HeadsView:
    """A config seen through one attention module: `num_attention_heads` is the module's own (local) count."""

    def __init__(self, config, attn: nn.Module):
        self.__dict__["_config"], self.__dict__["_attn"] = config, attn

    def __getattr__(self, name):  # only for names not in __dict__
        if name.startswith("__") or name in ("_config", "_attn"):
            raise AttributeError(name)
        if name == "num_attention_heads":
            return self._attn.num_heads
        return getattr(self._config, name)

    def __setattr__(self, name, value):
        setattr(self._config, name, value)


def _unfuse(model: nn.Module, spec: FamilySpec) -> None:
    from .models.dims import dims_from_hf_config, size_of

    d = dims_from_hf_config(model.config)
    for block in model.get_submodule(spec.layers):
        for path, parts in spec.fused.items():
            lin = block.get_submodule(path)
            if isinstance(lin, FusedParts):
                continue
            sizes = [size_of(d, e) for _, e in parts]
            if sum(sizes) != lin.out_features:
                raise ValueError(f"{spec.name}: {path} has {lin.out_features} outputs, the spec's parts {sum(sizes)}")
            new, start = {}, 0
            for (name, _), n in zip(parts, sizes):
                p = nn.Linear(lin.in_features, n, bias=lin.bias is not None, device=lin.weight.device,
                              dtype=lin.weight.dtype)
                with torch.no_grad():
                    p.weight.copy_(lin.weight[start:start + n])
                    if lin.bias is not None:
                        p.bias.copy_(lin.bias[start:start + n])
                p.weight.requires_grad_(lin.weight.requires_grad)
                new[name], start = p, start + n
            parent, _, leaf = path.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, leaf, FusedParts(new))
        attn = block.get_submodule(spec.attention)
        if spec.name == "phi3" and not isinstance(attn.config, _HeadsView):
            attn.num_heads = attn.config.num_attention_heads
            attn.config = _HeadsView(attn.config, attn)


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
    if spec.fused:
        _unfuse(model, spec)
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
    from .models import family_for

    spec = family_for(model_type)
    if spec.fused:
        return _refuse(sd, spec)
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


def _refuse(sd: dict[str, torch.Tensor], spec: FamilySpec) -> dict[str, torch.Tensor]:
    """FusedParts parameters back into the fused HF tensors, parts concatenated in the spec's order."""
    leaves = {path.rpartition(".")[2]: [n for n, _ in parts] for path, parts in spec.fused.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        head, part, kind = ([*k.rsplit(".", 2)] + ["", ""])[:3]
        if head.rpartition(".")[2] in leaves and part in leaves[head.rpartition(".")[2]]:
            fused.setdefault(f"{head}.{kind}", {})[part] = v
        else:
            out[k] = v
    for k, parts in fused.items():
        names = leaves[k.rsplit(".", 2)[-2]]
        out[k] = torch.cat([parts[n] for n in names], dim=0)
    return out
