"""Benchmark (not a test): where a tp2 training step's time goes on rank 0 (cProfile), in particular the
share spent in DTensor's Python code (torch/distributed/tensor/: op dispatch, sharding propagation,
redistribute, from_local / to_local wrappers).

    .venv/bin/python bench/tp_profile.py [--steps 4] [--json]

Reported: step time with the profiler on, self time of DTensor's Python functions / the profiled steps'
total (`dtensor_self_share`), the cumulative time under DTensor.__torch_dispatch__ (`dtensor_dispatch_share`),
time in collectives' Python entry points (`collective_share`), and the top functions by self time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GLOBAL_BATCH, SEQ, MICRO = 8, 128, 1


def _worker(rank: int, world: int, steps: int) -> dict:
    import cProfile
    import pstats
    import time

    from trellis import configs
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import Trainer

    ctx = init_distributed(300.0)
    cfg = configs.load("tiny-llama", {"parallel.dp": 1, "parallel.pp": 1, "parallel.tp": world, "train.micro_batch_size": MICRO,
                                      "train.grad_accum": GLOBAL_BATCH // MICRO, "train.steps": steps + 1,
                                      "data.seq_len": SEQ, "logging.progress": "none", "logging.metrics_file": ""})
    trainer = Trainer(cfg, ctx)
    engine = trainer.engine
    batches = engine.batches(trainer.train_data)
    engine.train_step(next(batches))  # warm-up
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        engine.train_step(next(batches))
    prof.disable()
    total = time.perf_counter() - t0
    st = pstats.Stats(prof)
    dt_self = dispatch_cum = coll_cum = 0.0
    rows = []
    for (path, line, fn), (cc, nc, tt, ct, callers) in st.stats.items():
        p = path.replace("\\", "/")
        if "torch/distributed/tensor/" in p:
            dt_self += tt
            if fn == "__torch_dispatch__" and p.endswith("tensor/_api.py"):
                dispatch_cum = max(dispatch_cum, ct)
        if p.endswith("distributed/distributed_c10d.py") and fn in ("all_reduce", "all_gather_into_tensor",
                                                                    "reduce_scatter_tensor", "all_gather_single",
                                                                    "reduce_scatter_single"):
            coll_cum += ct
        rows.append((tt, f"{Path(p).name}:{line}({fn})", nc))
    rows.sort(reverse=True)
    # functional collectives (DTensor's) run as aten ops: add their C++ entry points' time
    for (path, line, fn), (cc, nc, tt, ct, callers) in st.stats.items():
        if fn.startswith("<built-in method") and "_c10d_functional" in fn:
            coll_cum += ct
    return {"step_s": total / steps, "dtensor_self_share": dt_self / total, "dtensor_dispatch_share": dispatch_cum / total,
            "collective_share": coll_cum / total, "top": [(round(t / total, 4), name, n) for t, name, n in rows[:15]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from tests.distributed.harness import run_ranks

    r0 = run_ranks(args.tp, _worker, args.steps, timeout=900)[0]
    print(f"tp{args.tp} tiny-llama, {GLOBAL_BATCH} x {SEQ} tokens per step, rank 0 under cProfile: "
          f"{r0['step_s']:.3f} s/step")
    print(f"DTensor Python self time {r0['dtensor_self_share']:.1%}, under DTensor's op dispatch "
          f"{r0['dtensor_dispatch_share']:.1%}, collectives' entry points {r0['collective_share']:.1%}")
    for share, name, n in r0["top"]:
        print(f"  {share:6.1%}  {n:>7}  {name}")
    if args.json:
        print(json.dumps({k: v for k, v in r0.items() if k != "top"}))


if __name__ == "__main__":
    main()
