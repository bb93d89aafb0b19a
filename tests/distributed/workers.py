"""Functions that run inside spawned ranks (importable by the spawn start method)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed


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
        # cpu_offload=True would leave non-zero ranks empty; every pipeline stage must report its part.
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
        full = {k: v.detach().cpu().clone() for k, v in full.items()}
        # Pipeline stages hold different parameters: merge every rank's full state on rank 0.
        parts = [None] * world
        torch.distributed.all_gather_object(parts, full if trainer.dims.pp > 1 else {})
        if trainer.dims.pp > 1:
            full = {}
            for part in parts:
                full.update(part)
        dtypes = {n: str(p.dtype) for n, p in module.named_parameters()}
        out.append({"records": losses, "state": full if rank == 0 else None,
                    "summary": summary, "param_dtypes": dtypes, "memory": trainer.backend.memory_report()})
    return out


def train_outcomes(rank: int, world: int, scenarios: list[dict]) -> list[dict]:
    """Per scenario: the UserError messages training stopped with, or the summary and the checkpoint steps
    saved. `signal_at_step: N` sends this process SIGUSR1 during step N (a job scheduler's warning)."""
    import os
    import signal

    from trellis import configs
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import Trainer
    from trellis.errors import UserError

    ctx = init_distributed(120.0)
    out = []
    for sc in scenarios:
        try:
            cfg = configs.load(sc.get("config", "tiny-llama"), dict(sc["overrides"]))
            trainer = Trainer(cfg, ctx)
            at = sc.get("signal_at_step")
            if at:
                inner = trainer.backend.train_step

                def step(batches, lr, inner=inner, at=at, trainer=trainer, **kw):
                    if trainer.step + 1 == at:
                        os.kill(os.getpid(), signal.SIGUSR1)
                    return inner(batches, lr, **kw)

                trainer.backend.train_step = step
            summary = trainer.train()
        except UserError as e:
            out.append({"error": e.messages})
            continue
        root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
        saved = sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if p.is_dir()) if root and root.is_dir() else []
        out.append({"summary": summary, "saved": saved})
    return out


def poison_grad_on_rank1(steps: set[int], value: float):
    """A Trainer hook: on rank 1 only, replace one 2-D trainable parameter's gradient by `value` (inf / nan) in the
    backward of the given optimizer steps (1-based; every micro-batch of those steps)."""
    def install(trainer, rank):
        if rank != 1:
            return
        calls = {"n": 0}
        p = next(p for _, p in trainer.backend.trainable_named_parameters() if p.ndim == 2)
        ga = trainer.cfg.train.grad_accum

        def hook(g):
            calls["n"] += 1
            return torch.full_like(g, value) if (calls["n"] - 1) // ga + 1 in steps else g

        p.register_hook(hook)
    return install
