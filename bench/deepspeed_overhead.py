"""Engine overhead of trellis' DeepSpeed backend: mean step time of `trellis train --zero.backend=deepspeed`
vs a raw DeepSpeed script (HF model + deepspeed.initialize + backward/step) on the same model, DeepSpeed
config, data and ranks. Not a test.

`--pairs N` (default 7) runs N pairs, alternating the order (raw→trellis, trellis→raw, ...) so neither side always
pays a cold page cache or a neighbour's burst; prints every ratio and their min/median/max (goal: median <= 1.03).
`--count` instead runs each side once under parallel/comm_count.py's count_collectives and prints the torch.distributed
calls per training step (steps after the warm-up, Trainer work between steps included). `--json`: the last line is
one JSON object, `{"ratios": [...], "median": x, ...}` (with `--count`: `{"collectives_per_step": {...}}`).

    .venv/bin/python bench/deepspeed_overhead.py [--steps 20] [--dp 2] [--stage 2] [--pairs 7] [--count] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 2  # first steps pay allocator/JIT start-up; excluded from both sides


def overrides(a) -> dict:
    return {"parallel.dp": a.dp, "zero.backend": "deepspeed", "zero.stage": a.stage, "train.steps": a.steps,
            "train.micro_batch_size": a.mb, "train.grad_accum": a.ga, "data.seq_len": a.seq,
            "train.schedule": "constant", "train.warmup_steps": 0, "logging.progress": "none"}


def summarize(ratios: list[float]) -> dict:
    """min / median / max of the per-pair ratios (what --json prints)."""
    return {"ratios": list(ratios), "min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}


def per_step(snapshots: list[dict[str, int]], warmup: int = WARMUP) -> dict[str, float]:
    """Collectives per step from counter snapshots taken at the start of every step (and one after the loop):
    the calls between the start of step `warmup` and the start of the last step, over the steps in between."""
    first, last = snapshots[warmup], snapshots[-2]
    n = len(snapshots) - 2 - warmup
    return {k: (last.get(k, 0) - first.get(k, 0)) / n for k in sorted(set(first) | set(last))
            if last.get(k, 0) != first.get(k, 0)}


def raw_rank(a, out: str) -> None:
    """One rank of the raw DeepSpeed script. Uses trellis only to build the same HF model (same seed), load
    the same data and derive the same DeepSpeed config; the training loop is plain DeepSpeed."""
    import torch
    import torch.nn.functional as F

    from trellis import configs
    from trellis.engine.backends import ds_ops
    from trellis.engine.data import GlobalBatchSampler, build_dataset
    from trellis.engine.backends.deepspeed import build_ds_config
    from trellis.engine.model import build_model
    from trellis.engine.optim import param_groups
    from trellis.engine.tokenizer import find_tokenizer, load_tokenizer

    ds_ops.use_project_extensions_dir()
    import deepspeed

    cfg = configs.load("tiny-llama", overrides(a))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()  # same device choice as trellis (engine/distributed.py)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # Installed before DeepSpeed starts: deepspeed.comm binds some torch.distributed functions at init.
    counter = _counter(a)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    model, model_dir = build_model(cfg.model, seed=cfg.train.seed, device=device)
    tok = load_tokenizer(find_tokenizer(model_dir, cfg.model.tokenizer))
    data, _ = build_dataset(cfg.data, tok, cfg.train.seed, 0)
    sampler = GlobalBatchSampler(data, micro_batch_size=a.mb, grad_accum=a.ga, dp_rank=rank, dp_size=world)
    # The same optimizer parameter groups as trellis (no weight decay on norms and biases): equal work per step.
    named = list(model.named_parameters())
    groups = param_groups([p for _, p in named], [n for n, _ in named], cfg.train.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=build_ds_config(cfg, world))
    times, snaps = [], []
    for _ in range(a.steps):
        snaps.append(counter.snapshot())
        t0 = time.perf_counter()
        for b in sampler.next():
            logits = engine(input_ids=b.input_ids.to(device)).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b.labels.to(device).reshape(-1),
                                   ignore_index=-100)
            engine.backward(loss)
            engine.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    snaps.append(counter.snapshot())
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "snapshots": snaps}))


def _counter(a):
    """The package's counting mode (parallel/comm_count.py), installed for the whole run, before DeepSpeed takes
    its references to torch.distributed; counting only with --count (the timing runs get a no-op stand-in, as
    the mode's dispatch hook costs a Python call per op)."""
    if not a.count:
        return _NoCounts()
    from trellis.parallel.comm_count import count_collectives

    return count_collectives().__enter__()


class _NoCounts:
    def snapshot(self) -> dict:
        return {}


def trellis_count_rank(a, out: str) -> None:
    """One rank of `trellis train` (the Trainer and the DeepSpeed backend, as the CLI runs them) with every
    torch.distributed call counted; a snapshot at the start of each DeepSpeed train_step."""
    from trellis import configs
    from trellis.engine.backends.deepspeed import DeepSpeedBackend
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import train_this_rank

    cfg = configs.load("tiny-llama", overrides(a))
    counter, snaps = _counter(a), []
    step = DeepSpeedBackend.train_step

    def counted_step(self, *args, **kw):
        snaps.append(counter.snapshot())
        return step(self, *args, **kw)

    DeepSpeedBackend.train_step = counted_step
    ctx = init_distributed(cfg.parallel.timeout_s)
    train_this_rank(cfg, ctx)
    snaps.append(counter.snapshot())
    if ctx.rank == 0:
        Path(out).write_text(json.dumps({"snapshots": snaps}))


def mean_after_warmup(xs: list[float]) -> float:
    xs = xs[WARMUP:]
    return sum(xs) / len(xs)


def run_trellis(a, tmp: Path) -> float:
    metrics = tmp / "trellis.jsonl"
    argv = [sys.executable, "-m", "trellis", "train", "tiny-llama",
            *[f"--{k}={v}" for k, v in overrides(a).items()], f"--logging.metrics_file={metrics}"]
    subprocess.run(argv, check=True, timeout=a.timeout)
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    return mean_after_warmup([r["step_time_s"] for r in recs])


def _torchrun(a, mode: str, out: Path) -> dict:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.dp}", __file__,
            mode, str(out), *[f"--{k}={getattr(a, k)}" for k in ("steps", "dp", "stage", "mb", "ga", "seq")],
            *(["--count"] if a.count else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // a.dp))}
    subprocess.run(argv, check=True, timeout=a.timeout, env=env)
    return json.loads(out.read_text())


def run_raw(a, tmp: Path) -> float:
    return mean_after_warmup(_torchrun(a, "--raw-rank", tmp / "raw.json")["times"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--mb", type=int, default=4)
    ap.add_argument("--ga", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--count", action="store_true", help="count torch.distributed calls per step instead of timing")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--raw-rank", metavar="OUT", help=argparse.SUPPRESS)
    ap.add_argument("--trellis-rank", metavar="OUT", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.raw_rank:
        raw_rank(a, a.raw_rank)
        return 0
    if a.trellis_rank:
        trellis_count_rank(a, a.trellis_rank)
        return 0
    print(f"deepspeed ZeRO-{a.stage} dp={a.dp} mb={a.mb} ga={a.ga} seq={a.seq}, {a.steps} steps "
          f"(first {WARMUP} excluded)")
    with tempfile.TemporaryDirectory() as d:
        if a.count:
            raw = per_step(_torchrun(a, "--raw-rank", Path(d) / "raw.json")["snapshots"])
            ours = per_step(_torchrun(a, "--trellis-rank", Path(d) / "trellis.json")["snapshots"])
            print(f"torch.distributed calls per step, rank 0: raw {raw} ({sum(raw.values()):g}), "
                  f"trellis {ours} ({sum(ours.values()):g})")
            if a.json:
                print(json.dumps({"collectives_per_step": {"raw": raw, "trellis": ours}}))
            return 0
        ratios = []
        for i in range(a.pairs):
            order = (run_raw, run_trellis) if i % 2 == 0 else (run_trellis, run_raw)
            t = {f: f(a, Path(d)) for f in order}
            ratios.append(t[run_trellis] / t[run_raw])
            print(f"pair {i + 1}/{a.pairs} ({'raw first' if i % 2 == 0 else 'trellis first'}): raw "
                  f"{t[run_raw] * 1000:.1f} ms/step, trellis {t[run_trellis] * 1000:.1f} ms/step, ratio {ratios[-1]:.3f}",
                  flush=True)
    s = summarize(ratios)
    print(f"ratio trellis / raw over {a.pairs} alternated pairs: min {s['min']:.3f} / median {s['median']:.3f} / "
          f"max {s['max']:.3f}  (goal: median <= 1.03)")
    if a.json:
        print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
