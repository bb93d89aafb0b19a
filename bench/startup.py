"""Start-up cost of a LoRA run (issue 22): wall time of a 1-process, 1-step `trellis train --peft.method=lora` on a
prepared dataset vs `python -c "import torch, transformers"` (the floor any HF training script pays). Not a test.

The corpus is prepared once beforehand (not timed). `--pairs N` (default 7) alternates the order (baseline→trellis,
trellis→baseline, ...) and prints every ratio and their min/median/max (goal: median <= 1.5). `--json`: the last line
is `{"ratios": [...], "median": x, ...}`.

    .venv/bin/python bench/startup.py [--pairs 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE = [sys.executable, "-c", "import torch, transformers"]


def summarize(ratios: list[float]) -> dict:
    return {"ratios": list(ratios), "min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}


def trellis_argv(prepared: Path, tmp: Path) -> list[str]:
    return [sys.executable, "-m", "trellis", "train", "configs/tiny-llama.toml", f"--data.path={prepared}",
            "--parallel.dp=1", "--train.steps=1", "--peft.method=lora", "--logging.progress=none",
            f"--logging.metrics_file={tmp / 'metrics.jsonl'}"]


def wall(argv: list[str], timeout: float) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=REPO, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        prepared = tmp / "prepared"
        subprocess.run([sys.executable, "-m", "trellis", "data", "prepare", "configs/tiny-llama.toml", "--out",
                        str(prepared)], cwd=REPO, check=True, timeout=a.timeout, stdout=subprocess.DEVNULL)
        ours = trellis_argv(prepared, tmp)
        ratios = []
        for i in range(a.pairs):
            order = ("base", "trellis") if i % 2 == 0 else ("trellis", "base")
            t = {k: wall(BASELINE if k == "base" else ours, a.timeout) for k in order}
            ratios.append(t["trellis"] / t["base"])
            print(f"pair {i + 1}/{a.pairs} ({order[0]} first): import torch, transformers {t['base']:.2f} s, "
                  f"trellis train (LoRA, 1 step) {t['trellis']:.2f} s, ratio {ratios[-1]:.2f}", flush=True)
    s = summarize(ratios)
    print(f"ratio trellis train / import torch, transformers over {a.pairs} alternated pairs: min {s['min']:.2f} / "
          f"median {s['median']:.2f} / max {s['max']:.2f}  (goal: median <= 1.5)")
    if a.json:
        print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
