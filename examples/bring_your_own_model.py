"""Train a Hugging Face model object built in the script (here a small Llama made on the meta device, which
the engine materialises with trellis' seeded init) with trellis' default causal-LM loss.

    python examples/bring_your_own_model.py
    torchrun --nproc-per-node 2 examples/bring_your_own_model.py --parallel.tp=2
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import trellis


def main(argv: list[str]) -> None:
    # dp = -1: whatever the world size leaves (1 process under plain python)
    cfg = trellis.load_config("tiny-llama", ["--parallel.dp=-1", "--train.steps=3", "--data.seq_len=32",
                                             "--logging.progress=none", *argv])
    hf = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.device("meta"):  # no memory until the engine places (and shards) it
        model = AutoModelForCausalLM.from_config(hf)
    engine = trellis.initialize(cfg, model=model)
    for micro_batches in engine.batches():
        res = engine.train_step(micro_batches)
        if engine.is_main:
            print(f"step {engine.step} loss {res.loss:.6f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
