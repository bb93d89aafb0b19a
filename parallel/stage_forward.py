"""Per-family forward of one pipeline stage: embed (first stage) -> this stage's blocks -> head (last).

HF models build masks, rotary and ALiBi tensors at model level; a stage has to rebuild what its blocks
need. Attention inside a stage must stay causal (HF eager attention with attention_mask=None is
silently bidirectional): sdpa families get attention_mask=None, which HF's sdpa path runs with
is_causal=True; BLOOM and Gemma-2 (eager only) get an explicit additive causal mask. The last stage applies
the family's final-logit soft-capping (Gemma-2's `final_logit_softcapping`) as HF's *ForCausalLM does.

PEFT prefix tuning (parallel/prompt_hooks.py, engine/peft/prompt.py) gives every block a read-only key/value
prefix of `stage.prefix_len` virtual positions: positions then start at prefix_len (as HF offsets them by the cache
length), and the mask is explicit, [seq, prefix + seq], since sdpa's is_causal aligns a non-square mask
to the top left (queries would not see the whole prefix).

Packed batches (document packing, padding): the stages also receive (segment_ids, position_ids) and build the
block-causal mask and per-sample positions of parallel/attention.py, as the whole model gets them; prompt
tuning's virtual tokens and prefix tuning's key/value prefix stay visible to every sample of the row. BLOOM keeps
ALiBi from absolute key positions (exact inside a block-diagonal mask: parallel/hf_compat.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import block_causal_mask, one_sequence_per_row, sample_positions
from .hf_compat import cache_kwarg
from .models.base import FamilySpec


def _positions(x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset, offset + x.shape[1], device=x.device).unsqueeze(0).expand(x.shape[0], -1)


def _causal_mask(b: int, s: int, prefix: int, dtype: torch.dtype, device, additive: bool) -> torch.Tensor:
    """[b, 1, s, prefix + s]: query i sees keys 0 .. prefix + i. Additive (0 / dtype min) or boolean (True
    = attend, what sdpa takes whatever the compute dtype under autocast)."""
    keep = torch.ones(s, prefix + s, dtype=torch.bool, device=device).tril(prefix)
    if additive:
        mask = torch.zeros(s, prefix + s, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)
    else:
        mask = keep
    return mask[None, None].expand(b, 1, s, prefix + s)


def _stage_positions(stage: nn.Module, h: torch.Tensor, segment_ids: torch.Tensor | None,
                     position_ids: torch.Tensor | None) -> torch.Tensor:
    """Positions of the stage's h (virtual tokens included), after a PEFT key/value prefix. Context parallel:
    the layout covers the whole sequence, h this rank's chunk of it."""
    if segment_ids is None:
        return _positions(h, stage.prefix_len)
    pos = sample_positions(segment_ids, position_ids, prefix_len=stage.prefix_len,
                           virtual_tokens=stage.virtual_tokens)
    return stage.cp.chunk(pos) if stage.cp is not None else pos


def embed(stage: nn.Module, spec: FamilySpec, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
          position_ids: torch.Tensor | None = None) -> torch.Tensor:
    h = stage.get_submodule(spec.embed_tokens)(input_ids)
    if stage.input_prefix is not None:  # PEFT virtual tokens: positions then cover them
        h = stage.input_prefix(stage, h)
    if spec.name == "opt":
        dec = stage.get_submodule(spec.backbone)
        if dec.project_in is not None:
            h = dec.project_in(h)
        pos = _stage_positions(stage, h, segment_ids, position_ids)
        h = h + dec.embed_positions(torch.ones(h.shape[:2], dtype=input_ids.dtype, device=h.device), 0,
                                    position_ids=pos)
    elif spec.position_embedding:
        # learned positions start after a PEFT key/value prefix
        h = h + stage.get_submodule(spec.position_embedding)(_stage_positions(stage, h, segment_ids, position_ids))
    if spec.embed_norm:
        h = stage.get_submodule(spec.embed_norm)(h)
    return h


def _eager(stage: nn.Module) -> bool:
    return getattr(stage.config, "_attn_implementation", "sdpa") == "eager"


def run_blocks(stage: nn.Module, spec: FamilySpec, blocks: list[nn.Module], h: torch.Tensor,
               segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    n = stage.prefix_len  # PEFT key/value prefix positions in front of every block's keys
    b, s = h.shape[:2]
    pos = _stage_positions(stage, h, segment_ids, position_ids)
    kwargs: dict = {}
    if n and blocks:
        kwargs[cache_kwarg(blocks[0])] = stage.kv_prefix(stage, b, h.device)
    if spec.rotary_emb:
        kwargs["position_embeddings"] = stage.get_submodule(spec.rotary_emb)(h, pos)
        kwargs["position_ids"] = pos
    if spec.alibi:
        from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

        n_heads = stage.config.n_head
        slopes = _get_alibi_slopes(n_heads, h.device)
        kwargs["alibi"] = (slopes[:, None, None] * torch.arange(n + s, device=h.device)).repeat(b, 1, 1).to(h.dtype)
    if stage.cp is not None:  # the full sequence's mask, or none (parallel/context_parallel.py)
        one = segment_ids is None or one_sequence_per_row(segment_ids)
        kwargs["attention_mask"] = None if one else block_causal_mask(segment_ids, h.dtype)
    elif segment_ids is not None:  # packed rows: block-causal, additive (a boolean 4D mask is wrong under eager)
        kwargs["attention_mask"] = block_causal_mask(segment_ids, h.dtype, prefix_len=n,
                                                     virtual_tokens=stage.virtual_tokens)
    elif spec.alibi or n or _eager(stage):
        kwargs["attention_mask"] = _causal_mask(b, s, n, h.dtype, h.device, additive=spec.alibi or _eager(stage))
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
    logits = stage.get_submodule(spec.lm_head)(h)
    cap = getattr(stage.config, "final_logit_softcapping", None)
    if cap:  # Gemma-2, as Gemma2ForCausalLM.forward
        logits = torch.tanh(logits / cap) * cap
    return logits
