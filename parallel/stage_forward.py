"""Per-family forward of one pipeline stage: embed (first stage) -> this stage's blocks -> head (last).

HF models build masks, rotary and ALiBi tensors at model level; a stage has to rebuild what its blocks
need. Attention inside a stage must stay causal (HF eager attention with attention_mask=None is
silently bidirectional): sdpa families get attention_mask=None, which HF's sdpa path runs with
is_causal=True; BLOOM (eager only) gets an explicit additive causal mask.
"""

from __future__ import annotations

import torch
from torch import nn

from .models.base import FamilySpec


def _positions(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[1], device=x.device).unsqueeze(0).expand(x.shape[0], -1)


def embed(stage: nn.Module, spec: FamilySpec, input_ids: torch.Tensor) -> torch.Tensor:
    h = stage.get_submodule(spec.embed_tokens)(input_ids)
    if getattr(stage, "input_prefix", None) is not None:  # PEFT virtual tokens: positions then cover them
        h = stage.input_prefix(stage, h)
    if spec.name == "opt":
        dec = stage.get_submodule(spec.backbone)
        if dec.project_in is not None:
            h = dec.project_in(h)
        pos = _positions(h)
        h = h + dec.embed_positions(torch.ones(h.shape[:2], dtype=input_ids.dtype, device=h.device), 0,
                                    position_ids=pos)
    elif spec.position_embedding:
        h = h + stage.get_submodule(spec.position_embedding)(_positions(h))
    if spec.embed_norm:
        h = stage.get_submodule(spec.embed_norm)(h)
    return h


def run_blocks(stage: nn.Module, spec: FamilySpec, blocks: list[nn.Module], h: torch.Tensor) -> torch.Tensor:
    pos = _positions(h)
    kwargs: dict = {}
    if spec.rotary_emb:
        kwargs["position_embeddings"] = stage.get_submodule(spec.rotary_emb)(h, pos)
        kwargs["position_ids"] = pos
    if spec.alibi:
        from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

        n_heads = stage.config.n_head
        s = h.shape[1]
        slopes = _get_alibi_slopes(n_heads, h.device)
        kwargs["alibi"] = (slopes[:, None, None] * torch.arange(s, device=h.device)).repeat(h.shape[0], 1, 1).to(h.dtype)
        mask = torch.full((s, s), torch.finfo(h.dtype).min, device=h.device, dtype=h.dtype).triu(1)
        kwargs["attention_mask"] = mask[None, None].expand(h.shape[0], 1, s, s)
    else:
        kwargs["attention_mask"] = None
    for block in blocks:
        out = block(h, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
    return h


def head(stage: nn.Module, spec: FamilySpec, h: torch.Tensor) -> torch.Tensor:
    h = stage.get_submodule(spec.final_norm)(h)
    if spec.name == "opt":
        dec = stage.get_submodule(spec.backbone)
        if dec.project_out is not None:
            h = dec.project_out(h)
    return stage.get_submodule(spec.lm_head)(h)
