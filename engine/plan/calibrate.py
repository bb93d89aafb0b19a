"""`trellis plan --calibrate`: measure a cluster profile (engine/memory/cluster.py) on the ranks of this job.

Every rank runs the same measurements at the same time, so what one rank achieves while its peers are busy is
what is measured (4 ranks on 2 CPU cores each get about half a core: that is the machine being calibrated).
  matmul    n×n matmuls per dtype, 5 windows of ~0.3 s, the median (n = 512 on a CPU, 4096 on a GPU): FLOP/s = 2n³·count / time
  collectives  per op (all-reduce, all-gather, reduce-scatter, all-to-all, send/recv) and per group size
            (2, 4, … up to the world; the world split into consecutive groups that all run at once, as a mesh
            axis's groups do), payloads 4 KiB … 64 MiB (1 MiB … 64 MiB on a GPU: the gradient buckets training sends), the median of 5 timings each,
            the slowest rank's; then `fit_alpha_beta` per (op, group size). The payload is what one rank hands
            to the collective (parallel/comm_count.py's "bytes")
  host/NVMe a pinned 256 MiB host→device copy (GPU only); a 64 MiB file written and fsynced in $TMPDIR
  overhead  the real engine (engine/trainer.py) on the shipped tiny-llama at 16 tokens per micro-batch, where
            FLOPs are negligible: one layout with dp = world at 1 and 8 micro-batches per step (their
            difference is the per-micro-batch cost: / layers = overhead_s.layer; what remains of the
            1-micro-batch step is overhead_s.step) and one with tp = 2 (overhead_s.tp_layer: its per-micro-batch
            cost minus its tp all-reduces as the fits just measured price them, / layers). Then three more real
            steps, each measured minus what the model predicts with the overheads found so far:
            at 128 tokens per micro-batch (/ layers x tokens x hidden: overhead_s.elem_layer), with full
            activation checkpointing (/ layers: overhead_s.ckpt_layer) and with ZeRO-3 (/ its all-gather and
            reduce-scatter calls: overhead_s.fsdp_unit).
  optimizer one AdamW step over 4 Mi fp32 parameters on every rank at once: overhead_s.optimizer_param (s/param)
Rank 0 gathers everything and returns the profile; the others return None.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..memory.cluster import OPS, ClusterProfile, fit_alpha_beta

REPEATS = 5
LONG_SEQ = 128  # tokens per micro-batch of the activation-element measurement (tiny-llama's FLOPs still small)
SLOPE_MB = 8  # micro-batches of the long step whose difference to a 1-micro-batch step gives the per-micro-batch cost


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul(device: torch.device, seconds: float = 0.3, rounds: int = 5) -> dict[str, float]:
    """Achieved n x n matmul FLOP/s per dtype: the median of `rounds` windows of `seconds`, every rank multiplying
    at once (each window starts at a barrier), so one unlucky scheduling window does not set the figure."""
    n = 4096 if device.type == "cuda" else 512
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dt, device=device), torch.randn(n, n, dtype=dt, device=device)
        torch.mm(a, b)
        rates = []
        for _ in range(rounds):
            dist.barrier()
            _sync(device)
            count, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                torch.mm(a, b)
                count += 1
                if device.type == "cuda" and count % 8 == 0:
                    _sync(device)
            _sync(device)
            rates.append(2 * n ** 3 * count / (time.perf_counter() - t0))
        out[name] = statistics.median(rates)
    out["fp16"] = out["bf16"]
    return out


def _groups(world: int, size: int) -> list[list[int]]:
    return [list(range(i, i + size)) for i in range(0, world, size)]


def _time_op(op: str, nbytes: int, group, group_ranks: list[int], device: torch.device) -> float:
    """Seconds of one `op` moving `nbytes` payload on this rank (median of REPEATS, after a warm-up)."""
    n = len(group_ranks)
    numel = max(nbytes // 4, n)
    numel -= numel % n
    x = torch.ones(numel, device=device)
    me = dist.get_rank()
    peer = group_ranks[group_ranks.index(me) ^ 1] if op == "send_recv" else None

    def once() -> None:
        if op == "all_reduce":
            dist.all_reduce(x, group=group)
        elif op == "all_gather":
            out = torch.empty(numel * n, device=device)
            dist.all_gather_single(out, x, group=group)
        elif op == "reduce_scatter":
            out = torch.empty(numel // n, device=device)
            dist.reduce_scatter_single(out, x, group=group)
        elif op == "all_to_all":
            out = torch.empty_like(x)
            dist.all_to_all_single(out, x, group=group)
        else:  # one way, timed as half a round trip
            if group_ranks.index(me) % 2 == 0:
                dist.send(x, peer)
                dist.recv(x, peer)
            else:
                dist.recv(x, peer)
                dist.send(x, peer)
        _sync(device)

    once()
    times = []
    for _ in range(REPEATS):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return t / 2 if op == "send_recv" else t


def measure_collectives(device: torch.device) -> dict[str, dict[int, tuple[list[int], list[float]]]]:
    """{op: {group size: (payload sizes, seconds)}}: the slowest rank's median per size."""
    world = dist.get_world_size()
    sizes = [2 ** k for k in ((20, 22, 24, 26) if device.type == "cuda" else (12, 16, 20, 22, 24, 26))]
    out: dict[str, dict[int, tuple[list[int], list[float]]]] = {op: {} for op in OPS}
    g = 2
    while g <= world:
        mine = None
        for ranks in _groups(world, g):  # every rank creates every group (torch's rule), in the same order
            pg = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                mine = (pg, ranks)
        for op in OPS:
            if op == "send_recv" and g != 2:
                continue
            local = torch.tensor([_time_op(op, s, mine[0], mine[1], device) for s in sizes], dtype=torch.float64)
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
            out[op][g] = (sizes, local.tolist())
        g *= 2
    return {op: fits for op, fits in out.items() if fits}


def measure_optimizer(device: torch.device, numel: int = 4 * 2 ** 20, steps: int = 5) -> float:
    """Seconds per trainable parameter of one AdamW step (torch's default implementation, what the engine
    builds), every rank stepping at once: memory-bound, so on a CPU it grows with the parameters a rank updates
    (the planner's overhead_s.optimizer_param)."""
    p = torch.nn.Parameter(torch.randn(numel, device=device))
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], lr=1e-3)
    opt.step()
    times = []
    for _ in range(steps):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / numel


def measure_host_device(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0  # a CPU's "device" memory is host memory
    host = torch.empty(64 * 2 ** 20, dtype=torch.float32, pin_memory=True)
    dev = torch.empty_like(host, device=device)
    dev.copy_(host, non_blocking=True)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    _sync(device)
    return 3 * host.numel() * 4 / (time.perf_counter() - t0)


def measure_disk(nbytes: int = 64 * 2 ** 20) -> float:
    """Write + fsync bandwidth of $TMPDIR (where an NVMe offload directory would typically live)."""
    block = os.urandom(2 ** 20)
    with tempfile.NamedTemporaryFile() as f:
        t0 = time.perf_counter()
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        return nbytes / (time.perf_counter() - t0)


def _engine_step_s(ctx, overrides: dict, steps: int = 5) -> float:
    """Median seconds per optimizer step of a real training run of `steps` + 1 steps, timed as a user's run is
    (the metrics file's `step_time_s`, the loop's whole step: data, the step, metrics), the first step (warm-up)
    left out; rank 0's figure (it times after the step's world-wide reduction)."""
    from trellis import configs

    from ..trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="trellis-calibrate-") as tmp:
        path = Path(tmp) / "m.jsonl"
        path_t = [str(path)]
        dist.broadcast_object_list(path_t, src=0)  # every rank writes its config with rank 0's path
        base = {"train.micro_batch_size": 1, "data.seq_len": 16, "train.steps": steps + 1, "logging.progress": "none",
                "logging.metrics_file": path_t[0], "precision.dtype": "fp32", "train.warmup_steps": 0,
                "checkpoint.dir": "", "train.eval_interval": 0}
        Trainer(configs.load("tiny-llama", {**base, **overrides}), ctx).train()
        t = torch.zeros(1, dtype=torch.float64)
        if ctx.rank == 0:
            times = [r["step_time_s"] for r in map(json.loads, path.read_text().splitlines()) if "step_time_s" in r]
            t[0] = statistics.median(times[1:])
        dist.broadcast(t, src=0)
        dist.barrier()  # rank 0 has read the file before its directory goes
    return float(t)


def measure_overheads(ctx, profile: ClusterProfile) -> dict[str, float]:
    """overhead_s from the real engine (module docstring), priced collectives subtracted."""
    from ..memory.estimator import TrainingSetup
    from ..memory.models import resolve_model, total_params
    from ..memory.throughput import step_collectives, step_time

    world = ctx.world_size
    d = resolve_model("tiny-llama")
    psi = total_params(d)

    def comm(s: TrainingSetup, trainable: float, axes: tuple[str, ...]) -> float:
        return sum(profile.comm(c.op, c.group, c.bytes, c.calls)
                   for c in step_collectives(d, s, trainable) if c.axis in axes)

    dense = {"parallel.dp": world, "parallel.tp": 1, "parallel.pp": 1}
    t1 = _engine_step_s(ctx, {**dense, "train.grad_accum": 1})
    t8 = _engine_step_s(ctx, {**dense, "train.grad_accum": SLOPE_MB})
    per_mb = max((t8 - t1) / (SLOPE_MB - 1), 0.0)
    s1 = TrainingSetup(dp=world, micro_batch=1, seq_len=16, grad_accum=1, precision="fp32")
    opt = profile.overhead("optimizer_param")
    step = max(t1 - per_mb - comm(s1, psi, ("dp", "world")) - opt * psi, 0.0)
    layer = per_mb / d.layers
    tp_layer = layer
    if world >= 2 and world % 2 == 0:
        t_tp = _engine_step_s(ctx, {"parallel.dp": world // 2, "parallel.tp": 2, "parallel.pp": 1,
                                    "train.grad_accum": 4})
        s_tp = TrainingSetup(dp=world // 2, tp=2, micro_batch=1, seq_len=16, grad_accum=4, precision="fp32")
        rest = step + comm(s_tp, psi / 2, ("dp", "world"))
        tp_layer = max((t_tp - rest - comm(s_tp, psi / 2, ("tp",))) / 4 / d.layers, layer)
    over = {"layer": layer, "tp_layer": tp_layer, "step": step, "optimizer_param": opt}

    def residual(overrides: dict, setup: TrainingSetup, trainable: float) -> float:
        """Measured minus predicted (with the overheads found so far) seconds of one real step."""
        measured = _engine_step_s(ctx, {**dense, **overrides})
        return measured - step_time(d, setup, trainable, replace(profile, overhead_s=dict(over)))[0]

    # per activation element: the same steps at 8x the tokens (norms, activations, softmax scale with them)
    long = TrainingSetup(dp=world, micro_batch=1, seq_len=LONG_SEQ, grad_accum=4, precision="fp32")
    over["elem_layer"] = max(residual({"data.seq_len": LONG_SEQ, "train.grad_accum": 4}, long, psi), 0.0) / (
        4 * d.layers * LONG_SEQ * d.hidden)
    # full activation checkpointing beyond its recomputed FLOPs and dispatch
    ac = TrainingSetup(dp=world, micro_batch=1, seq_len=16, grad_accum=4, precision="fp32",
                       activation_checkpointing="full")
    over["ckpt_layer"] = max(residual({"train.grad_accum": 4, "activation_checkpointing.mode": "full"}, ac, psi),
                             0.0) / (4 * d.layers)
    # FSDP2 (ZeRO-3) per all-gather / reduce-scatter call beyond its priced payload
    z3 = TrainingSetup(dp=world, micro_batch=1, seq_len=16, grad_accum=4, precision="fp32", zero=3,
                       backend="native")
    calls = sum(c.calls for c in step_collectives(d, z3, psi) if c.op in ("all_gather", "reduce_scatter"))
    over["fsdp_unit"] = max(residual({"train.grad_accum": 4, "zero.stage": 3}, z3, psi), 0.0) / max(calls, 1) \
        if world > 1 else 0.0
    return over


def calibrate(ctx) -> ClusterProfile | None:
    """Measure this job's profile on every rank; rank 0 returns it."""
    device = ctx.device
    flops = torch.tensor(list(measure_matmul(device).values()), dtype=torch.float64)
    keys = ("fp32", "bf16", "fp16")
    dist.all_reduce(flops, op=dist.ReduceOp.MIN)  # the slowest rank sets the pace
    raw = measure_collectives(device)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    fits = {op: {g: fit_alpha_beta([float(x) for x in xs], ts) for g, (xs, ts) in by_g.items()}
            for op, by_g in raw.items()}
    # a group wider than a node crosses the network: those fits price the planner's inter-node groups
    intra = {op: {g: ab for g, ab in by_g.items() if g <= local} for op, by_g in fits.items()}
    inter = {op: {g: ab for g, ab in by_g.items() if g > local} for op, by_g in fits.items()}
    host_dev = measure_host_device(device)
    disk = measure_disk() if ctx.rank == 0 else 0.0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    profile = ClusterProfile(
        device=name, source=f"measured by trellis plan --calibrate on {socket.gethostname()}, {ctx.world_size} "
                            f"ranks, {time.strftime('%Y-%m-%d %H:%M')}",
        matmul_flops=dict(zip(keys, flops.tolist())), collectives={op: f for op, f in intra.items() if f},
        inter_node={op: f for op, f in inter.items() if f}, ranks_per_node=local,
        host_device_bytes_per_s=host_dev, nvme_bytes_per_s=disk)
    t_opt = torch.tensor([measure_optimizer(device)], dtype=torch.float64)
    dist.all_reduce(t_opt, op=dist.ReduceOp.MAX)
    profile = replace(profile, overhead_s={**profile.overhead_s, "optimizer_param": float(t_opt)})
    overhead = measure_overheads(ctx, profile)
    if ctx.rank != 0:
        return None
    return replace(profile, overhead_s=overhead)


def run_calibration(nproc: int, out: str) -> int:
    """`trellis plan --calibrate`: start `nproc` local ranks running this (like `trellis train`), or, under a
    launcher or a Slurm allocation, be one rank of that job. Rank 0 writes the profile to `out`."""
    from trellis.errors import ConfigError

    from ..distributed import init_distributed, launcher_rank_env, shutdown
    from ..memory.cluster import save_profile
    from ..run import end_rank_process
    from ..spawn import spawn_local_ranks

    if launcher_rank_env() is None:
        nproc = nproc or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
        if nproc < 2:
            raise ConfigError(f"--nproc={nproc}: calibrating collectives needs at least 2 ranks; use --nproc 2 or more")
        return spawn_local_ranks(nproc, ["plan", "--calibrate", "--out", out])
    ctx = init_distributed(600.0)
    if ctx.world_size < 2:
        raise ConfigError("--calibrate: this job has 1 rank; collectives need at least 2 (start more ranks)")
    profile = calibrate(ctx)
    if profile is not None:
        save_profile(profile, out)
        print(summary(profile, out), flush=True)
    shutdown(True, destroy=False)
    end_rank_process(0)


def summary(p: ClusterProfile, out: str) -> str:
    lines = [f"wrote {out}: {p.source}",
             "matmul TFLOP/s per rank: " + ", ".join(f"{k} {v / 1e12:.3g}" for k, v in p.matmul_flops.items()),
             "collectives (alpha µs, bandwidth GB/s of payload):"]
    for op, fits in p.collectives.items():
        lines.append(f"  {op:<15}" + "  ".join(f"n={g}: {ab.alpha * 1e6:.0f} µs, "
                                              f"{(1 / ab.beta / 1e9) if ab.beta else float('inf'):.3g} GB/s"
                                              for g, ab in sorted(fits.items())))
    o = p.overhead_s
    lines.append(f"overhead: {o['layer'] * 1e3:.2f} ms per layer per micro-batch, {o['tp_layer'] * 1e3:.2f} ms "
                 f"with tp, {o['step'] * 1e3:.1f} ms per step; {o.get('elem_layer', 0) * 1e9:.1f} ns per activation "
                 f"element per layer, {o.get('ckpt_layer', 0) * 1e3:.2f} ms per checkpointed layer, "
                 f"{o.get('fsdp_unit', 0) * 1e3:.2f} ms per FSDP2 collective, "
                 f"{o.get('optimizer_param', 0) * 1e9:.1f} ns per parameter of the optimizer step")
    return "\n".join(lines)
