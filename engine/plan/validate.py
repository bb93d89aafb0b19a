"""`trellis plan --validate`: run some of the planned layouts here and compare predicted with measured step time.

Which: the top `--top K` of the ranking and the ceil(K/2) lowest-ranked (a planner that only orders its top
well would still pass a top-K-only check). How: each one is a real `trellis train` child process (which
starts its own ranks, as a user's run would) with the layout's fields as overrides of `--config` (default:
the shipped tiny-llama demo config, so the corpus is the built-in one), `--validate-steps` timed steps after
one warm-up step; the measured step time is the median of the metrics file's `step_time_s` over the timed
steps. The rank correlation is Spearman's rho of predicted vs measured step time over the layouts that ran.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from trellis.errors import ConfigError

from ..memory.planner import Candidate, PlanResult


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (ties get their average rank); None for fewer than 2 pairs or no spread."""
    if len(xs) != len(ys) or len(xs) < 2:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


def pick(result: PlanResult, top: int) -> list[Candidate]:
    """The top `top` layouts and the ceil(top/2) lowest-ranked ones, each once, in ranking order."""
    ranked = result.feasible
    low = ranked[max(top, len(ranked) - math.ceil(top / 2)):]
    return ranked[:top] + low


def overrides(c: Candidate, steps: int, metrics: Path, model: str | None = None) -> list[str]:
    s = c.setup
    kv = {**({"model.path": model} if model else {}), "parallel.dp": s.dp, "parallel.tp": s.tp, "parallel.pp": s.pp, "zero.stage": s.zero,
          "zero.backend": s.backend, "zero.offload_optimizer": s.offload_optimizer,
          "activation_checkpointing.mode": s.activation_checkpointing, "train.micro_batch_size": s.micro_batch,
          "train.grad_accum": s.grad_accum, "data.seq_len": s.seq_len, "precision.dtype": s.precision,
          "train.steps": steps + 1, "train.warmup_steps": 0, "logging.progress": "none",
          "logging.metrics_file": str(metrics), "checkpoint.dir": "", "train.eval_interval": 0}
    return [f"--{k}={v}" for k, v in kv.items()]


def measure(c: Candidate, config: str, steps: int, workdir: Path, model: str | None = None) -> tuple[float | None, str]:
    """(median step seconds over the timed steps, "" or why it did not run) of one layout."""
    metrics = workdir / (c.name.replace("·", "_").replace(" ", "_").replace("=", "").replace("×", "x") + ".jsonl")
    log = metrics.with_suffix(".log")
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "trellis", "train", config, *overrides(c, steps, metrics, model)],
                              stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = [line for line in log.read_text().splitlines() if line.strip()][-1:] or [f"exit code {code}"]
        return None, tail[0][:200]
    times = [r["step_time_s"] for r in map(json.loads, metrics.read_text().splitlines())
             if "step_time_s" in r]
    if len(times) < 2:
        return None, f"only {len(times)} step(s) recorded"
    return statistics.median(times[1:]), ""


def validate(args, d, result: PlanResult) -> int:
    from ..distributed import launcher_rank_env

    if launcher_rank_env() is not None:
        raise ConfigError("--validate starts its own runs (one `trellis train` per layout): run it outside "
                          "a launcher, on the machine to check")
    if not result.feasible:
        raise ConfigError("--validate: no layout fits (see `trellis plan` without --validate)")
    if args.validate_steps < 1:
        raise ConfigError(f"--validate-steps={args.validate_steps}: must be >= 1")
    config = args.config or "tiny-llama"
    rows = []
    with tempfile.TemporaryDirectory(prefix="trellis-validate-") as tmp:
        for c in pick(result, args.top):
            measured, why = measure(c, config, args.validate_steps, Path(tmp), args.model)
            rows.append({"name": c.name, "predicted_step_s": c.step_time, "measured_step_s": measured, "why": why})
    ok = [r for r in rows if r["measured_step_s"] is not None]
    rho = spearman([r["predicted_step_s"] for r in ok], [r["measured_step_s"] for r in ok])
    print(render(rows, rho))
    if args.json:
        print(json.dumps({"layouts": [{k: r[k] for k in ("name", "predicted_step_s", "measured_step_s")}
                                      for r in rows], "spearman": rho}))
    return 0 if ok else 1


def render(rows: list[dict], rho: float | None) -> str:
    lines = [f"  {'layout':<52}{'predicted s':>12}{'measured s':>12}{'error':>8}"]
    for r in rows:
        m = r["measured_step_s"]
        err = f"{r['predicted_step_s'] / m - 1:+.0%}" if m else ""
        lines.append(f"  {r['name']:<52}{r['predicted_step_s']:>12.4f}{m if m else float('nan'):>12.4f}{err:>8}"
                     + (f"  did not run: {r['why']}" if r["why"] else ""))
    lines.append(f"Spearman rank correlation (predicted vs measured step time): "
                 f"{rho:.2f}" if rho is not None else "Spearman rank correlation: n/a (fewer than 2 layouts ran)")
    return "\n".join(lines)
