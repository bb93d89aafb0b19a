"""Benchmark (not a test): prepared corpora (engine/data/corpus.py).

1. Preparation throughput (MB/s of source text, tokens/s) of `prepare` against the `tokenizers` library's own
   `encode_batch` over the same records in the same number of processes (goal: ratio >= 0.8).
2. `trellis train` on a prepared corpus of each size: seconds from start to the first step's progress line and
   the rank's peak RSS (goal: flat, <= 1.2x from the smallest to the largest corpus).

A and B alternate `--repeats` times; min / median / max are printed.

    .venv/bin/python bench/data_prepare.py [--mb 4] [--procs 2] [--repeats 3] [--sizes 1,10,100]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the a cat dog ran far away quick brown fox jumps over lazy hello world again and of to in is it that "
         "for on with as was by at be this from or an are not have but they which one you were all her she").split()


def write_records(path: Path, mb: float, seed: int = 0) -> None:
    """JSONL text records of 20..200 words, `mb` MB in all."""
    import numpy as np

    rng = np.random.default_rng(seed)
    target, size = int(mb * 1e6), 0
    with open(path, "w") as f:
        while size < target:
            line = json.dumps({"text": " ".join(rng.choice(WORDS, size=int(rng.integers(20, 200))))}) + "\n"
            f.write(line)
            size += len(line)


def _cfg(path: Path):
    from trellis import configs

    return configs.load("tiny-llama", {"data.path": str(path)})


def _tokenizer():
    from trellis.engine.tokenizer import load_tokenizer, shipped_tokenizer_path

    return load_tokenizer(str(shipped_tokenizer_path()))


_TOK = {}


def _encode(texts: list[str]) -> int:
    return sum(len(e.ids) for e in _TOK["t"].encode_batch(texts, add_special_tokens=False))


def _init(tok) -> None:
    _TOK["t"] = tok


def tokenizers_baseline(src: Path, procs: int) -> tuple[float, int]:
    """The same records, read and split into the same chunks, through tokenizers' encode_batch in `procs`
    forked processes (the raw library: no masks, no shards)."""
    from trellis.engine.data import corpus

    t0 = time.perf_counter()
    texts = [json.loads(line)["text"] for line in src.read_text().splitlines()]
    chunks = [texts[i:i + corpus._CHUNK_RECORDS] for i in range(0, len(texts), corpus._CHUNK_RECORDS)]
    with multiprocessing.get_context("fork").Pool(procs, _init, (_tokenizer().backend_tokenizer,)) as pool:
        n = sum(pool.imap(_encode, chunks))
    return time.perf_counter() - t0, n


def trellis_prepare(src: Path, procs: int, out: Path) -> tuple[float, int]:
    from trellis.engine.data import prepare

    t0 = time.perf_counter()
    c = prepare(_cfg(src).data, _tokenizer(), out, procs)
    return time.perf_counter() - t0, c.manifest["counts"]["tokens"]


def _poll_anon(pid: int, out: list[int], stop: threading.Event) -> None:
    """Peak RssAnon (private memory, KiB) of `pid`: ru_maxrss also counts the mapped corpus pages, which are
    shared, reclaimable page cache (the kernel maps up to 2 MB of cached file around each row read)."""
    while not stop.is_set():
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("RssAnon"):
                    out[0] = max(out[0], int(line.split()[1]))
        except OSError:
            return
        time.sleep(0.02)


def first_step(prepared: Path, steps: int = 3) -> tuple[float, float, float]:
    """(seconds from `trellis train` start to its first step's line, the rank's peak RSS and peak private
    (anonymous) RSS in MB); one rank."""
    cmd = [sys.executable, "-m", "trellis", "train", "tiny-llama", f"--data.path={prepared}", "--parallel.dp=1",
           f"--train.steps={steps}", "--data.seq_len=128", "--logging.progress=plain",
           f"--logging.metrics_file={prepared.parent / 'm.jsonl'}"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    anon, stop = [0], threading.Event()
    poller = threading.Thread(target=_poll_anon, args=(p.pid, anon, stop), daemon=True)
    poller.start()
    t_first = None
    for line in p.stderr:
        if t_first is None and line.startswith("step 1/"):
            t_first = time.perf_counter() - t0
    stop.set()
    poller.join()
    _, status, usage = os.wait4(p.pid, 0)  # this child's own peak RSS (one rank: dp=1 trains in-process)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode or t_first is None:
        raise SystemExit(f"trellis train failed ({p.returncode})")
    return t_first, usage.ru_maxrss / 1024, anon[0] / 1024


def _stats(xs: list[float]) -> str:
    return f"{min(xs):8.2f} {statistics.median(xs):8.2f} {max(xs):8.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=4.0, help="text for the throughput comparison")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="1,10,100", help="MB of prepared text for the start-up table")
    args = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        src = d / "records.jsonl"
        write_records(src, args.mb)
        mb = src.stat().st_size / 1e6
        a_mbs, b_mbs, ratios, a_tps = [], [], [], []
        for r in range(args.repeats):
            ta, na = trellis_prepare(src, args.procs, d / f"prep{r}")
            tb, nb = tokenizers_baseline(src, args.procs)
            a_mbs.append(mb / ta)
            b_mbs.append(mb / tb)
            a_tps.append(na / ta / 1e6)
            ratios.append(tb / ta)
        print(f"preparation of {mb:.1f} MB ({na} tokens), {args.procs} processes, {args.repeats} repeats "
              "(min median max)")
        print(f"  trellis prepare     MB/s {_stats(a_mbs)}   Mtokens/s {_stats(a_tps)}")
        print(f"  tokenizers batch    MB/s {_stats(b_mbs)}")
        print(f"  ratio trellis/tokenizers {_stats(ratios)}   (goal >= 0.8)")
        print("\nstart-up on a prepared corpus: trellis train to its first step, one rank (min median max)")
        print("| prepared text | tokens | s to first step | peak RSS MB | peak private (RssAnon) MB |")
        print("|---|---|---|---|---|")
        for size in (float(s) for s in args.sizes.split(",")):
            s_src = d / f"s{size:g}.jsonl"
            write_records(s_src, size, seed=1)
            prepared = d / f"s{size:g}"
            trellis_prepare(s_src, max(args.procs, os.cpu_count() or 1), prepared)
            runs = [first_step(prepared) for _ in range(args.repeats)]
            toks = json.loads((prepared / "manifest.json").read_text())["counts"]["tokens"]
            print(f"| {size:g} MB | {toks} | {_stats([r[0] for r in runs])} | {_stats([r[1] for r in runs])} | "
                  f"{_stats([r[2] for r in runs])} |")


if __name__ == "__main__":
    main()
