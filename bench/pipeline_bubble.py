"""Benchmark (not a test): each pipeline schedule's measured bubble fraction on pp2 next to its theory.

Measured, per rank: the schedule's step (`schedule.step`, the whole forward/backward of one optimizer step's
micro-batches) is timed with perf_counter; inside it, the time spent computing is the sum of the stage's own
forward, backward (full or input-gradient) and weight-gradient calls (torch's PipelineStage.forward_one_chunk,
backward_one_chunk, backward_weight_one_chunk) plus the loss closure. Everything else is idle: waiting for a
neighbour's activations or gradients, and the sends/receives themselves (gloo, no overlap on CPU).
    bubble(rank) = 1 - compute(rank) / step_time(rank)
The first step (torch's shape inference) is not counted.

Theory: the same per-rank action lists the schedule runs (torch's `pipeline_order`, or the GPipe / 1F1B order),
simulated with unit costs (forward = input-gradient = weight-gradient = 1, a full backward = 2, no
communication time), each action starting when its rank is free and its inputs exist. For GPipe and 1F1B
this gives (p - 1) / (m + p - 1); for ZBV with equal F, B and W the zero-bubble paper's ~0 is the ideal
(torch's ZBV order still leaves its warm-up/cool-down slots at small m).

    .venv/bin/python bench/pipeline_bubble.py [--micro 8] [--steps 4] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev")
COST = {"F": 1.0, "I": 1.0, "W": 1.0, "B": 2.0}


# ---- theory: unit-cost simulation of the per-rank action lists -------------------------------------------
def single_stage_order(schedule: str, rank: int, pp: int, m: int) -> list[tuple[str, int, int]]:
    """(op, stage, micro-batch) of GPipe / 1F1B on `rank` (one stage per rank)."""
    if schedule == "gpipe":
        return [("F", rank, i) for i in range(m)] + [("B", rank, i) for i in range(m)]
    warm = min(pp - 1 - rank, m)
    out = [("F", rank, i) for i in range(warm)]
    f, b = warm, 0
    while f < m:
        out += [("F", rank, f), ("B", rank, b)]
        f, b = f + 1, b + 1
    return out + [("B", rank, i) for i in range(b, m)]


def torch_order(pipeline_order: dict) -> dict[int, list[tuple[str, int, int]]]:
    """torch's compute-only pipeline_order as (op, stage, micro-batch) lists; overlapped F/B pairs unrolled."""
    out = {}
    for rank, actions in pipeline_order.items():
        ops = []
        for a in actions:
            if a is None:
                continue
            for sub in (a.sub_actions or (a,)):
                ops.append((sub.computation_type.value, sub.stage_index, sub.microbatch_index))
        out[rank] = ops
    return out


def simulate(orders: dict[int, list[tuple[str, int, int]]], num_stages: int, cost: dict | None = None) -> dict:
    """Per-rank bubble fraction of the makespan under unit (or given) action costs."""
    cost = cost or COST
    done: dict[tuple[str, int, int], float] = {}
    t = {r: 0.0 for r in orders}
    busy = {r: 0.0 for r in orders}
    pos = {r: 0 for r in orders}

    def ready(op, s, i):
        if op == "F":
            return 0.0 if s == 0 else done.get(("F", s - 1, i))
        if op in ("I", "B"):
            if s == num_stages - 1:
                return done.get(("F", s, i))
            nxt = [done.get((k, s + 1, i)) for k in ("I", "B")]
            return next((x for x in nxt if x is not None), None)
        return done.get(("I", s, i))  # W after its input-gradient pass

    while any(pos[r] < len(orders[r]) for r in orders):
        progressed = False
        for r in orders:
            while pos[r] < len(orders[r]):
                op, s, i = orders[r][pos[r]]
                dep = ready(op, s, i)
                if dep is None:
                    break
                start = max(t[r], dep)
                t[r] = start + cost[op]
                busy[r] += cost[op]
                done[(op, s, i)] = t[r]
                if op == "B":
                    done[("I", s, i)] = t[r]
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlocks in the simulation")
    span = max(t.values())
    return {"per_rank": [1 - busy[r] / span for r in sorted(orders)], "span": span}


# ---- measured: inside real ranks ---------------------------------------------------------------------------
def _worker(rank: int, world: int, plan: list[str], steps: int, micro: int, seq: int) -> list[dict]:
    import torch.distributed as dist

    from trellis import configs
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import Trainer

    ctx = init_distributed(300.0)
    out = []
    for schedule in plan:
        cfg = configs.load("tiny-llama", {"parallel.dp": 1, "parallel.pp": world, "parallel.pp_schedule": schedule,
                                          "train.micro_batch_size": 1, "train.grad_accum": micro,
                                          "train.steps": steps + 1, "data.seq_len": seq, "logging.progress": "none",
                                          "logging.metrics_file": ""})
        trainer = Trainer(cfg, ctx)
        pipe = trainer.backend.pm.pipeline
        sched = pipe._schedule
        stages = getattr(sched, "_stages", None) or [sched._stage]
        acc = {"compute": 0.0}

        def timed(fn):
            def run(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    acc["compute"] += time.perf_counter() - t0
            return run

        for st in stages:
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                setattr(st, name, timed(getattr(st, name)))
        sched._loss_fn = timed(sched._loss_fn)
        records = []
        step = sched.step

        def timed_step(*a, **k):
            acc["compute"] = 0.0
            dist.barrier(group=pipe.pp_group)
            t0 = time.perf_counter()
            r = step(*a, **k)
            records.append((time.perf_counter() - t0, acc["compute"]))
            return r

        sched.step = timed_step
        trainer.train()
        meas = records[1:]  # the first step runs torch's shape inference
        res = {"schedule": schedule, "step_s": [s for s, _ in meas], "compute_s": [c for _, c in meas],
               "bubble": [1 - c / s for s, c in meas]}
        if rank == 0:
            from torch.distributed.pipelining.schedules import PipelineScheduleMulti

            if isinstance(sched, PipelineScheduleMulti):
                orders = torch_order(sched.pipeline_order)
            else:
                orders = {r: single_stage_order(schedule, r, world, micro) for r in range(world)}
            res["theory"] = simulate(orders, pipe.num_stages)["per_rank"]
        out.append(res)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro", type=int, default=8, help="micro-batches per step (train.grad_accum)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per schedule; the order alternates per repeat")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    args = ap.parse_args()
    from tests.distributed.harness import run_ranks

    names = args.schedules.split(",")
    plan = []
    for rep in range(args.repeats):  # alternate the order so drift in machine load hits every schedule alike
        plan += names if rep % 2 == 0 else names[::-1]
    res = run_ranks(2, _worker, plan, args.steps, args.micro, args.seq, timeout=3000)
    rows = []
    print(f"pp2, {args.micro} micro-batches of 1 x {args.seq} tokens, tiny-llama; bubble = 1 - compute / step "
          f"(per rank, then the mean of the two ranks); {args.repeats} runs x {args.steps} steps")
    print(f"{'schedule':<18}{'theory':>8}{'measured min':>14}{'median':>8}{'max':>8}{'step s (median)':>17}")
    for name in names:
        runs = [i for i, s in enumerate(plan) if s == name]
        per_step = [statistics.mean(res[r][i]["bubble"][k] for r in range(2))
                    for i in runs for k in range(len(res[0][i]["bubble"]))]
        step_s = [max(res[r][i]["step_s"][k] for r in range(2)) for i in runs for k in range(len(res[0][i]["step_s"]))]
        theory = statistics.mean(res[0][runs[0]]["theory"])
        row = {"schedule": name, "theory": theory, "bubble_min": min(per_step),
               "bubble_median": statistics.median(per_step), "bubble_max": max(per_step),
               "bubble_per_rank_median": [statistics.median(b for i in runs for b in res[r][i]["bubble"])
                                          for r in range(2)],
               "step_s_median": statistics.median(step_s), "samples": len(per_step)}
        rows.append(row)
        print(f"{name:<18}{theory:>8.1%}{row['bubble_min']:>14.1%}{row['bubble_median']:>8.1%}"
              f"{row['bubble_max']:>8.1%}{row['step_s_median']:>17.3f}")
    if args.json:
        print(json.dumps({"pp": 2, "micro_batches": args.micro, "seq": args.seq, "rows": rows}))


if __name__ == "__main__":
    main()
