"""Activation bytes saved for backward, per decoder layer and per model, itemized per family.

Method: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"): count
every tensor autograd keeps between forward and backward. Their GPT-3 block (eager attention, dropout,
16-bit) gives sbh(34 + 5as/h) bytes per layer; that is the `generic` family here. Real HF blocks differ
(SwiGLU, GQA, fused sdpa kernels save q/k/v/out + a logsumexp instead of the s×s scores, no dropout in
fine-tuning), so each family lists its own terms, measured once per family with saved-tensor hooks on a
tiny model (tests/distributed/test_memory_validation.py keeps them honest).

Elements are per token. "h" terms live in the residual/norm region (replicated over tp unless sequence
parallel); "sharded" terms (heads, kv heads, MLP width) are split by tp; "f32" terms are fp32 whatever the
compute dtype (norm statistics, the attention logsumexp); "quad" is per token per key (eager scores).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .memory_models import ModelDims

# elements saved by the MLP activation per MLP-width element (input and output, per implementation)
_ACT_SAVES = {"gelu_new": 5, "gelu_fast": 5, "quick_gelu": 3, "gelu": 2, "gelu_pytorch_tanh": 2,
              "bloom_gelu": 2, "relu": 1}


@dataclass(frozen=True)
class LayerActs:
    h: float  # residual / norm region elements (compute dtype)
    sharded: float  # attention + MLP elements, divided by tp (compute dtype)
    f32_h: float  # fp32 norm statistics (per token, not divided by tp)
    f32_sharded: float  # fp32 per-head statistics (logsumexp), divided by tp
    quad: float  # scores per token per key (eager attention), divided by tp
    attn_sharded: float  # the part of `sharded` + per-head stats that selective checkpointing drops
    attn_quad: float


def _norm_terms(d: ModelDims) -> tuple[float, float]:
    # RMSNorm (HF): saves its input, rsqrt (1), x*rsqrt, and the weighted output (next linear's input)
    # LayerNorm: saves its input, mean + rstd (2), and the output.
    return (3.0, 1.0) if d.norm == "rms" else (2.0, 2.0)


def layer_acts(d: ModelDims) -> LayerActs:
    H, Hd, KVd, f = d.heads, d.heads * d.head_dim, d.kv_heads * d.head_dim, d.ffn
    nh, nstat = _norm_terms(d)
    if d.family in ("llama", "mistral", "qwen2"):
        # sdpa (flash): q, k, v, out (out doubles as o_proj input) + logsumexp per head;
        # SwiGLU: gate, silu(gate), up, gate*up.
        attn = 2 * Hd + 2 * KVd
        return LayerActs(h=2 * nh, sharded=attn + 4 * f, f32_h=2 * nstat, f32_sharded=H, quad=0,
                         attn_sharded=attn, attn_quad=0)
    mlp = _ACT_SAVES.get(d.act, 2) * f
    if d.family == "gpt2":
        attn = 3 * Hd + Hd  # fused qkv output (q, k, v are views of it) + out
        return LayerActs(h=2 * nh, sharded=attn + mlp, f32_h=2 * nstat, f32_sharded=H, quad=0,
                         attn_sharded=attn, attn_quad=0)
    if d.family == "opt":
        attn = 4 * Hd  # q, k, v projections + out
        return LayerActs(h=2 * nh, sharded=attn + mlp, f32_h=2 * nstat, f32_sharded=H, quad=0,
                         attn_sharded=attn, attn_quad=0)
    if d.family == "gpt_neox":
        # fused qkv output (v is a view), rotated q and k, out, and a copy as the dense input.
        attn = 3 * Hd + 2 * Hd + 2 * Hd
        h = 2 * nh - (1 if d.parallel_residual else 0)  # parallel residual: both norms read the same input
        return LayerActs(h=h, sharded=attn + mlp, f32_h=2 * nstat, f32_sharded=H, quad=0,
                         attn_sharded=attn, attn_quad=0)
    if d.family == "bloom":
        # eager ALiBi attention: q, k, v copies, softmax probabilities (a×s per token), dense input.
        attn = 3 * Hd + Hd
        return LayerActs(h=2 * nh, sharded=attn + mlp, f32_h=2 * nstat, f32_sharded=0, quad=H,
                         attn_sharded=attn, attn_quad=H)
    # generic: Korthikanti's GPT-3 block in 16-bit with tp: sbh(10 + 24/t + 5as/(ht)) bytes, i.e. per token
    # 5h elements replicated, 12h sharded, 2.5·a·s scores (selective recomputation drops the scores only).
    return LayerActs(h=5.0, sharded=12.0 * d.hidden, f32_h=0, f32_sharded=0, quad=2.5 * H, attn_sharded=0,
                     attn_quad=2.5 * H)


def _layer_elems(d: ModelDims, la: LayerActs, tp: int, sp: bool, drop_attn: bool) -> tuple[float, float]:
    """(compute-dtype elements, fp32 elements) per token for one layer on one tp rank."""
    h_div = tp if sp else 1
    h_elems = la.h * d.hidden / h_div
    sharded = la.sharded - (la.attn_sharded if drop_attn else 0)
    quad = (la.quad - (la.attn_quad if drop_attn else 0))
    f32 = la.f32_h / h_div + (0 if drop_attn else la.f32_sharded / tp)
    return h_elems + sharded / tp, f32, quad / tp


def per_layer_bytes(d: ModelDims, *, tokens: int, seq: int, tp: int, sp: bool, act_bytes: int, ckpt: str,
                    frozen_base: bool = False, adapter_elems: float = 0.0) -> dict:
    """Bytes one layer keeps for backward (`kept`) and the transient recompute peak under checkpointing.

    `frozen_base` (PEFT): frozen RMSNorm weights need not keep
    x·rsqrt (2 per layer), and each LoRA target keeps its r-wide lora_A output (per token).
    """
    la = layer_acts(d)
    if frozen_base:
        drop = 2.0 if d.norm == "rms" else 0.0
        la = replace(la, h=la.h - drop, sharded=la.sharded + adapter_elems * tp)
    full_c, full_f32, full_q = _layer_elems(d, la, tp, sp, drop_attn=False)
    full = tokens * (full_c * act_bytes + full_f32 * 4 + full_q * seq * act_bytes)
    if ckpt == "none":
        return {"kept": full, "recompute": 0.0}
    if ckpt == "full":
        # only the block input survives (the residual stream, compute dtype); backward recomputes one
        # block at a time, so one block's full activations are live on top.
        return {"kept": tokens * d.hidden / (tp if sp else 1) * act_bytes, "recompute": full}
    # selective (trellis: the attention module is recomputed): its internals are not kept.
    sel_c, sel_f32, sel_q = _layer_elems(d, la, tp, sp, drop_attn=True)
    kept = tokens * (sel_c * act_bytes + sel_f32 * 4 + sel_q * seq * act_bytes)
    return {"kept": kept, "recompute": full - kept}


def model_level_bytes(d: ModelDims, *, tokens: int, seq: int, tp: int, act_bytes: int, first: bool, last: bool,
                      frozen_base: bool = False) -> dict:
    """Bytes outside the decoder layers: input ids, embeddings, final norm, and the fp32 log-probs.

    With a frozen base (PEFT) the embedding output needs no grad, so the first block's input norm keeps
    nothing but its output (negative correction here), and the final norm keeps only its input + stats
    (the frozen head needs no saved input)."""
    out = {"embedding": 0.0, "final_norm": 0.0, "logits": 0.0}
    if first:
        e = tokens * 8  # input ids (int64), saved by the embedding backward
        if d.family == "opt":
            e += tokens * 8  # position ids
        elif d.family == "gpt2":
            e += seq * 8
        if d.rotary_dim:
            e += 2 * seq * d.rotary_dim * 4  # cos and sin tables, shared by all layers
        if d.embed_norm:
            e += tokens * (d.hidden * act_bytes + 2 * 4)  # BLOOM word_embeddings_layernorm input + stats
        if frozen_base:
            nh, nstat = _norm_terms(d)
            e -= tokens * (d.hidden * act_bytes + nstat * 4)
        out["embedding"] = e
    if last:
        nh, nstat = _norm_terms(d)
        if d.final_norm and d.family != "generic":
            # the norm's input (last block's output) + its saved intermediates
            out["final_norm"] = tokens * ((1 if frozen_base else nh) * d.hidden * act_bytes + nstat * 4)
        # cross-entropy in fp32: log_softmax keeps its output, one fp32 per vocab entry per token
        out["logits"] = tokens * d.vocab / tp * 4
    return out
