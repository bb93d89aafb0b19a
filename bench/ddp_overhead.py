"""Benchmark (not a test): step time of `trellis train` vs a hand-written torch DDP loop.

Same tiny model, same global batch, same precision, same number of CPU ranks. Prints both median step
times (first steps excluded as warm-up; the median, because a shared 2-core VM has step-time spikes) and the
ratio trellis / DDP (goal <= 1.00). `--repeats N` runs N pairs, alternating which of the two runs first, and
prints every ratio with their min / median / max; `--json` prints `{"ratios": [...], "median": x}` last.

    .venv/bin/python bench/ddp_overhead.py [--steps 40] [--dtype fp32|bf16] [--ranks 2] [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WARMUP = 5


def trellis_step_time(args, metrics: Path) -> float:
    cmd = [sys.executable, "-m", "trellis", "train", "configs/tiny-llama.toml", f"--train.steps={args.steps}",
           f"--parallel.dp={args.ranks}", f"--precision.dtype={args.dtype}", f"--logging.metrics_file={metrics}",
           "--logging.progress=none", f"--train.micro_batch_size={args.micro_batch}", f"--train.grad_accum={args.accum}"]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=900)
    times = [json.loads(line)["step_time_s"] for line in metrics.read_text().splitlines()]
    return statistics.median(times[WARMUP:])


def _ddp_rank(rank: int, args, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks, init_method=f"tcp://127.0.0.1:{port}")
    cfg = AutoConfig.from_pretrained(str(REPO / "configs/models/tiny-llama"))
    torch.manual_seed(0)
    model = DDP(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]
    g = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        for a in range(args.accum):
            ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, 129), generator=g)
            ctx = model.no_sync() if a < args.accum - 1 else torch.enable_grad()
            with ctx, torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                logits = model(input_ids=ids[:, :-1]).logits
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)) / args.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_t = loss.detach().clone()
        dist.all_reduce(loss_t)  # trellis also reports a world-mean loss every step
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def ddp_step_time(args, out: Path) -> float:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.ranks)))
    mp.start_processes(_ddp_rank, args=(args, port, str(out)), nprocs=args.ranks, start_method="spawn")
    return statistics.median(json.loads(out.read_text())[WARMUP:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="print the ratios as one JSON object last")
    args = ap.parse_args()
    print(f"ranks={args.ranks} dtype={args.dtype} micro_batch={args.micro_batch} accum={args.accum} seq=128")
    ratios = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            if i % 2 == 0:  # alternate the order: neither side always gets the warmer machine
                t_trellis = trellis_step_time(args, Path(d) / "m.jsonl")
                t_ddp = ddp_step_time(args, Path(d) / "ddp.json")
            else:
                t_ddp = ddp_step_time(args, Path(d) / "ddp.json")
                t_trellis = trellis_step_time(args, Path(d) / "m.jsonl")
        ratios.append(t_trellis / t_ddp)
        print(f"pair {i + 1}: trellis train {t_trellis * 1000:7.1f} ms/step, torch DDP loop {t_ddp * 1000:7.1f} "
              f"ms/step, ratio {ratios[-1]:.3f}", flush=True)
    print(f"ratio trellis/DDP: min {min(ratios):.3f} / median {statistics.median(ratios):.3f} / max "
          f"{max(ratios):.3f} over {len(ratios)} alternated pairs (goal: median <= 1.00)")
    if args.json:
        print(json.dumps({"ratios": [round(r, 4) for r in ratios], "median": round(statistics.median(ratios), 4)}))


if __name__ == "__main__":
    main()
