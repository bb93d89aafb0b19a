"""Benchmark (not a test): checkpoint I/O bandwidth against the disk's, and kill -9 during checkpoint saves.

Bandwidth (`--pairs`, default 7): a ~10 M-parameter Llama with AdamW state (get_state_dict, flattened optimizer
state: what the native backend saves) written with trellis' DCP writer (one raw file per rank, hashed while
written) and loaded back verifying every file's sha256 from the bytes read, alternated with
`dd if=/dev/zero of=F bs=1M count=N conv=fdatasync` (N = the checkpoint's MiB) and a read `dd` of that file
(after dropping the page cache when this process may; else both reads are from the cache, and the JSON says
so). A save is timed up to its files fsynced and hashed (what metadata.json needs); a load up to every tensor in
its place and every file verified. The same pairs also time torch's stock path (FileSystemWriter: one
`torch.save` per item, then every file hashed again; load: every file hashed, then FileSystemReader).

Faults (`--trials`, default 50; 0 skips): each trial starts the real `trellis train` CLI (its own process
group) saving every step with `--resume auto`, SIGKILLs the whole group at a random moment, and checks that the
newest valid checkpoint passes every checksum and is not older than the previous trial's. The next trial
resumes from it, so a resume that fails shows up as a non-zero exit / no progress.

    .venv/bin/python bench/checkpoint_faults.py [--pairs 7] [--trials 50] [--dp 2] [--seed 0] [--json]

`--json`: the last line is {"save_bw_ratio": median, "load_bw_ratio": median, "save_bw_ratio_min_median_max":
[...], ..., "checkpoint_bytes": n, "read_cache": "dropped" | "cached", "fault_trials": ..., "fault_ok": ...}.
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


def min_median_max(xs: list[float]) -> list[float]:
    return [min(xs), statistics.median(xs), max(xs)]


def bandwidth_ratios(ours_s: list[float], disk_s: list[float]) -> list[float]:
    """Per alternated pair: our bandwidth / the disk's for the same bytes = disk time / our time."""
    return [d / o for o, d in zip(ours_s, disk_s, strict=True)]


def _dd_seconds(text: str) -> float:
    m = re.search(r"copied, ([0-9.eE+-]+) s", text)
    if not m:
        raise RuntimeError(f"cannot read dd's time from {text!r}")
    return float(m.group(1))


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _bench_state():
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=320, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.randint(0, 512, (1, 16)), labels=torch.randint(0, 512, (1, 16))).loss.backward()
    opt.step()
    msd, osd = get_state_dict(model, [opt], options=StateDictOptions(flatten_optimizer_state_dict=True))
    return {"model": msd, "optim": osd}, sum(p.numel() for p in model.parameters())


def bandwidth(pairs: int, work: Path) -> dict:
    import shutil
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    from trellis.engine.checkpoint import io
    from trellis.engine.checkpoint.safe_load import SafeLoadPlanner
    from trellis.engine.checkpoint.storage import TrellisReader, TrellisWriter, empty_copy

    warnings.filterwarnings("ignore")
    state, n_params = _bench_state()
    rows: dict[str, list[float]] = {k: [] for k in ("dd_w", "dd_r", "save", "load", "stock_save", "stock_load")}
    dropped = True
    nbytes = 0
    for i in range(pairs):
        for kind in ("dd", "trellis", "stock") if i % 2 == 0 else ("stock", "trellis", "dd"):
            d = work / kind
            shutil.rmtree(d, ignore_errors=True)
            if kind == "dd":
                d.mkdir()
                count = max(1, round(nbytes / 2**20)) if nbytes else 128
                w = subprocess.run(["dd", "if=/dev/zero", f"of={d / 'F'}", "bs=1M", f"count={count}",
                                    "conv=fdatasync"], capture_output=True, text=True, check=True)
                dropped &= _drop_caches()
                r = subprocess.run(["dd", f"if={d / 'F'}", "of=/dev/null", "bs=1M"], capture_output=True, text=True,
                                   check=True)
                # dd's count is whole MiB: scale its times to the checkpoint's exact bytes
                scale = nbytes / (count * 2**20) if nbytes else 1.0
                rows["dd_w"].append(_dd_seconds(w.stderr) * scale)
                rows["dd_r"].append(_dd_seconds(r.stderr) * scale)
                continue
            t0 = time.perf_counter()
            if kind == "trellis":
                writer = TrellisWriter(str(d))
                dcp.save(state, storage_writer=writer, no_dist=True)
                expected = {k: v[0] for k, v in writer.file_hashes.items()}
            else:
                dcp.save(state, storage_writer=FileSystemWriter(str(d)), no_dist=True)
                expected = {p.name: io.sha256(p) for p in d.iterdir()}  # the old publish: hash every file again
            t_save = time.perf_counter() - t0
            nbytes = sum(p.stat().st_size for p in d.iterdir())
            dropped &= _drop_caches()
            target = empty_copy(state)
            t0 = time.perf_counter()
            if kind == "trellis":
                dcp.load(target, storage_reader=TrellisReader(str(d), expected), planner=SafeLoadPlanner(),
                         no_dist=True)
            else:
                for p in d.iterdir():  # the old resume: verify every file, then load
                    assert io.sha256(p) == expected[p.name]
                dcp.load(target, storage_reader=FileSystemReader(str(d)), no_dist=True)
            t_load = time.perf_counter() - t0
            rows["save" if kind == "trellis" else "stock_save"].append(t_save)
            rows["load" if kind == "trellis" else "stock_load"].append(t_load)
    out = {"save_bw_ratio": statistics.median(bandwidth_ratios(rows["save"], rows["dd_w"])),
           "load_bw_ratio": statistics.median(bandwidth_ratios(rows["load"], rows["dd_r"])),
           "save_bw_ratio_min_median_max": min_median_max(bandwidth_ratios(rows["save"], rows["dd_w"])),
           "load_bw_ratio_min_median_max": min_median_max(bandwidth_ratios(rows["load"], rows["dd_r"])),
           "stock_save_bw_ratio_min_median_max": min_median_max(bandwidth_ratios(rows["stock_save"], rows["dd_w"])),
           "stock_load_bw_ratio_min_median_max": min_median_max(bandwidth_ratios(rows["stock_load"], rows["dd_r"])),
           "disk_write_MBps_median": nbytes / statistics.median(rows["dd_w"]) / 1e6,
           "disk_read_MBps_median": nbytes / statistics.median(rows["dd_r"]) / 1e6,
           "checkpoint_bytes": nbytes, "params": n_params, "pairs": pairs,
           "read_cache": "dropped" if dropped else "cached"}
    for k in ("save_bw_ratio_min_median_max", "load_bw_ratio_min_median_max", "stock_save_bw_ratio_min_median_max",
              "stock_load_bw_ratio_min_median_max"):
        print(f"{k[:-15]}: min {out[k][0]:.2f} / median {out[k][1]:.2f} / max {out[k][2]:.2f} of the disk's")
    print(f"checkpoint {nbytes / 1e6:.1f} MB ({n_params / 1e6:.1f} M params + AdamW), disk write "
          f"{out['disk_write_MBps_median']:.0f} MB/s, read {out['disk_read_MBps_median']:.0f} MB/s "
          f"({out['read_cache']}), {pairs} alternated pairs")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import json

    from trellis.engine.checkpoint import io

    result: dict = {}
    if args.pairs:
        with tempfile.TemporaryDirectory(dir=REPO / "bench") as d:  # on the disk the checkpoints go to
            result.update(bandwidth(args.pairs, Path(d)))
    if not args.trials:
        if args.json:
            print(json.dumps(result))
        return 0

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
    result.update({"fault_trials": args.trials, "fault_ok": ok})
    if args.json:
        print(json.dumps(result))
    return 0 if ok == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
