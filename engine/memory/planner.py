"""`trellis plan`: enumerate layouts for N GPUs, drop those that do not fit (saying why), rank the rest.

The ranking is engine/memory/throughput.py's predicted step time on a cluster profile (engine/memory/cluster.py):
measured on the user's machines by `trellis plan --calibrate` and passed with `--cluster FILE`, else the
built-in defaults of `--device` (H100 unless told). The score is global tokens per second; `trellis plan
--validate` runs some of the layouts and prints predicted next to measured step times (engine/plan/validate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from trellis.configs.validate import offload_errors
from trellis.errors import ConfigError

from .cluster import ClusterProfile, default_profile
from .estimator import MemoryEstimate, TrainingSetup, estimate
from .models import ModelDims
from .throughput import step_time


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
        cp = f"·cp{s.cp}" if s.cp > 1 else ""
        return (f"dp{s.dp}·tp{s.tp}·pp{s.pp}{cp} z{s.zero}{off} ac={s.activation_checkpointing} "
                f"mb={s.micro_batch}×{s.grad_accum}")

    def snippet(self) -> str:
        s = self.setup
        return "\n".join([
            "[parallel]", f"dp = {s.dp}", f"tp = {s.tp}", f"pp = {s.pp}", *([f"cp = {s.cp}"] if s.cp > 1 else []),
            "", "[zero]", f"stage = {s.zero}",
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
                              "setup": {k: getattr(c.setup, k) for k in ("dp", "tp", "pp", "cp", "zero", "offload_optimizer",
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


def throughput(d: ModelDims, s: TrainingSetup, est: MemoryEstimate,
               cluster: ClusterProfile | None = None) -> tuple[float, dict]:
    """(predicted step seconds, parts) of layout `s` on `cluster` (default: the built-in H100 profile)."""
    cluster = cluster or default_profile("H100", s.gpus_per_node)
    trainable_rank = max(r.trainable_params for r in est.ranks)
    return step_time(d, s, trainable_rank, cluster)


# Context parallel is proposed for long sequences (its all-to-alls cost what a short sequence does not repay),
# or whenever no layout fits without it.
CP_MIN_SEQ = 8192


def _cp_degrees(d: ModelDims, base: TrainingSetup, gpus: int) -> list[int]:
    if base.backend != "native" or not base.seq_len or not d.heads:
        return []
    return [c for c in _pow2_upto(gpus)[1:] if base.seq_len % c == 0 and d.heads % c == 0]


def plan(d: ModelDims, base: TrainingSetup, *, gpus: int, global_batch: int = 0,
         cluster: ClusterProfile | None = None) -> PlanResult:
    if gpus < 1:
        raise ConfigError(f"--gpus={gpus}: must be >= 1")
    if not base.seq_len:
        base = replace(base, seq_len=2048 if not d.raw_params else 0)
    feasible: list[Candidate] = []
    rejected: list[tuple[str, str]] = []
    node = min(base.gpus_per_node, gpus)
    long_seq = _cp_degrees(d, base, gpus) if base.seq_len >= CP_MIN_SEQ else []
    for cps in ([1, *long_seq], [c for c in _cp_degrees(d, base, gpus) if c not in long_seq]):
        if feasible or not cps:
            break  # the second pass (context parallel for a sequence that fits nowhere else) only if needed
        for cp in cps:
            _enumerate(d, base, gpus, global_batch, cluster, node, cp, feasible, rejected)
    feasible.sort(key=lambda c: (-c.tokens_per_s, c.estimate.worst_rank.total))
    return PlanResult(feasible, rejected)


def _enumerate(d: ModelDims, base: TrainingSetup, gpus: int, global_batch: int, cluster, node: int, cp: int,
               feasible: list, rejected: list) -> None:
    """Every (tp, pp, ZeRO, offload, checkpointing, micro-batch) layout of `gpus` ranks at context-parallel
    degree `cp`: into `feasible` (sized and timed) or `rejected` (with the reason)."""
    for tp in _pow2_upto(node):
        if d.heads % tp or d.kv_heads % tp:
            continue
        if cp > 1 and d.heads % (tp * cp):
            continue
        for pp in [p for p in range(1, (d.layers or 1) + 1) if gpus % (tp * p * cp) == 0 and p <= 16]:
            dp = gpus // (tp * pp * cp)
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
                            s = replace(base, dp=dp, tp=tp, pp=pp, cp=cp, zero=zero, offload_optimizer=off,
                                        activation_checkpointing=ac, micro_batch=mb, grad_accum=ga)
                            try:
                                est = estimate(d, s)
                            except ConfigError as e:
                                rejected.append((f"dp{dp}·tp{tp}·pp{pp}{f'·cp{cp}' if cp > 1 else ''} z{zero}",
                                                 e.messages[0]))
                                continue
                            t, parts = throughput(d, s, est, cluster)
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
