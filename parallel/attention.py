"""Model inputs for packed and padded micro-batches: block-diagonal causal masks and per-sample positions.

A micro-batch row may hold several samples (document packing: `segment_ids` 1..k, 0 = padding) or one padded
sample (a user `attention_mask`). Each token must see exactly what it sees when its sample runs alone: the
earlier tokens of its own segment, and PEFT prompt learning's virtual tokens / key-value prefix (shared by every
sample of the row, as each sample alone would see them). Positions restart at 0 per sample.

The mask is additive ([b, 1, q, k], 0 = attend, dtype min = masked) in the compute dtype: HF passes a 4D mask
through unchanged to sdpa and eager attention alike, while a boolean 4D mask is wrong under eager attention.
Padding queries attend to the padding before them (never an all-masked row, so no NaN); their labels are ignored.
A row without segments (concat packing) gets no mask at all: HF then keeps sdpa's fast is_causal path.

Every backend and the pipeline stage forward build their inputs here; nothing in this module knows a Batch.
"""

from __future__ import annotations

import torch

from .prompt_hooks import PromptHooks

SHARED = -1  # segment id of virtual tokens / prefix keys: visible to every query of the row


def segments(segment_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The segment ids a row is masked by: `segment_ids`, a padding `attention_mask` (1 = one sample), both
    (padding where either says so), or None (one causal sequence per row)."""
    if segment_ids is None:
        return None if attention_mask is None else attention_mask.to(torch.int64)
    seg = segment_ids.to(torch.int64)
    return seg if attention_mask is None else seg * (attention_mask != 0)


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] int64: each token's index inside its run of equal segment ids (0 at a sample's first token)."""
    b, s = segment_ids.shape
    idx = torch.arange(s, device=segment_ids.device).expand(b, s)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype, *, prefix_len: int = 0,
                      virtual_tokens: int = 0) -> torch.Tensor:
    """Additive [b, 1, v + s, p + v + s] mask: query i sees key j <= i of its own segment, and every shared key.

    `virtual_tokens` (prompt tuning): v positions in front of the row, queries and keys, visible to every later
    token; `prefix_len` (prefix tuning): p key/value-only positions in front of the keys, visible to every query."""
    b = segment_ids.shape[0]
    seg = segment_ids.to(torch.int64)
    shared = seg.new_full((b, virtual_tokens + prefix_len), SHARED)
    q = torch.cat([shared[:, :virtual_tokens], seg], dim=1)
    k = torch.cat([shared, seg], dim=1)
    sq, sk = q.shape[1], k.shape[1]
    keep = (q[:, :, None] == k[:, None, :]) | (k[:, None, :] == SHARED)
    keep &= torch.ones(sq, sk, dtype=torch.bool, device=seg.device).tril(sk - sq)
    mask = torch.zeros(b, sq, sk, dtype=dtype, device=seg.device).masked_fill(~keep, torch.finfo(dtype).min)
    return mask[:, None]


def sample_positions(segment_ids: torch.Tensor, position_ids: torch.Tensor | None = None, *, prefix_len: int = 0,
                     virtual_tokens: int = 0) -> torch.Tensor:
    """[b, v + s] int64 positions: the virtual tokens at 0..v-1, then each sample's positions after them, all
    offset by a key/value prefix (HF offsets positions by the cache length)."""
    pos = positions_from_segments(segment_ids) if position_ids is None else position_ids.to(torch.int64)
    virt = torch.arange(virtual_tokens, device=pos.device).expand(pos.shape[0], -1)
    return torch.cat([virt, pos + virtual_tokens], dim=1) + prefix_len


def model_inputs(input_ids: torch.Tensor, *, segment_ids: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 dtype: torch.dtype, device, prompt: PromptHooks | None = None) -> dict:
    """Keyword arguments of the whole HF *ForCausalLM's forward for one micro-batch on `device` (`dtype`: the
    compute dtype). Without segments, attention mask or positions: `input_ids` only, exactly today's call (no
    mask: sdpa's is_causal path). PEFT prompt learning's hooks (engine/peft/prompt.py) add the virtual tokens /
    key-value prefix the mask and positions here already cover."""
    prefix_len = prompt.prefix_len if prompt is not None else 0
    virtual_tokens = prompt.virtual_tokens if prompt is not None else 0
    seg = segments(segment_ids, attention_mask)
    kwargs = {"input_ids": input_ids.to(device)}
    if seg is None:
        if position_ids is None:
            return kwargs
        seg = torch.ones_like(position_ids)  # explicit positions alone: one sample per row
    seg = seg.to(device)
    pos = position_ids.to(device) if position_ids is not None else None
    kwargs["attention_mask"] = block_causal_mask(seg, dtype, prefix_len=prefix_len, virtual_tokens=virtual_tokens)
    kwargs["position_ids"] = sample_positions(seg, pos, prefix_len=prefix_len, virtual_tokens=virtual_tokens)
    return kwargs


def cp_model_inputs(input_ids: torch.Tensor, *, segment_ids: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                    dtype: torch.dtype, device, cp) -> dict:
    """`model_inputs` under context parallel (`cp`: parallel/context_parallel.ContextParallel): this rank's
    chunk of the input ids and of the GLOBAL positions, and the FULL-sequence mask the all-to-all kernel
    applies (None when every row is one causal sequence: the kernel then runs causal over the whole sequence)."""
    b, s = input_ids.shape
    seg = segments(segment_ids, attention_mask)
    if seg is None:
        pos = position_ids.to(torch.int64) if position_ids is not None else torch.arange(s).expand(b, s)
        mask = None
    else:
        seg = seg.to(device)
        pos = sample_positions(seg, position_ids.to(device) if position_ids is not None else None)
        mask = None if one_sequence_per_row(seg) else block_causal_mask(seg, dtype)
    kwargs = {"input_ids": cp.chunk(input_ids).to(device), "position_ids": cp.chunk(pos).to(device)}
    if mask is not None:
        kwargs["attention_mask"] = mask
    return kwargs


def one_sequence_per_row(segment_ids: torch.Tensor) -> bool:
    """True when no row holds more than one segment (its block-causal mask is the plain causal one)."""
    return bool((segment_ids == segment_ids[:, :1]).all())


def stage_layout(input_ids: torch.Tensor, segment_ids: torch.Tensor | None, position_ids: torch.Tensor | None,
                 attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(segment ids, positions) [b, s] int64 that travel with the activations through the pipeline stages, or
    None for a batch without segments, mask or positions (the stages then run today's causal path)."""
    seg = segments(segment_ids, attention_mask)
    if seg is None and position_ids is None:
        return None
    if seg is None:
        seg = torch.ones_like(input_ids, dtype=torch.int64)
    pos = positions_from_segments(seg) if position_ids is None else position_ids.to(torch.int64)
    return seg, pos
