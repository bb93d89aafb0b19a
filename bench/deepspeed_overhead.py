"""Engine overhead of trellis' DeepSpeed backend: mean step time of `trellis train --zero.backend=deepspeed`
vs a raw DeepSpeed script (HF model + deepspeed.initialize + backward/step) on the same model, DeepSpeed
config, data and ranks. One run each; prints the ratio (goal <= 1.03). Not a test.

    .venv/bin/python bench/deepspeed_overhead.py [--steps 20] [--dp 2] [--stage 2]
"""

from __future__ import annotations

import argparse
import json
import os
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
    from trellis.engine.tokenizer import find_tokenizer, load_tokenizer

    ds_ops.use_project_extensions_dir()
    import deepspeed

    cfg = configs.load("tiny-llama", overrides(a))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()  # same device choice as trellis (engine/distributed.py)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    model, model_dir = build_model(cfg.model, seed=cfg.train.seed, device=device)
    tok = load_tokenizer(find_tokenizer(model_dir, cfg.model.tokenizer))
    data, _ = build_dataset(cfg.data, tok, cfg.train.seed, 0)
    sampler = GlobalBatchSampler(data, micro_batch_size=a.mb, grad_accum=a.ga, dp_rank=rank, dp_size=world)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()],
                                           config=build_ds_config(cfg, world))
    times = []
    for _ in range(a.steps):
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
    if rank == 0:
        Path(out).write_text(json.dumps(times))


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


def run_raw(a, tmp: Path) -> float:
    out = tmp / "raw.json"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.dp}", __file__,
            "--raw-rank", str(out), *[f"--{k}={getattr(a, k)}" for k in ("steps", "dp", "stage", "mb", "ga", "seq")]]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // a.dp))}
    subprocess.run(argv, check=True, timeout=a.timeout, env=env)
    return mean_after_warmup(json.loads(out.read_text()))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--mb", type=int, default=4)
    ap.add_argument("--ga", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--raw-rank", metavar="OUT", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.raw_rank:
        raw_rank(a, a.raw_rank)
        return 0
    with tempfile.TemporaryDirectory() as d:
        raw = run_raw(a, Path(d))
        ours = run_trellis(a, Path(d))
    print(f"deepspeed ZeRO-{a.stage} dp={a.dp} mb={a.mb} ga={a.ga} seq={a.seq}, {a.steps} steps "
          f"(first {WARMUP} excluded)")
    print(f"raw DeepSpeed script : {raw * 1000:8.1f} ms/step")
    print(f"trellis train        : {ours * 1000:8.1f} ms/step")
    print(f"ratio trellis / raw  : {ours / raw:.3f}  (goal <= 1.03)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
