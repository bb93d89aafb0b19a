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

from .models import ModelDims

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
    mlp: float = 0.0  # the MLP-width part of `sharded` (elements per token)
    attn_in: int = 1  # linears reading the attention norm's output (q, k, v separately: 3; fused qkv: 1)
    mlp_in: int = 1  # linears reading the MLP norm's output (SwiGLU gate + up: 2)


def _norm_terms(d: ModelDims) -> tuple[float, float]:
    # RMSNorm (HF): saves its input, rsqrt (1), x*rsqrt, and the weighted output (next linear's input)
    # LayerNorm: saves its input, mean + rstd (2), and the output.
    return (3.0, 1.0) if d.norm == "rms" else (2.0, 2.0)


def layer_acts(d: ModelDims) -> LayerActs:
    H, Hd, KVd, f = d.heads, d.heads * d.head_dim, d.kv_heads * d.head_dim, d.ffn
    nh, nstat = _norm_terms(d)
    if d.family == "gemma2":
        # eager soft-capped attention: q, k, v, out, and per score the capped logits (tanh output) and the
        # softmax probabilities; four norms per block; GeGLU: gate, act(gate), up, gate*up.
        attn = 2 * Hd + 2 * KVd
        return LayerActs(h=4 * nh, sharded=attn + 4 * f, f32_h=4 * nstat, f32_sharded=0, quad=2 * H,
                         attn_sharded=attn, attn_quad=2 * H, mlp=4 * f, attn_in=3, mlp_in=2)
    if d.family in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        # sdpa (flash): q, k, v, out (out doubles as o_proj input) + logsumexp per head;
        # SwiGLU: gate, silu(gate), up, gate*up. Qwen3's per-head q/k norms: their inputs (+ Hd + KVd);
        # Phi-3 runs its unfused qkv / gate_up parts like Llama's separate projections.
        attn = 2 * Hd + 2 * KVd + (Hd + KVd if d.qk_norm else 0)
        return LayerActs(h=2 * nh, sharded=attn + 4 * f, f32_h=2 * nstat, f32_sharded=H, quad=0,
                         attn_sharded=attn, attn_quad=0, mlp=4 * f, attn_in=3, mlp_in=2)
    mlp = _ACT_SAVES.get(d.act, 2) * f
    if d.family == "gpt2":
        attn = 3 * Hd + Hd  # fused qkv output (q, k, v are views of it) + out
        return LayerActs(h=2 * nh, sharded=attn + mlp, f32_h=2 * nstat, f32_sharded=H, quad=0,
                         attn_sharded=attn, attn_quad=0, mlp=mlp, attn_in=3)  # the engine splits c_attn into q, k, v
    if d.family == "opt":
        attn = 4 * Hd  # q, k, v projections + out
        return LayerActs(h=2 * nh, sharded=attn + mlp, f32_h=2 * nstat, f32_sharded=H, quad=0,
                         attn_sharded=attn, attn_quad=0, mlp=mlp, attn_in=3)
    if d.family == "gpt_neox":
        # fused qkv output (v is a view), rotated q and k, out, and a copy as the dense input.
        attn = 3 * Hd + 2 * Hd + 2 * Hd
        h = 2 * nh - (1 if d.parallel_residual else 0)  # parallel residual: both norms read the same input
        return LayerActs(h=h, sharded=attn + mlp, f32_h=2 * nstat, f32_sharded=H, quad=0,
                         attn_sharded=attn, attn_quad=0, mlp=mlp)
    if d.family == "bloom":
        # eager ALiBi attention: q, k, v copies, softmax probabilities (a×s per token), dense input.
        attn = 3 * Hd + Hd
        return LayerActs(h=2 * nh, sharded=attn + mlp, f32_h=2 * nstat, f32_sharded=0, quad=H,
                         attn_sharded=attn, attn_quad=H, mlp=mlp)
    # generic: Korthikanti's GPT-3 block in 16-bit with tp: sbh(10 + 24/t + 5as/(ht)) bytes, i.e. per token
    # 5h elements replicated, 12h sharded, 2.5·a·s scores (selective recomputation drops the scores only).
    return LayerActs(h=5.0, sharded=12.0 * d.hidden, f32_h=0, f32_sharded=0, quad=2.5 * H, attn_sharded=0,
                     attn_quad=2.5 * H)


def regime(precision: str, backend: str, zero: int) -> str:
    """How the compute dtype reaches the activations (it decides which saved tensors are fp32).

    "fp32": no mixed precision. "autocast" (native ZeRO-0/1): params stay fp32, autocast casts each matmul's
    inputs, so the residual stream and the norms stay fp32 and every linear keeps its own 16-bit copy of its
    input. "cast" (native ZeRO-2/3 via FSDP2's MixedPrecisionPolicy, DeepSpeed): the module runs in the
    16-bit dtype; HF's RMSNorm still upcasts its input to fp32 (one fp32 copy kept)."""
    if precision == "fp32":
        return "fp32"
    return "autocast" if backend == "native" and zero <= 1 else "cast"


def _norm_bytes(rms: bool, consumers: int, mode: str, c: int, frozen: bool) -> tuple[float, float]:
    """(bytes per hidden element, stat bytes) one pre-norm keeps per token, with what its consumers save.

    fp32 RMSNorm keeps input, x*rsqrt (for the weight grad) and output; a frozen weight drops x*rsqrt.
    LayerNorm keeps input (+ mean, rstd) and its output. Under autocast the fp32 output is not kept but each
    consuming linear keeps its own cast; under "cast" RMSNorm keeps an fp32 copy of its input."""
    stats = 4.0 if rms else 8.0
    keep_x_rsqrt = 0 if frozen else 1
    if mode == "fp32":
        return ((2 + keep_x_rsqrt) * 4.0 if rms else 8.0), stats
    if mode == "autocast":
        return ((1 + keep_x_rsqrt) * 4.0 if rms else 4.0) + consumers * c, stats
    return (4.0 + (1 + keep_x_rsqrt) * c if rms else 2.0 * c), stats


def _sharded_bytes(la: LayerActs, d: ModelDims, tp: int, act_bytes: int, seq: int, drop_attn: bool,
                   fp32_mlp: bool = False) -> float:
    """Attention + MLP bytes per token on one tp rank (compute dtype, fp32 per-head stats, eager scores).

    `fp32_mlp`: a 4-bit base under autocast returns its outputs in the input's dtype (fp32), so the MLP's
    saved intermediates are fp32 except the down projection's input (cast by its lora_A)."""
    sharded = la.sharded - (la.attn_sharded if drop_attn else 0)
    quad = la.quad - (la.attn_quad if drop_attn else 0)
    f32 = (0 if drop_attn else la.f32_sharded) + (la.mlp - d.ffn if fp32_mlp and la.mlp else 0)
    sharded -= la.mlp - d.ffn if fp32_mlp and la.mlp else 0
    return (sharded * act_bytes + f32 * 4 + quad * seq * act_bytes) / tp


def _norms_bytes(d: ModelDims, la: LayerActs, mode: str, act_bytes: int, frozen: bool, drop_attn: bool) -> float:
    """Bytes per token of a layer's two norm regions (replicated over tp unless sequence parallel)."""
    rms = d.norm == "rms"
    if mode == "fp32" or d.family == "generic":
        # fp32: the per-family terms as measured (h counts the frozen-weight correction); generic: the
        # paper's block, everything in the compute dtype
        return la.h * d.hidden * act_bytes + la.f32_h * 4
    total = 0.0
    for consumers, is_attn in ((la.attn_in, True), (la.mlp_in, False)):
        per_h, stats = _norm_bytes(rms, consumers, mode, act_bytes, frozen)
        if drop_attn and is_attn and mode == "autocast":
            # the recomputed attention's input projections are inside the checkpoint: their casts are not
            # kept; the checkpoint holds the fp32 norm output instead
            per_h += 4.0 - consumers * act_bytes
        total += per_h * d.hidden + stats
    if d.parallel_residual:  # both norms read the same input: it is kept once
        total -= d.hidden * (4 if mode == "autocast" or rms else act_bytes)
    return total


def per_layer_bytes(d: ModelDims, *, tokens: int, seq: int, tp: int, sp: bool, act_bytes: int, ckpt: str,
                    frozen_base: bool = False, adapter_elems: float = 0.0, mode: str = "",
                    quantized: bool = False) -> dict:
    """Bytes one layer keeps for backward (`kept`) and the transient recompute peak under checkpointing.

    `mode`: see `regime` (default: "fp32" when act_bytes is 4, else "cast"). `frozen_base` (PEFT): frozen
    RMSNorm weights need not keep x·rsqrt, and each LoRA target keeps its r-wide lora_A output (per token).
    """
    mode = mode or ("fp32" if act_bytes == 4 else "cast")
    la = layer_acts(d)
    if frozen_base:
        drop = 2.0 if d.norm == "rms" else 0.0
        la = replace(la, h=la.h - drop, sharded=la.sharded + adapter_elems * tp)
    h_div = tp if sp else 1
    q = quantized and mode == "autocast"
    full = tokens * (_norms_bytes(d, la, mode, act_bytes, frozen_base, False) / h_div
                     + _sharded_bytes(la, d, tp, act_bytes, seq, False, q))
    if ckpt == "none":
        return {"kept": full, "recompute": 0.0}
    if ckpt == "full":
        # only the block input survives (the residual stream: fp32 unless the module itself runs 16-bit);
        # backward recomputes one block at a time, so one block's full activations are live on top.
        resid = act_bytes if mode == "cast" else 4
        return {"kept": tokens * d.hidden / h_div * resid, "recompute": full}
    # selective (trellis: the attention module is recomputed): its internals are not kept.
    kept = tokens * (_norms_bytes(d, la, mode, act_bytes, frozen_base, True) / h_div
                     + _sharded_bytes(la, d, tp, act_bytes, seq, True, q))
    return {"kept": kept, "recompute": full - kept}


def model_level_bytes(d: ModelDims, *, tokens: int, seq: int, tp: int, act_bytes: int, first: bool, last: bool,
                      frozen_base: bool = False, mode: str = "", ckpt: str = "none") -> dict:
    """Bytes outside the decoder layers: input ids, embeddings, final norm, and the fp32 log-probs.

    With a frozen base (PEFT) the embedding output needs no grad, so the first block's input norm keeps
    nothing but its output (negative correction here), and the final norm keeps only its input + stats
    (the frozen head needs no saved input)."""
    mode = mode or ("fp32" if act_bytes == 4 else "cast")
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
        if frozen_base and ckpt != "full":  # the first norm's input needs no grad: no input, no stats kept
            nh, nstat = _norm_terms(d)
            e -= tokens * (d.hidden * (4 if d.norm == "rms" or mode != "cast" else act_bytes) + nstat * 4)
        out["embedding"] = e
    if last:
        nh, nstat = _norm_terms(d)
        if d.final_norm and d.family != "generic":
            if frozen_base:  # frozen norm and head: the norm's input + stats only
                out["final_norm"] = tokens * (d.hidden * (4 if d.norm == "rms" or mode != "cast" else act_bytes)
                                              + nstat * 4)
            else:  # like a block's pre-norm with one consumer (the head)
                per_h, stats = _norm_bytes(d.norm == "rms", 1, mode, act_bytes, False)
                out["final_norm"] = tokens * (per_h * d.hidden + stats)
        # cross-entropy in fp32: log_softmax keeps its output, one fp32 per vocab entry per token
        out["logits"] = tokens * d.vocab / tp * 4
    return out


# ---- context parallel (parallel/context_parallel.py) ------------------------------------------------------
def cp_kv_replicated(d: ModelDims, tp: int, cp: int) -> bool:
    """The key/value heads are replicated to the query heads for the all-to-all when a tp rank's kv heads do
    not divide cp."""
    return cp > 1 and (d.kv_heads // tp) % cp != 0


def cp_replicated_kv_bytes(d: ModelDims, *, tokens: int, tp: int, cp: int, act_bytes: int) -> float:
    """Per layer: the extra key/value bytes attention saves when the kv heads are replicated (`tokens`: this
    rank's chunk)."""
    if not cp_kv_replicated(d, tp, cp):
        return 0.0
    return tokens * 2 * (d.heads - d.kv_heads) / tp * d.head_dim * act_bytes


def cp_alltoall_bytes(d: ModelDims, *, tokens: int, tp: int, cp: int, act_bytes: int) -> float:
    """Transient all-to-all buffers of one attention layer (send + receive of q, k, v) on one rank."""
    if cp == 1 or not tokens:
        return 0.0
    kv = d.heads if cp_kv_replicated(d, tp, cp) else d.kv_heads
    return 2 * tokens * (d.heads + 2 * kv) / tp * d.head_dim * act_bytes
