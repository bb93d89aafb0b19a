"""The planner's throughput model: predicted seconds per optimizer step of one layout on one cluster profile.

Pure arithmetic (no torch). Inputs: the model dims, the layout (TrainingSetup, its context-parallel degree
`cp` included), and a ClusterProfile (engine/memory/cluster.py: measured by `trellis plan --calibrate`, or built-in
defaults). The slowest pipeline stage sets the step (the last one: it also holds the LM head):

  step      = (M + pp - 1) · microbatch + dp_comm + offload + overhead_step        M = grad_accum
  microbatch = compute + overhead + tp_comm + cp_comm + pp_comm + zero_gathers       (one micro-batch, one stage)
  compute   = FLOPs of the stage's layers (+ head) for b·s tokens / tp / cp / matmul FLOP/s of the precision,
              FLOPs from parallel/flops.py's `flops_per_token` (the MFU metric's model; `hardware`, so
              activation recompute is in it)
  overhead  = stage layers × (overhead_s.layer (tp > 1: overhead_s.tp_layer) + overhead_s.elem_layer × the
              layer's b·s/cp·h/tp activation elements), × 4/3 with full activation checkpointing (a second
              forward), × 7/6 with selective (the attention's forward again), + overhead_s.ckpt_layer per layer
              (selective: half); FSDP2 (ZeRO-2/3): + overhead_s.fsdp_unit per all-gather / reduce-scatter call
  optimizer = overhead_s.optimizer_param × the trainable parameters this rank updates (ZeRO >= 1: / dp·cp)
  the collectives: `step_collectives` below counts each (calls and payload bytes per step) and the profile's
  alpha-beta fit of that op and group size prices it: t = calls · alpha + bytes · beta.
  bubble    = (pp - 1) / (M + pp - 1) of the pipeline's time (GPipe and 1F1B alike)

What it leaves out, on purpose: compute/communication overlap (every collective is on the critical path, as
on gloo), stage imbalance beyond the head, the optimizer's element-wise FLOPs (in overhead_s.step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from trellis.parallel.flops import flops_per_token

from .activations import cp_kv_replicated
from .cluster import ClusterProfile
from .estimator import TrainingSetup
from .models import ModelDims, total_params

BUCKET_BYTES = 25 * 2 ** 20  # parallel/data_parallel.py ReplicatedGradSync's default bucket_mb=25


@dataclass(frozen=True)
class Collective:
    """One kind of collective of one step on the slowest rank: op over a group of `group` ranks."""

    axis: str
    op: str
    group: int
    calls: int
    bytes: float


def _act_bytes(s: TrainingSetup, d: ModelDims) -> float:
    return s.micro_batch * max(s.seq_len, 1) / s.cp * d.hidden * (4 if s.precision == "fp32" else 2)


def _alltoall_bytes(s: TrainingSetup, d: ModelDims) -> float:
    """Payload of one layer's 4 forward all-to-alls on one rank (q, k, v and the output, this rank's sequence
    chunk of its tp heads); kv heads that do not divide cp travel replicated to the query heads."""
    head_dim = d.head_dim or d.hidden // max(d.heads, 1)
    kv = d.heads if cp_kv_replicated(d, s.tp, s.cp) else d.kv_heads
    return (s.micro_batch * max(s.seq_len, 1) / s.cp * (2 * d.heads + 2 * kv) * head_dim / s.tp
            * (4 if s.precision == "fp32" else 2))


def stage_layers(d: ModelDims, pp: int) -> int:
    """Decoder layers on the largest pipeline stage (parallel/pipeline.py splits as evenly as it can)."""
    return math.ceil(max(d.layers, 1) / pp)


def step_collectives(d: ModelDims, s: TrainingSetup, trainable_rank: float) -> list[Collective]:
    """The collectives of one optimizer step on the last pipeline stage's rank, by what the engine sends
    (tests/distributed/test_plan_counts.py checks these against parallel/comm_count.py on real runs):
      tp: per layer and micro-batch 4 all-reduces of b·s·h activations (the attention and MLP outputs forward,
          their inputs' gradients backward); per micro-batch the last stage's head input gradient (1) and the
          vocab-parallel cross-entropy's 3 all-reduces of b·s floats; the first stage's embedding (1).
      pp: per micro-batch one activation and one gradient of b·s·h sent and received.
      dp: ZeRO-0/1: the fp32 gradients all-reduced once per step in 25 MiB buckets; ZeRO-1 then broadcasts
          the updated params (one per parameter tensor, a Llama layer has 9; priced as an all-gather of
          1/dp of them); ZeRO-2/3 (FSDP2, one unit per layer + the root): per micro-batch one all-gather of
          each unit's params (ZeRO-3: twice, forward and backward),
          one reduce-scatter of the fp32 gradients per step.
      cp: per layer and micro-batch 4 all-to-alls forward (q, k, v to head-sharded, the output back) and 4
          backward, each of this rank's b·s/cp chunk of its heads (Ulysses; none when cp = 1); the dp
          collectives then run over dp x cp ranks (gradients and ZeRO shards span both).
      world: the step's scalar reduction (loss, tokens, grad norm, flags): one all-reduce."""
    out: list[Collective] = []
    m, layers = s.grad_accum, stage_layers(d, s.pp)
    cp, data = s.cp, s.dp * s.cp
    act = _act_bytes(s, d) if d.hidden else 0.0
    gb = 4 if s.precision == "fp32" else 2
    if s.tp > 1 and d.hidden:
        ce = 3 * s.micro_batch * max(s.seq_len, 1) / cp * 4
        ends_calls, ends_bytes = (1 + 3, act + ce) if s.pp > 1 else (2 + 3, 2 * act + ce)
        out.append(Collective("tp", "all_reduce", s.tp, m * (4 * layers + ends_calls), m * (4 * layers * act + ends_bytes)))
    if cp > 1 and d.hidden:
        out.append(Collective("cp", "all_to_all", cp, m * 8 * layers, m * 2 * layers * _alltoall_bytes(s, d)))
    if s.pp > 1:
        out.append(Collective("pp", "send_recv", 2, 2 * m, 2 * m * act))
    if data > 1:
        units = layers + 1
        if s.zero in (0, 1):
            grad_bytes = trainable_rank * 4
            out.append(Collective("dp", "all_reduce", data, max(1, math.ceil(grad_bytes / BUCKET_BYTES)), grad_bytes))
            if s.zero == 1:
                out.append(Collective("dp", "broadcast", data, 9 * layers + 3, trainable_rank * gb))
        else:
            rounds = 2 if s.zero == 3 else 1
            shard = trainable_rank * gb / data
            out.append(Collective("dp", "all_gather", data, m * rounds * units, m * rounds * shard))
            out.append(Collective("dp", "reduce_scatter", data, units, trainable_rank * 4))
    world = s.world
    if world > 1:
        out.append(Collective("world", "all_reduce", world, 1, 64))
    return out


def _per_layer_and_head(d: ModelDims, s: TrainingSetup) -> tuple[float, float]:
    """Hardware FLOPs per token of one decoder layer and of the LM head, both from `flops_per_token`
    (the difference of two depths gives the layer; what remains of the full model is the head)."""
    kw = dict(seq_len=max(s.seq_len, 1), peft=s.peft, lora_r=s.lora_r, lora_targets=s.lora_targets,
              activation_checkpointing=s.activation_checkpointing)
    full = flops_per_token(d, **kw).hardware
    deeper = flops_per_token(replace(d, layers=d.layers + 1), **kw).hardware
    layer = deeper - full
    return layer, max(full - d.layers * layer, 0.0)


_RECOMPUTE_OVERHEAD = {"none": 1.0, "full": 4 / 3, "selective": 7 / 6}


def step_time(d: ModelDims, s: TrainingSetup, trainable_rank: float, cluster: ClusterProfile) -> tuple[float, dict]:
    """(predicted seconds per optimizer step, its parts) of layout `s`."""
    tokens_mb = s.micro_batch * max(s.seq_len, 1)
    layers = stage_layers(d, s.pp)
    if d.hidden and d.layers:
        per_layer, head = _per_layer_and_head(d, s)
        stage_flops = tokens_mb * (layers * per_layer + head)
    else:  # `--params N` alone: the 6Ψ rule (4/3 with full recompute), split evenly over the stages
        psi = total_params(d)
        stage_flops = tokens_mb * 6 * psi * (4 / 3 if s.activation_checkpointing == "full" else 1.0) / s.pp
    compute = stage_flops / (s.tp * s.cp) / cluster.flops(s.precision)
    ac = s.activation_checkpointing
    elements = tokens_mb / s.cp * max(d.hidden, 1) / s.tp  # one layer's activation elements on this rank
    ov = (cluster.overhead("tp_layer" if s.tp > 1 else "layer") + cluster.overhead("elem_layer") * elements) * layers
    ov *= _RECOMPUTE_OVERHEAD.get(ac, 1.0)
    ov += cluster.overhead("ckpt_layer") * layers * {"full": 1.0, "selective": 0.5}.get(ac, 0.0)
    comms = step_collectives(d, s, trainable_rank)
    m = s.grad_accum
    fsdp_calls = sum(c.calls for c in comms if c.axis == "dp" and c.op in ("all_gather", "reduce_scatter")) \
        if s.zero >= 2 else 0

    def priced(axis: str, per_microbatch: bool) -> float:
        t = 0.0
        for c in comms:
            if c.axis != axis:
                continue
            in_mb = axis in ("tp", "cp", "pp") or (axis == "dp" and c.op == "all_gather" and s.zero >= 2)
            if in_mb == per_microbatch:
                t += (cluster.comm("all_gather", c.group, c.bytes / c.group, c.calls) if c.op == "broadcast"
                      else cluster.comm(c.op, c.group, c.bytes, c.calls))
        return t

    tp_c, cp_c, pp_c = (priced(a, True) / m for a in ("tp", "cp", "pp"))
    gathers = priced("dp", True) / m
    microbatch = compute + ov + tp_c + cp_c + pp_c + gathers
    bubble = (s.pp - 1) / (m + s.pp - 1)
    dp_c = priced("dp", False)
    world_c = priced("world", False)
    off = 0.0
    for dest, bw in (("cpu", cluster.host_device_bytes_per_s), ("nvme", cluster.nvme_bytes_per_s)):
        if bw and dest in (s.offload_optimizer, s.offload_param):
            off += 2 * trainable_rank / max(s.dp * s.cp, 1) * ((4 if s.precision == "fp32" else 2) + 4) / bw
    fsdp = fsdp_calls * cluster.overhead("fsdp_unit")
    # the optimizer step over this rank's share of the trainable parameters (ZeRO >= 1: 1/(dp x cp) of them)
    opt = cluster.overhead("optimizer_param") * trainable_rank / (s.dp * s.cp if s.zero >= 1 else 1)
    t = (m + s.pp - 1) * microbatch + dp_c + world_c + off + fsdp + opt + cluster.overhead("step")
    parts = {"compute_s": m * compute, "bubble": bubble, "dp_comm_s": dp_c + m * gathers, "tp_comm_s": m * tp_c,
             "pp_comm_s": m * pp_c, "cp_comm_s": m * cp_c, "offload_s": off,
             "overhead_s": m * ov + cluster.overhead("step") + world_c + fsdp, "optimizer_s": opt}
    return t, parts
