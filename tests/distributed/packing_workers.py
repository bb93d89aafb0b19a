"""Spawned-rank worker of the document-packing layout tests: hand-built packed global batches fed to the backend."""

from __future__ import annotations


def packed_train(rank: int, world: int, scenarios: list[dict]) -> list[list[float]]:
    """Per scenario: the step losses of 3 `backend.train_step` calls on the packed batches of
    tests/support/packing.global_batches (this rank's dp share of each global batch)."""
    from tests.support.packing import global_batches
    from trellis import configs
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import Trainer

    ctx = init_distributed(120.0)
    out = []
    for sc in scenarios:
        cfg = configs.load(sc.get("config", "tiny-llama"), dict(sc["overrides"]))
        trainer = Trainer(cfg, ctx)
        vocab = trainer.hf_config.vocab_size  # (a StageUnion of two virtual stages has no .config)
        accum, dp_rank = cfg.train.grad_accum, trainer.dims.coordinate()["dp"]
        losses = []
        for step in global_batches(cfg, vocab, sc.get("steps", 3), pad=sc.get("pad", False)):
            mine = [b for b, _ in step[dp_rank * accum:(dp_rank + 1) * accum]]
            losses.append(trainer.backend.train_step(mine, cfg.train.lr).loss)
        out.append(losses)
    return out
