"""Functions that run inside spawned ranks (importable by the spawn start method)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def train_scenarios(rank: int, world: int, scenarios: list[dict]) -> list[dict]:
    """Run several trainings in one process group; returns per scenario the losses and gathered weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from trellis import configs
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import Trainer

    ctx = init_distributed(120.0)
    out = []
    for sc in scenarios:
        cfg = configs.load(sc.get("config", "tiny-llama"), dict(sc["overrides"]))
        trainer = Trainer(cfg, ctx)
        hooks = sc.get("hook")
        if hooks:
            hooks(trainer, rank)
        summary = trainer.train()
        losses = []
        if rank == 0 and cfg.logging.metrics_file:
            losses = [json.loads(line) for line in Path(cfg.logging.metrics_file).read_text().splitlines()]
        module = trainer.backend.module
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        dtypes = {n: str(p.dtype) for n, p in module.named_parameters()}
        out.append({"records": losses, "state": {k: v.clone() for k, v in full.items()} if rank == 0 else None,
                    "summary": summary, "param_dtypes": dtypes, "memory": trainer.backend.memory_report()})
    return out
