"""A user training loop with its own loss (label-smoothed cross-entropy) on trellis' engine and data.

    python examples/custom_loss.py                       # one process (world size 1)
    torchrun --nproc-per-node 2 examples/custom_loss.py     # dp = whatever the world size leaves
    python examples/custom_loss.py --parallel.tp=2 ...   # any trellis override after the script

Under tensor parallel this loss gets the full-vocabulary logits (the engine all-gathers them; docs/API.md).
"""

from __future__ import annotations

import sys

import torch

import trellis

SMOOTHING = 0.1


def smoothed_ce(logits: torch.Tensor, batch) -> tuple[torch.Tensor, int]:
    """loss_fn(logits, batch) -> (summed loss, counted tokens); the engine divides by the global count."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = batch.labels != -100
    nll = -logp.gather(-1, batch.labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    per_token = (1 - SMOOTHING) * nll - SMOOTHING * logp.mean(-1)
    return per_token[mask].sum(), int(mask.sum())


def main(argv: list[str]) -> None:
    # dp = -1: whatever the world size leaves (1 process under plain python)
    cfg = trellis.load_config("tiny-llama", ["--parallel.dp=-1", "--train.steps=3", "--data.seq_len=32",
                                             "--logging.progress=none", *argv])
    engine = trellis.initialize(cfg)
    for micro_batches in engine.batches():  # this dp rank's train.grad_accum micro-batches, until train.steps
        res = engine.train_step(micro_batches, loss_fn=smoothed_ce)
        if engine.is_main:
            print(f"step {engine.step} loss {res.loss:.6f} grad_norm {res.grad_norm:.4f} lr {res.lr:.2e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
