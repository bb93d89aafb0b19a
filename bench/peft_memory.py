"""Benchmark (not a test): PEFT per-rank memory and LoRA step time.

1. Per-rank bytes of full fine-tuning vs LoRA vs QLoRA (NF4 + double quant) for the same tiny model and
   layout (dp=2, ZeRO-1), from each rank's live backend (memory_report) plus peak RSS.
2. LoRA step time of `trellis train` on N ranks vs peft's `get_peft_model` + a plain torch DDP loop
   (same model, global batch, LoRA targets and rank); prints the ratio trellis / (peft + DDP).

    .venv/bin/python bench/peft_memory.py [--ranks 2] [--steps 30] [--model tiny-llama]
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
MODES = {"full": {}, "lora": {"peft.method": "lora"}, "qlora": {"peft.method": "qlora"}}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_rank(rank: int, args, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.ranks), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(args.ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from trellis import configs
    from trellis.engine.distributed import init_distributed
    from trellis.engine.metrics import peak_memory_bytes
    from trellis.engine.trainer import Trainer

    ctx = init_distributed(300.0)
    rows = {}
    for mode, ov in MODES.items():
        cfg = configs.load(args.model, {"parallel.dp": args.ranks, "zero.stage": 1, "train.steps": 3,
                                        "logging.progress": "none", "logging.metrics_file": "", **ov})
        trainer = Trainer(cfg, ctx)
        trainer.train()
        rows[mode] = {**trainer.backend.memory_report(), "peak_rss": peak_memory_bytes(ctx.device)}
        del trainer
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    import torch.distributed as dist

    dist.destroy_process_group()


def memory_table(args) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "mem.json"
        mp.start_processes(_memory_rank, args=(args, _port(), str(out)), nprocs=args.ranks, start_method="spawn")
        return json.loads(out.read_text())


def trellis_lora_step(args, metrics: Path) -> float:
    cmd = [sys.executable, "-m", "trellis", "train", "configs/tiny-llama.toml", f"--train.steps={args.steps}",
           f"--parallel.dp={args.ranks}", "--peft.method=lora", f"--peft.r={args.r}",
           f"--logging.metrics_file={metrics}", "--logging.progress=none", "--train.micro_batch_size=4",
           "--train.grad_accum=2", "--zero.stage=0"]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=900)
    times = [json.loads(line)["step_time_s"] for line in metrics.read_text().splitlines()]
    return statistics.mean(times[WARMUP:])


def _peft_ddp_rank(rank: int, args, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks, init_method=f"tcp://127.0.0.1:{port}")
    cfg = AutoConfig.from_pretrained(str(REPO / "configs/models/tiny-llama"))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = DDP(get_peft_model(base, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    g = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        for a in range(2):
            ids = torch.randint(0, cfg.vocab_size, (4, 129), generator=g)
            ctx = model.no_sync() if a == 0 else torch.enable_grad()
            with ctx:
                logits = model(input_ids=ids[:, :-1]).logits
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)) / 2
                loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_t = loss.detach().clone()
        dist.all_reduce(loss_t)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.barrier()  # one run left rank 1 hanging when rank 0 tore the group down first
    dist.destroy_process_group()


def peft_ddp_step(args, out: Path) -> float:
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.ranks)))
    mp.start_processes(_peft_ddp_rank, args=(args, _port(), str(out)), nprocs=args.ranks, start_method="spawn")
    return statistics.mean(json.loads(out.read_text())[WARMUP:])


def _kib(b) -> str:
    return f"{b / 1024:9.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--model", default="tiny-llama")
    args = ap.parse_args()
    rows = memory_table(args)
    print(f"per-rank memory (rank 0), {args.model}, dp={args.ranks}, ZeRO-1, fp32 compute; KiB")
    print(f"{'mode':<6} {'params':>9} {'base':>9} {'trainable':>9} {'grads':>9} {'optim':>9} {'total':>9}  dtypes")
    for mode, m in rows.items():
        base = m["params"] - m["trainable_params"]
        total = m["params"] + m["grads"] + m["optimizer_states"] + m["master_weights"]
        print(f"{mode:<6} {_kib(m['params'])} {_kib(base)} {_kib(m['trainable_params'])} {_kib(m['grads'])} "
              f"{_kib(m['optimizer_states'])} {_kib(total)}  {m['params_by_dtype']}")
    with tempfile.TemporaryDirectory() as d:
        t_trellis = trellis_lora_step(args, Path(d) / "m.jsonl")
        t_ref = peft_ddp_step(args, Path(d) / "ddp.json")
    print(f"LoRA r={args.r}, {args.ranks} ranks, micro_batch 4 x accum 2, seq 128")
    print(f"trellis train (lora) : {t_trellis * 1000:8.1f} ms/step")
    print(f"peft + torch DDP loop: {t_ref * 1000:8.1f} ms/step")
    print(f"ratio trellis / (peft + DDP) = {t_trellis / t_ref:.3f}")


if __name__ == "__main__":
    main()
