"""Benchmark (not a test): kill -9 during checkpoint saves, N trials, plus save/load time and bytes per rank.

Each trial starts the real `trellis train` CLI (its own process group) saving every step with
`--resume auto`, SIGKILLs the whole group at a random moment, and checks that the newest valid
checkpoint passes every checksum and is not older than the previous trial's. The next trial resumes
from it, so a resume that fails shows up as a non-zero exit / no progress.

    .venv/bin/python bench/checkpoint_faults.py [--trials 50] [--dp 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BASE = ["tiny-llama", "--data.seq_len=64", "--train.micro_batch_size=2", "--logging.progress=none",
        "--train.steps=100000", "--checkpoint.interval=1", "--checkpoint.keep_last_k=2", "--resume=auto"]
LOAD_RE = re.compile(r"checkpoint: resumed from .* in ([0-9.]+)s")


def trial(ck: Path, dp: int, rng: random.Random, log: Path) -> tuple[bool, str, float | None]:
    from trellis.engine.checkpoint import io

    before = io.latest_valid(ck)
    before_step = io.read_metadata(before)["step"] if before else 0
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "trellis", "train", *BASE, f"--parallel.dp={dp}",
                              f"--checkpoint.dir={ck}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                             start_new_session=True)
        deadline = time.monotonic() + 180
        # Wait until this run has published at least one checkpoint of its own, then kill at random.
        while True:
            latest = io.latest_valid(ck)
            if latest is not None and io.read_metadata(latest)["step"] > before_step:
                break
            if p.poll() is not None or time.monotonic() > deadline:
                os.killpg(p.pid, signal.SIGKILL) if p.poll() is None else None
                p.wait(timeout=30)
                return False, f"run ended (rc={p.returncode}) or stalled before saving", None
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)
    m = LOAD_RE.search(log.read_text())
    load_s = float(m.group(1)) if m else None
    latest = io.latest_valid(ck)
    try:
        meta = io.verify(latest)
    except Exception as e:  # noqa: BLE001 - report, don't stop the benchmark
        return False, f"newest checkpoint invalid: {e}", load_s
    if meta["step"] < before_step:
        return False, f"went back from step {before_step} to {meta['step']}", load_s
    return True, "", load_s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from trellis.engine.checkpoint import io

    rng = random.Random(args.seed)
    ok, loads, failures = 0, [], []
    with tempfile.TemporaryDirectory() as d:
        ck = Path(d) / "ck"
        for i in range(args.trials):
            good, why, load_s = trial(ck, args.dp, rng, Path(d) / "stderr.txt")
            ok += good
            if load_s is not None:
                loads.append(load_s)
            if not good:
                failures.append(f"trial {i}: {why}")
            print(f"trial {i + 1}/{args.trials}: {'ok' if good else 'FAILED ' + why}", flush=True)
        latest = io.latest_valid(ck)
        meta = io.read_metadata(latest)
        writes = [io.read_metadata(p)["write_s"] for _, p, m in io.list_checkpoints(ck) if m and "write_s" in m]
        per_rank = {}
        for rel, info in meta["files"].items():
            # DCP names shard files __<rank>_<n>.distcp; everything else is rank 0's (metadata, JSON, its RNG).
            m = re.match(r"state/__(\d+)_\d+\.distcp$", rel) or re.match(r"rng/rank(\d+)\.", rel)
            r = int(m.group(1)) if m else 0
            per_rank[r] = per_rank.get(r, 0) + info["bytes"]
    print(f"{ok}/{args.trials} resumed cleanly (dp={args.dp}, reached step {meta['step']})")
    for f in failures:
        print("  " + f)
    if writes:
        print(f"save (all ranks' shards written): median {statistics.median(writes):.3f}s over {len(writes)} kept checkpoints")
    if loads:
        print(f"load (verify + DCP load + trainer state): median {statistics.median(loads):.3f}s over {len(loads)} resumes")
    print("bytes per rank: " + ", ".join(f"rank{r} {b / 1e6:.2f} MB" for r, b in sorted(per_rank.items())))
    return 0 if ok == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
