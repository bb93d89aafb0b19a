"""`trellis plan`: enumerate layouts for N GPUs, drop those that do not fit (saying why), rank the rest.

Throughput model (relative, per optimizer step; documented so users can argue with it):
  step_time = compute / (1 - bubble) + dp_comm + tp_comm + offload
  compute   = tokens · hardware FLOPs per token / (gpus · PEAK_FLOPS)  (parallel/flops.py: the MFU metric's FLOP
              model, PEFT-aware, with the forward that activation checkpointing recomputes; `--params N`
              without dims: 6·Ψ per token)
  bubble    = (pp - 1) / (grad_accum + pp - 1)                          (GPipe and 1F1B alike)
  dp_comm   = ring volume of grads (ZeRO 0-2: 2Ψ_rank·bytes; ZeRO-3: 3Ψ_rank·bytes incl. the param gathers)
              over NVLink when the dp group fits in a node, else over the inter-node network
  tp_comm   = 4 all-reduces of b·s·h activations per layer per micro-batch (fwd + bwd), over NVLink
  offload   = host traffic of the offloaded states per step over PCIe (CPU) or NVMe
The score is global tokens per second under these constants (an H100-class node); it ranks layouts, it
does not promise a number.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from trellis.configs.validate import offload_errors
from trellis.errors import ConfigError

from trellis.parallel.flops import flops_per_token
from .estimator import MemoryEstimate, TrainingSetup, estimate
from .models import ModelDims, total_params

PEAK_FLOPS = 400e12  # sustained bf16 matmul throughput per GPU
NVLINK_BW = 300e9  # bytes/s per GPU inside a node
NET_BW = 25e9  # bytes/s per GPU across nodes
PCIE_BW = 25e9
NVME_BW = 5e9


@dataclass
class Candidate:
    setup: TrainingSetup
    estimate: MemoryEstimate
    step_time: float
    tokens_per_s: float
    parts: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        s = self.setup
        off = f" off={s.offload_optimizer}" if s.offload_optimizer != "none" else ""
        return (f"dp{s.dp}·tp{s.tp}·pp{s.pp} z{s.zero}{off} ac={s.activation_checkpointing} "
                f"mb={s.micro_batch}×{s.grad_accum}")

    def snippet(self) -> str:
        s = self.setup
        return "\n".join([
            "[parallel]", f"dp = {s.dp}", f"tp = {s.tp}", f"pp = {s.pp}", "", "[zero]", f"stage = {s.zero}",
            f'backend = "{s.backend}"', f'offload_optimizer = "{s.offload_optimizer}"', "",
            "[activation_checkpointing]", f'mode = "{s.activation_checkpointing}"', "", "[train]",
            f"micro_batch_size = {s.micro_batch}", f"grad_accum = {s.grad_accum}"])


@dataclass
class PlanResult:
    feasible: list[Candidate]
    rejected: list[tuple[str, str]]

    def as_dict(self, top: int) -> dict:
        return {"feasible": [{"layout": c.name, "tokens_per_s": c.tokens_per_s, "step_time_s": c.step_time,
                              "parts": c.parts, "worst_rank_total": int(c.estimate.worst_rank.total),
                              "setup": {k: getattr(c.setup, k) for k in ("dp", "tp", "pp", "zero", "offload_optimizer",
                                                                        "activation_checkpointing", "micro_batch",
                                                                        "grad_accum")}}
                             for c in self.feasible[:top]],
                "rejected": [{"layout": n, "reason": r} for n, r in self.rejected]}


def _pow2_upto(n: int) -> list[int]:
    out, k = [], 1
    while k <= n:
        out.append(k)
        k *= 2
    return out


def throughput(d: ModelDims, s: TrainingSetup, est: MemoryEstimate) -> tuple[float, dict]:
    gpus = s.world
    tokens = s.micro_batch * s.grad_accum * s.dp * max(s.seq_len, 1)
    psi = total_params(d)
    if d.hidden and d.layers:
        per_token = flops_per_token(d, seq_len=max(s.seq_len, 1), peft=s.peft, lora_r=s.lora_r,
                                    lora_targets=s.lora_targets,
                                    activation_checkpointing=s.activation_checkpointing).hardware
    else:  # `--params N` alone: no per-layer dims, the 6Ψ rule (with full recompute's extra forward)
        per_token = 6 * psi * (4 / 3 if s.activation_checkpointing == "full" else 1.0)
    compute = per_token * tokens / (gpus * PEAK_FLOPS)
    bubble = (s.pp - 1) / (s.grad_accum + s.pp - 1)
    psi_rank = psi / (s.tp * s.pp)
    gb = 2 if s.precision != "fp32" else 4
    trainable_rank = max(r.trainable_params for r in est.ranks)
    dp_vol = 0.0
    if s.dp > 1:
        dp_vol = (2 * trainable_rank * gb) + (psi_rank * gb if s.zero == 3 else 0.0)
    dp_bw = NVLINK_BW if s.dp * s.tp <= s.gpus_per_node else NET_BW
    tp_comm = 0.0
    if s.tp > 1 and d.hidden:
        per_mb = 4 * 2 * s.micro_batch * max(s.seq_len, 1) * d.hidden * gb * d.layers / s.pp
        tp_comm = per_mb * s.grad_accum * (s.tp - 1) / s.tp / NVLINK_BW
    off = 0.0
    for dest, bw in (("cpu", PCIE_BW), ("nvme", NVME_BW)):
        if dest in (s.offload_optimizer, s.offload_param):
            off += 2 * trainable_rank / max(s.dp, 1) * (gb + 4) / bw
    t = compute / (1 - bubble) + dp_vol / dp_bw + tp_comm + off
    parts = {"compute_s": compute, "bubble": bubble, "dp_comm_s": dp_vol / dp_bw, "tp_comm_s": tp_comm,
             "offload_s": off}
    return t, parts


def plan(d: ModelDims, base: TrainingSetup, *, gpus: int, global_batch: int = 0) -> PlanResult:
    if gpus < 1:
        raise ConfigError(f"--gpus={gpus}: must be >= 1")
    if not base.seq_len:
        base = replace(base, seq_len=2048 if not d.raw_params else 0)
    feasible: list[Candidate] = []
    rejected: list[tuple[str, str]] = []
    node = min(base.gpus_per_node, gpus)
    for tp in _pow2_upto(node):
        if d.heads % tp or d.kv_heads % tp:
            continue
        for pp in [p for p in range(1, (d.layers or 1) + 1) if gpus % (tp * p) == 0 and p <= 16]:
            dp = gpus // (tp * pp)
            for zero in (0, 1, 2, 3):
                offloads = ["none"] + (["cpu"] if not offload_errors(base.backend, zero, "cpu", "none") else [])
                for off in offloads:
                    for ac in ("none", "selective", "full"):
                        for mb in (1, 2, 4, 8):
                            if global_batch:
                                if global_batch % (mb * dp):
                                    continue
                                ga = global_batch // (mb * dp)
                            else:
                                ga = max(pp * 2, 1) if pp > 1 else 1
                            if pp > 1 and ga < pp:
                                continue
                            s = replace(base, dp=dp, tp=tp, pp=pp, zero=zero, offload_optimizer=off,
                                        activation_checkpointing=ac, micro_batch=mb, grad_accum=ga)
                            try:
                                est = estimate(d, s)
                            except ConfigError as e:
                                rejected.append((f"dp{dp}·tp{tp}·pp{pp} z{zero}", e.messages[0]))
                                continue
                            t, parts = throughput(d, s, est)
                            c = Candidate(s, est, t, s.micro_batch * ga * dp * max(s.seq_len, 1) / t, parts)
                            if not est.fits:
                                over = est.worst_rank.total - s.gpu_mem
                                rejected.append((c.name, f"worst rank needs {est.worst_rank.total / 1e9:.1f} GB, "
                                                         f"{over / 1e9:.1f} GB over --gpu-mem"))
                                continue
                            if est.host_fits is False:
                                need = est.host_ram_per_node()
                                rejected.append((c.name, f"CPU offload needs {need / 1e9:.1f} GB host RAM per node, "
                                                         f"{(need - s.host_mem) / 1e9:.1f} GB over --host-mem"))
                                continue
                            feasible.append(c)
    feasible.sort(key=lambda c: (-c.tokens_per_s, c.estimate.worst_rank.total))
    return PlanResult(feasible, rejected)


def render_plan(res: PlanResult, top: int, show_rejected: bool = False) -> str:
    lines = []
    if not res.feasible:
        lines.append("no layout fits. Closest misses:")
        for name, why in sorted(res.rejected, key=lambda x: x[1])[:top]:
            lines.append(f"  {name}: {why}")
        return "\n".join(lines)
    lines.append(f"{len(res.feasible)} layouts fit ({len(res.rejected)} rejected). Top {min(top, len(res.feasible))} "
                 "by modelled tokens/s:")
    lines.append(f"  {'layout':<52}{'tokens/s':>12}{'worst rank':>12}{'bubble':>8}")
    for c in res.feasible[:top]:
        lines.append(f"  {c.name:<52}{c.tokens_per_s:>12.0f}{c.estimate.worst_rank.total / 1e9:>10.1f}GB"
                     f"{c.parts['bubble']:>8.0%}")
    lines.append("")
    lines.append("config snippet for the best layout:")
    lines.append(res.feasible[0].snippet())
    if show_rejected:
        lines.append("")
        lines.append("rejected:")
        lines += [f"  {n}: {why}" for n, why in res.rejected]
    return "\n".join(lines)
