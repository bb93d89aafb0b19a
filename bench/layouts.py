"""Benchmark (not a test): tokens/s per layout relative to 1 process, and collective payload bytes per
step per mesh axis next to the theoretical payload for that layout.

Bytes are counted by the package's comm-counting mode (trellis.parallel.comm_count) around one step inside
every rank, after the timed steps (its dispatch mode costs a Python call per aten op, so it never runs
while timing). "Payload" is the size of the tensor handed to the collective (what one rank contributes),
not wire bytes. Throughput: each layout is run alternately with the 1-process reference, `--repeats` pairs
(fresh processes each); the ratio's min / median / max over the pairs is printed.

    .venv/bin/python bench/layouts.py [--steps 4] [--repeats 7] [--layouts dp2,tp2,pp2,cp2,dp2tp2,pp2tp2,cp2tp2,dp2pp2tp2] [--json]

`--json`: the last line is {"layouts": [{"name", "ranks", "tokens_per_s_ratio", "tp_bytes",
"tp_bytes_megatron", "dp_bytes", "pp_bytes", "cp_bytes", "cp_bytes_theory"}]} (ratio = the median; bytes per
step on rank 0, counted; tp_bytes_megatron and cp_bytes_theory from `theory`; cp_bytes: the all-to-alls on the cp
axis).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYOUTS = {
    "1": dict(dp=1, pp=1, tp=1), "dp2": dict(dp=2, pp=1, tp=1), "tp2": dict(dp=1, pp=1, tp=2),
    "pp2": dict(dp=1, pp=2, tp=1), "dp2tp2": dict(dp=2, pp=1, tp=2), "pp2tp2": dict(dp=1, pp=2, tp=2),
    "dp2pp2tp2": dict(dp=2, pp=2, tp=2),
    # context parallel (parallel/context_parallel.py): the sequence split over cp ranks
    "cp2": dict(dp=1, pp=1, tp=1, cp=2), "cp4": dict(dp=1, pp=1, tp=1, cp=4), "cp2tp2": dict(dp=1, pp=1, tp=2, cp=2),
    "dp2cp2": dict(dp=2, pp=1, tp=1, cp=2),
}


def ranks(layout: dict) -> int:
    return layout["dp"] * layout["pp"] * layout["tp"] * layout.get("cp", 1)
GLOBAL_BATCH, SEQ, MICRO = 8, 128, 1


def _worker(rank: int, world: int, layout: dict, steps: int, count: bool) -> dict:
    from trellis import configs
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import Trainer
    from trellis.parallel.comm_count import count_collectives
    from trellis.parallel.models import family_for

    ctx = init_distributed(300.0)
    accum = GLOBAL_BATCH // (MICRO * layout["dp"])
    cfg = configs.load("tiny-llama", {"parallel.dp": layout["dp"], "parallel.pp": layout["pp"], "parallel.tp": layout["tp"],
                                      "parallel.cp": layout.get("cp", 1),
                                      "train.micro_batch_size": MICRO, "train.grad_accum": accum,
                                      "train.steps": steps + 2, "data.seq_len": SEQ, "logging.progress": "none",
                                      "logging.metrics_file": ""})
    trainer = Trainer(cfg, ctx)
    engine = trainer.engine
    batches = engine.batches(trainer.train_data)
    engine.train_step(next(batches))  # warm-up (shape inference, first allocations): not timed
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.train_step(next(batches))
    dt = (time.perf_counter() - t0) / steps
    out = {"rank": rank, "step_s": dt}
    if count:
        with count_collectives(trainer.dims.mesh) as counts:
            engine.train_step(next(batches))
        out["bytes"] = {axis: counts.bytes(axis) for axis in counts.by_axis}
        out["calls"] = counts.as_dict()
        out["params_local"] = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                  for p in trainer.backend.params)
        c = trainer.hf_config
        out.update(hidden=c.hidden_size, layers=c.num_hidden_layers, vocab=c.vocab_size,
                   heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                   tp_plan=dict(family_for(c.model_type).tp_plan))
    return out


def theory(layout: dict, r: dict) -> dict[str, int]:
    """Payload bytes per step for one rank (fp32), hand-derived. act = b*s*h*4 bytes (one micro-batch's
    hidden states), L = decoder layers on this rank's stage, accum = micro-batches per step.
    dp: one all-reduce of this rank's gradients (+ the step's scalars, not in the formula).
    tp (Megatron, no sequence parallel): per layer and micro-batch one all-reduce of act forward after the
        row-parallel attention output and one after the MLP output (`g`), and one backward all-reduce of the
        input gradient of the attention block and one of the MLP (`f`, shared by q/k/v and by gate/up):
        4 * L * act. On the first stage the vocab-parallel embedding's forward all-reduce (act; token ids
        have no gradient), on the last stage the column-parallel head's input gradient (act) and the
        vocab-parallel cross-entropy's three all-reduces of b*s floats (max, sum of exp, target logit; Megatron's
        vocab_parallel_cross_entropy does the same three):
            tp_megatron = accum * (4 * L * act + act [first stage] + act + 3 * b * s * 4 [last stage])
        (the step's loss/token scalars, a few bytes, are not in the formula)
        With sequence parallel each of the four becomes an all-gather (act / tp handed in) and a
        reduce-scatter (act handed in), forward and backward (not run here).
        `tp_per_linear` is what a plan reducing every column-parallel input gradient on its own moves
        (DTensor's Colwise/RowwiseParallel: (2 + colwise linears) * L * act + ends; Llama: 1.67x).
    pp: per micro-batch one activation send forward and one gradient send backward of act per stage
        boundary, counted on both sides (send + recv).
    cp (Ulysses): per layer and micro-batch q, k, v and the attention output all-to-all'd forward and their
        gradients backward, each this rank's [b, s/cp, heads/tp, d] chunk (kv heads at their count when they
        divide cp, else replicated to the query heads): 2 * L * b * s/cp * (2 heads + 2 kv) * d / tp * 4.
        (With cp the sequence is cut before tp, so `act` and the tp figures above are per chunk.)"""
    dp, pp, tp, cp = layout["dp"], layout["pp"], layout["tp"], layout.get("cp", 1)
    accum = GLOBAL_BATCH // (MICRO * dp)
    act = MICRO * SEQ // cp * r["hidden"] * 4
    out = {}
    if dp > 1:
        out["dp"] = r["params_local"] * 4
    if tp > 1:
        layers_here = r["layers"] // pp
        col = sum(style.startswith("colwise") for style in r["tp_plan"].values())
        ce = 3 * MICRO * SEQ * 4
        ends = act + (act + ce if pp == 1 else 0)  # rank 0: the embedding's forward all-reduce (+ head and loss)
        out["tp"] = out["tp_megatron"] = accum * (4 * layers_here * act + ends)
        out["tp_per_linear"] = accum * ((2 + col) * layers_here * act + ends)
    if pp > 1:
        out["pp"] = accum * 2 * act
    if cp > 1:
        d_head = r["hidden"] // r["heads"]
        kv = r["kv_heads"] if (r["kv_heads"] // tp) % cp == 0 else r["heads"]
        out["cp"] = accum * 2 * (r["layers"] // pp) * MICRO * SEQ // cp * (2 * r["heads"] + 2 * kv) * d_head // tp * 4
    return out


def _tok_s(res: list[dict]) -> float:
    return GLOBAL_BATCH * SEQ / max(r["step_s"] for r in res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7,
                    help="alternating (1 process, layout) pairs per layout (0: count bytes only)")
    ap.add_argument("--layouts", default=",".join(k for k in LAYOUTS if k != "1"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from tests.distributed.harness import run_ranks

    def run(name: str, count: bool) -> list[dict]:
        lay = LAYOUTS[name]
        return run_ranks(ranks(lay), _worker, lay, args.steps, count, timeout=900)

    rows = []
    for name in args.layouts.split(","):
        counted = run(name, True)[0]
        ratios = []
        for _ in range(args.repeats):  # alternate A/B: the reference, then the layout
            ref = _tok_s(run("1", False))
            ratios.append(_tok_s(run(name, False)) / ref)
        th = theory(LAYOUTS[name], counted)
        lay = LAYOUTS[name]
        rows.append({"name": name, "ranks": ranks(lay), "ratios": ratios, "counted": counted,
                     "theory": th})
    print(f"tiny-llama, global batch {GLOBAL_BATCH} x {SEQ} tokens, fp32, gloo on this machine's CPU cores; "
          f"{args.repeats} alternating pairs per layout")
    print(f"{'layout':<11}{'ranks':>6}{'vs 1 proc min/median/max':>28}   payload bytes/step on rank 0: counted (theory)")
    for row in rows:
        r, th, b = row["ratios"], row["theory"], row["counted"]["bytes"]
        if "cp" in th:
            b = {**b, "cp": row["counted"]["calls"].get("cp", {}).get("all_to_all_single", {}).get("bytes", 0)}
        parts = [f"{ax}={b.get(ax, 0):,} ({th.get(ax, 0):,})" for ax in ("dp", "tp", "pp", "cp") if ax in th or b.get(ax)]
        if "tp_per_linear" in th:
            parts.append(f"[per-linear plan {th['tp_per_linear']:,}]")
        parts += [f"{k}={v:,}" for k, v in b.items() if k not in ("dp", "tp", "pp", "cp")]
        rng = f"{min(r):.2f}/{statistics.median(r):.2f}/{max(r):.2f}" if r else "-"
        print(f"{row['name']:<11}{row['ranks']:>6}{rng:>28}   " + "  ".join(parts))
        print(f"{'':<11}tp calls: {json.dumps(row['counted']['calls'].get('tp', {}))}")
    Path("runs").mkdir(exist_ok=True)
    Path("runs/bench_layouts.json").write_text(json.dumps(rows, default=str, indent=1))
    if args.json:
        print(json.dumps({"layouts": [
            {"name": row["name"], "ranks": row["ranks"],
             "tokens_per_s_ratio": statistics.median(row["ratios"]) if row["ratios"] else None,
             "tokens_per_s_ratio_min": min(row["ratios"], default=None),
             "tokens_per_s_ratio_max": max(row["ratios"], default=None),
             "tp_bytes": row["counted"]["bytes"].get("tp", 0), "tp_bytes_megatron": row["theory"].get("tp_megatron", 0),
             "dp_bytes": row["counted"]["bytes"].get("dp", 0), "pp_bytes": row["counted"]["bytes"].get("pp", 0),
             "cp_bytes": row["counted"]["calls"].get("cp", {}).get("all_to_all_single", {}).get("bytes", 0),
             "cp_bytes_theory": row["theory"].get("cp", 0)}
            for row in rows]}))


if __name__ == "__main__":
    main()
