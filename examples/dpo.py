"""DPO on your own preference pairs with LoRA, from your own loop (the same class `trellis train` runs for
train.objective = "dpo").

    python examples/dpo.py                                     # writes a toy pairs.jsonl, one process
    python examples/dpo.py --data.path=my_pairs.jsonl --train.steps=100
    trellis launch --launcher torchrun --nproc-per-node 2 examples/dpo.py --parallel.tp=2

A pair is {"prompt": ..., "chosen": ..., "rejected": ...}. The reference log-probs come from the same model with
its adapters switched off (no second copy of the base); with LoRA's B = 0 the first step's loss is ln 2.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import trellis


def toy_pairs(path: Path, n: int = 64) -> Path:
    rng = random.Random(0)
    words = "the a cat dog ran far away quick brown fox jumps over lazy hello world".split()
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
            f.write(json.dumps({"prompt": prompt + "?", "chosen": " yes " + prompt,
                                "rejected": " " + " ".join(rng.choice(words) for _ in range(4))}) + "\n")
    return path


def main(argv: list[str]) -> None:
    if not any(a.startswith("--data.path") for a in argv):
        argv = [f"--data.path={toy_pairs(Path(tempfile.mkdtemp()) / 'pairs.jsonl')}", *argv]
    cfg = trellis.load_config("tiny-llama", ["--parallel.dp=-1", "--train.steps=3", "--data.seq_len=32",
                                             "--data.type=preference", "--train.objective=dpo", "--peft.method=lora",
                                             "--train.lr=1e-3", "--logging.progress=none", *argv])
    engine = trellis.initialize(cfg)
    dpo = trellis.DPO(engine)  # reference: the same model with adapters disabled (PEFT), beta = train.dpo_beta
    for micro_batches in engine.batches():  # mb pairs per micro-batch: the chosen rows, then the rejected rows
        res = dpo.train_step(micro_batches)
        if engine.is_main:
            print(f"step {engine.step} loss {res.step.loss:.6f} reward_margin {res.reward_margin:.5f} "
                  f"reward_accuracy {res.reward_accuracy:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
