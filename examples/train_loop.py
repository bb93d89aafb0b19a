"""The smallest user loop: trellis' data, model, layout and default causal-LM loss, driven from your own script.

    python examples/train_loop.py                                          # one process
    trellis launch --launcher torchrun --nproc-per-node 2 examples/train_loop.py --losses runs/loop.jsonl
    trellis submit --nodes 2 --gpus-per-node 0 examples/train_loop.py --losses runs/loop.jsonl   # Slurm

Everything after the script is the script's: `--losses FILE` (rank 0 writes one {"step", "loss"} JSON line per
step) and any trellis override (`--parallel.tp=2`, `--train.steps=10`, ...). It trains what `trellis train
tiny-llama` with the same overrides trains, step for step.
"""

from __future__ import annotations

import json
import sys

import trellis


def main(argv: list[str]) -> None:
    losses_file = None
    if "--losses" in argv:
        i = argv.index("--losses")
        losses_file, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    # dp = -1: whatever the world size leaves (1 process under plain python, 2 under --nproc-per-node 2)
    cfg = trellis.load_config("tiny-llama", ["--parallel.dp=-1", "--train.steps=3", "--data.seq_len=32",
                                             "--logging.progress=none", *argv])
    engine = trellis.initialize(cfg)
    out = open(losses_file, "w") if losses_file and engine.is_main else None
    for micro_batches in engine.batches():  # this dp rank's micro-batches for the step the engine is at
        res = engine.train_step(micro_batches)
        if engine.is_main:
            print(f"step {engine.step} loss {res.loss:.6f} lr {res.lr:.2e}", flush=True)
            if out:
                out.write(json.dumps({"step": engine.step, "loss": res.loss}) + "\n")
    if out:
        out.close()


if __name__ == "__main__":
    main(sys.argv[1:])
