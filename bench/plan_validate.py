"""Benchmark (not a test): the calibrated planner's predictions against measured runs on this machine.

1. `trellis plan --calibrate --nproc 4` measures this machine's profile (runs/plan_cluster.json).
2. For tiny-llama and a generated ~32M-param Llama (hidden 512, 12 layers, 8 heads, 4 kv heads; config only,
   random init, written under runs/): the planner's prediction of each layout in LAYOUTS (4 ranks, global
   batch 8 × 128 tokens, fp32) on that profile, and its measured step time: the median of `--repeats` runs,
   each a real `trellis train` of `--steps` timed steps (engine/plan/validate.measure), the layouts
   alternated inside each repeat.
3. Per model: Spearman's rho of predicted vs measured tokens/s, whether the predicted best is within 10 % of
   the measured best, and each prediction's error.

    .venv/bin/python bench/plan_validate.py [--repeats 3] [--steps 3] [--models tiny-llama,llama-32m] [--json]

`--json`: the last line is {"models": {name: {"layouts": [{"name", "predicted_step_s", "measured_step_s",
"measured_min_s", "measured_max_s"}], "spearman", "top_within_10pct", "max_abs_error"}}, "cluster": {...}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORLD, GLOBAL_BATCH, SEQ = 4, 8, 128
# name: (dp, tp, pp, zero, activation checkpointing); micro-batch 1, grad_accum = GLOBAL_BATCH / dp
LAYOUTS = {"dp4": (4, 1, 1, 0, "none"), "dp4 z3": (4, 1, 1, 3, "none"), "dp4 ac=full": (4, 1, 1, 0, "full"),
           "dp2·pp2": (2, 1, 2, 0, "none"), "dp2·tp2": (2, 2, 1, 0, "none"), "pp2·tp2": (1, 2, 2, 0, "none"),
           "pp4": (1, 1, 4, 0, "none")}
LLAMA_32M = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 512,
             "intermediate_size": 1280, "num_hidden_layers": 12, "num_attention_heads": 8,
             "num_key_value_heads": 4, "head_dim": 64, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
             "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
             "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
             "eos_token_id": 2, "pad_token_id": 0, "use_cache": False}


def model_path(name: str) -> str:
    if name == "tiny-llama":
        return name
    d = Path("runs/plan_models") / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(LLAMA_32M, indent=1))
    return str(d)


def candidates(model: str, cluster) -> dict:
    """The planner's Candidate (with its prediction) for each layout in LAYOUTS."""
    from trellis.engine.memory.estimator import TrainingSetup, estimate
    from trellis.engine.memory.models import resolve_model
    from trellis.engine.memory.planner import Candidate, throughput

    d = resolve_model(model)
    base = TrainingSetup(backend="native", precision="fp32", seq_len=SEQ, micro_batch=1, gpu_mem=80e9,
                         gpus_per_node=WORLD)
    out = {}
    for name, (dp, tp, pp, zero, ac) in LAYOUTS.items():
        s = replace(base, dp=dp, tp=tp, pp=pp, zero=zero, activation_checkpointing=ac, grad_accum=GLOBAL_BATCH // dp)
        est = estimate(d, s)
        t, parts = throughput(d, s, est, cluster)
        out[name] = Candidate(s, est, t, GLOBAL_BATCH * SEQ / t, parts)
    return d, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--models", default="tiny-llama,llama-32m")
    ap.add_argument("--cluster", help="reuse a profile instead of calibrating now")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from trellis.engine.memory.cluster import load_profile
    from trellis.engine.memory.models import total_params
    from trellis.engine.plan.validate import measure, spearman

    Path("runs").mkdir(exist_ok=True)
    cluster_file = args.cluster or "runs/plan_cluster.json"
    if not args.cluster:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trellis", "plan", "--calibrate", "--nproc", str(WORLD), "--out",
                        cluster_file], check=True)
        print(f"calibration: {time.perf_counter() - t0:.1f} s", flush=True)
    cluster = load_profile(cluster_file)
    report = {"cluster": cluster.as_dict(), "models": {}}
    for model in args.models.split(","):
        path = model_path(model)
        d, cands = candidates(path, cluster)
        runs: dict[str, list[float]] = {n: [] for n in cands}
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.repeats):
                for name, c in cands.items():
                    t, why = measure(c, "tiny-llama", args.steps, Path(tmp), None if path == "tiny-llama" else path)
                    if t is None:
                        raise SystemExit(f"{model} {name}: did not run: {why}")
                    runs[name].append(t)
                    print(f"{model} {name} repeat {rep}: {t:.4f} s/step (predicted {c.step_time:.4f})", flush=True)
        rows = [{"name": n, "predicted_step_s": c.step_time, "measured_step_s": statistics.median(runs[n]),
                 "measured_min_s": min(runs[n]), "measured_max_s": max(runs[n]), "parts": c.parts}
                for n, c in cands.items()]
        pred = [r["predicted_step_s"] for r in rows]
        meas = [r["measured_step_s"] for r in rows]
        best_pred = min(rows, key=lambda r: r["predicted_step_s"])
        best = min(meas)
        report["models"][model] = {
            "params": total_params(d), "layouts": rows, "spearman": spearman(pred, meas),
            "top_choice": best_pred["name"], "top_vs_best": best / best_pred["measured_step_s"],
            "top_within_10pct": best_pred["measured_step_s"] <= best * 1.10,
            "max_abs_error": max(abs(p / m - 1) for p, m in zip(pred, meas))}
    Path("runs/bench_plan_validate.json").write_text(json.dumps(report, indent=1))
    for model, r in report["models"].items():
        print(f"\n{model} ({r['params'] / 1e6:.1f}M params), {WORLD} ranks, global batch {GLOBAL_BATCH} x {SEQ}, fp32; "
              f"measured = median of {args.repeats} runs (min/max)")
        print(f"  {'layout':<14}{'predicted s':>12}{'measured s':>12}{'min/max':>18}{'error':>8}")
        for row in sorted(r["layouts"], key=lambda x: x["measured_step_s"]):
            print(f"  {row['name']:<14}{row['predicted_step_s']:>12.4f}{row['measured_step_s']:>12.4f}"
                  f"{row['measured_min_s']:>9.4f}/{row['measured_max_s']:<8.4f}"
                  f"{row['predicted_step_s'] / row['measured_step_s'] - 1:>+8.0%}")
        print(f"  Spearman {r['spearman']:.2f}; top choice {r['top_choice']} at {r['top_vs_best']:.0%} of the measured "
              f"best's tokens/s; max |error| {r['max_abs_error']:.0%}")
    if args.json:
        print(json.dumps({"models": {m: {k: v for k, v in r.items() if k != "params"} for m, r in
                                     report["models"].items()}, "cluster": report["cluster"]}))


if __name__ == "__main__":
    main()
