"""Benchmark (not a test): random faults on real dp2 / dp4 `trellis train` runs, counted per fault kind.

Each trial starts the real CLI (its own process group) on a fresh checkpoint directory, injects one fault and
checks what a cluster user relies on:

- the exit code is the documented one (trellis/exit_codes.py) and no `Traceback` reaches the user;
- no process of the trial is left alive afterwards (no orphan) and nothing hangs (a hard timeout);
- no `step-N.tmp` is left and every `step-N` left verifies;
- where the fault leaves a checkpoint, `--resume auto` finishes the run and its losses equal an uninterrupted
  run's, bit for bit (fp32), and the steps lost are at most those since the last checkpoint.

Fault kinds: kill -9 of one rank, kill -9 of the parent, SIGTERM to the parent, SIGSTOP of one rank (a hung
peer: the collective timeout ends the job), the disk filling during a save (a real tmpfs, root only), a
corrupted shard of the newest checkpoint, a second run on the same directory, and a diverging run (a huge
learning rate: non-finite loss). Every run's exit code is tallied too (the exit-134 teardown race shows up
there).

    .venv/bin/python bench/chaos.py [--trials 60] [--seed 0] [--kinds kill_rank,term_parent,...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STEPS = 12
BASE = ["tiny-llama", "--data.seq_len=32", "--train.micro_batch_size=2", "--logging.progress=none",
        f"--train.steps={STEPS}", "--train.schedule=constant", "--checkpoint.interval=3", "--parallel.timeout_s=20"]
KINDS = ("kill_rank", "kill_parent", "term_parent", "stop_rank", "disk_full", "corrupt", "second_run", "diverge")
EXIT_CODES: collections.Counter = collections.Counter()


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trellis", "train", *BASE, *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def finish(p: subprocess.Popen, timeout: float = 180.0) -> tuple[int | None, str, float]:
    t0 = time.monotonic()
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        return None, err, time.monotonic() - t0  # a hang
    EXIT_CODES[p.returncode] += 1
    return p.returncode, err, time.monotonic() - t0


def losses(path: Path) -> dict[int, float]:
    if not path.exists():
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def wait_for_step(m: Path, step: int, p: subprocess.Popen, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        if max(losses(m), default=0) >= step:
            return True
        time.sleep(0.05)
    return False


def ranks_of(p: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [c for c in psutil.Process(p.pid).children(recursive=True) if "trellis" in " ".join(c.cmdline())]
    except psutil.NoSuchProcess:
        return []


def orphans(marker: str) -> list[int]:
    """Live processes whose command line names this trial's directory."""
    out = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in a for a in proc.info["cmdline"] or []) and proc.pid != os.getpid():
                out.append(proc.pid)
        except psutil.Error:
            continue
    return out


def checkpoints_ok(ck: Path, tmp_allowed: bool) -> tuple[bool, int]:
    """Every step-N verifies. A step-N.tmp may stay behind a process killed mid-save (ignored, removed by the next
    save); after a save error it must be gone."""
    from trellis.engine.checkpoint import io
    from trellis.errors import CheckpointError

    if list(ck.glob("step-*.tmp")) and not tmp_allowed:
        return False, -1
    newest = -1
    for step, path, meta in io.list_checkpoints(ck):
        try:
            io.verify(path, meta)
        except CheckpointError:
            return False, -1
        newest = max(newest, step)
    return True, newest


def resume_equal(work: Path, ck: Path, dp: int, ref: dict[int, float], start_after: int) -> tuple[bool, int]:
    m = work / "resumed.jsonl"
    rc, err, _ = finish(cli(f"--parallel.dp={dp}", f"--checkpoint.dir={ck}", "--resume=auto",
                            f"--logging.metrics_file={m}"))
    got = losses(m)
    ok = rc == 0 and sorted(got) == list(range(start_after + 1, STEPS + 1)) and all(got[s] == ref[s] for s in got)
    return ok, rc


def trial(kind: str, dp: int, rng: random.Random, ref: dict[int, float], root: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=root))
    ck, m = work / "ck", work / "m.jsonl"
    mount = None
    args = [f"--parallel.dp={dp}", f"--checkpoint.dir={ck}", f"--logging.metrics_file={m}"]
    res = {"kind": kind, "dp": dp, "handled": False, "exit_s": None, "steps_lost": None, "resume_equal": None}
    if kind == "disk_full":
        if os.geteuid() != 0:
            res["skipped"] = "needs root for a tmpfs"
            return res
        ck.mkdir()
        mount = ck
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={rng.choice([1, 5])}M", "tmpfs", str(ck)], check=True)
    if kind == "diverge":
        args.append("--train.lr=1e9")
    if kind == "second_run":
        first = cli(*args, "--train.steps=100000")  # still training while the second one starts
        wait_for_step(m, 1, first)
        rc, err, dt = finish(cli(f"--parallel.dp={dp}", f"--checkpoint.dir={ck}",
                                 f"--logging.metrics_file={work / 'm2.jsonl'}"))
        alive = first.poll() is None
        os.kill(first.pid, signal.SIGTERM)  # the holder stops cleanly (exit 75 after its final save)
        rc1, _, _ = finish(first)
        res.update(exit_s=dt, handled=rc == 2 and "in use by another run" in err and alive and rc1 == 75
                   and "Traceback" not in err, exit_code=rc)
        return _close(res, work, mount)
    p = cli(*args)
    at = rng.randint(2, STEPS - 2)
    if kind in ("kill_rank", "kill_parent", "term_parent", "stop_rank") and not wait_for_step(m, at, p):
        res["note"] = "finished or failed before the fault"
    t_fault = time.monotonic()
    if kind == "kill_rank" and ranks_of(p):
        rng.choice(ranks_of(p)).send_signal(signal.SIGKILL)
    elif kind == "kill_parent":
        os.kill(p.pid, signal.SIGKILL)
    elif kind == "term_parent":
        os.kill(p.pid, signal.SIGTERM)
    elif kind == "stop_rank" and ranks_of(p):
        rng.choice(ranks_of(p)).send_signal(signal.SIGSTOP)
    rc, err, _ = finish(p)
    if kind == "kill_parent":  # the parent is gone at once; its ranks must follow (parent-death signal)
        deadline = time.monotonic() + 60
        while orphans(str(work)) and time.monotonic() < deadline:
            time.sleep(0.1)
    res["exit_s"] = round(time.monotonic() - t_fault, 2)
    res["exit_code"] = rc
    ok_ck, newest = checkpoints_ok(ck, tmp_allowed=kind in ("kill_rank", "kill_parent", "stop_rank"))
    logged = max(losses(m), default=0)
    expected = {"kill_rank": (1, 137, -9), "kill_parent": (-9,), "term_parent": (75,), "stop_rank": (1,),
                "disk_full": (1,), "corrupt": (0,), "diverge": (1,)}[kind]
    why = [w for w, bad in (("exit code", rc not in expected), ("checkpoints", not ok_ck),
                            ("traceback", "Traceback" in err)) if bad]
    handled = not why
    if kind == "corrupt" and rc == 0:
        # damage the newest checkpoint; --resume auto must skip it, say so, and continue from an older one
        from trellis.engine.checkpoint import io

        rows = [path for _, path, meta in io.list_checkpoints(ck) if meta]
        shard = next((rows[-1] / "state").glob("*.distcp"))
        data = bytearray(shard.read_bytes())
        data[rng.randrange(len(data))] ^= 0xFF
        shard.write_bytes(bytes(data))
        r = subprocess.run([sys.executable, "-m", "trellis", "train", *BASE, f"--parallel.dp={dp}",
                            f"--checkpoint.dir={ck}", "--resume=auto", f"--train.steps={STEPS + 3}",
                            f"--logging.metrics_file={work / 'm3.jsonl'}"], cwd=REPO, capture_output=True, text=True,
                           timeout=180)
        EXIT_CODES[r.returncode] += 1
        handled = r.returncode == 0 and f"skipped {rows[-1].name}" in r.stderr
    if kind == "diverge":
        handled = handled and "inf/nan" in err
    if kind == "disk_full":
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        handled = handled and len(lines) == 1 and "No space left" in lines[0]
    if kind in ("kill_rank", "kill_parent", "term_parent", "stop_rank") and handled:
        start = newest if newest > 0 else 0
        res["steps_lost"] = max(logged - start, 0)
        eq, _ = resume_equal(work, ck, dp, ref, start) if start < STEPS else (True, 0)
        res["resume_equal"] = eq
        handled = eq
    res["handled"] = handled and not orphans(str(work))
    if not res["handled"]:
        res["why"] = why or ["resume or fault-specific check"]
        i = err.find("Traceback")
        res["stderr"] = err[i:i + 1500] if i >= 0 else err[-600:]
    return _close(res, work, mount)


def _close(res: dict, work: Path, mount: Path | None) -> dict:
    leftover = orphans(str(work))
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leftover:
        res["handled"] = False
        res["orphans"] = len(leftover)
    if mount is not None:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--json", help="write every trial's record here")
    a = ap.parse_args()
    kinds = a.kinds.split(",")
    rng = random.Random(a.seed)
    root = Path(tempfile.mkdtemp(prefix="trellis-chaos-"))
    refs = {}
    for dp in (2, 4):  # uninterrupted references (no checkpoint dir, same data order)
        m = root / f"ref{dp}.jsonl"
        rc, err, _ = finish(cli(f"--parallel.dp={dp}", f"--logging.metrics_file={m}",
                                "--checkpoint.interval=0"))
        assert rc == 0, err[-2000:]
        refs[dp] = losses(m)
    records = []
    for i in range(a.trials):
        kind, dp = kinds[i % len(kinds)], rng.choice([2, 4])
        rec = trial(kind, dp, rng, refs[dp], root)
        records.append(rec)
        print(json.dumps(rec), flush=True)
    print(f"\n{'fault':<12} {'handled':>9} {'exit s (med)':>13} {'steps lost (max)':>17} {'resume equal':>13}")
    for kind in kinds:
        rs = [r for r in records if r["kind"] == kind and "skipped" not in r]
        if not rs:
            continue
        ex = [r["exit_s"] for r in rs if r["exit_s"] is not None]
        lost = [r["steps_lost"] for r in rs if r["steps_lost"] is not None]
        eq = [r["resume_equal"] for r in rs if r["resume_equal"] is not None]
        print(f"{kind:<12} {sum(r['handled'] for r in rs):>4}/{len(rs):<4} "
              f"{statistics.median(ex) if ex else float('nan'):>13.2f} {max(lost) if lost else '-':>17} "
              f"{f'{sum(eq)}/{len(eq)}' if eq else '-':>13}")
    print(f"\nexit codes over all {sum(EXIT_CODES.values())} runs: {dict(sorted(EXIT_CODES.items(), key=str))}")
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r["handled"] for r in records if "skipped" not in r) else 1


if __name__ == "__main__":
    sys.exit(main())
