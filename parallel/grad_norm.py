"""Gradient-norm clipping that is correct when grads live on different meshes and pipeline stages.

torch's clip_grad_norm_ refuses DTensor grads on different meshes (dp vs dp×tp). We group grads by
(mesh, placements), take each group's norm with DTensor (which reduces over that group's mesh), add
the squares, then all-reduce over the pipeline group because each stage holds different parameters.
Plain-tensor grads are replicated over dp (ZeRO-0/1) and over tp, so they are counted once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def total_grad_norm(params: list[torch.nn.Parameter], pp_group=None, exclude: set[int] | None = None) -> torch.Tensor:
    """L2 norm of all gradients. `exclude`: ids of params counted elsewhere (tied copies on another stage)."""
    groups: dict[object, list[torch.Tensor]] = {}
    plain: list[torch.Tensor] = []
    for p in params:
        if p.grad is None or (exclude and id(p) in exclude):
            continue
        g = p.grad
        if isinstance(g, DTensor):
            groups.setdefault((g.device_mesh, g.placements), []).append(g)
        else:
            plain.append(g)
    sq = torch.zeros((), dtype=torch.float32)
    for gs in groups.values():
        n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in gs]))
        sq = sq + n.full_tensor().float().cpu() ** 2
    if plain:
        sq = sq + sum(torch.linalg.vector_norm(g, dtype=torch.float32).cpu() ** 2 for g in plain)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dev = params[0].device if params else torch.device("cpu")
        t = sq.to(dev if dev.type != "meta" else "cpu")
        dist.all_reduce(t, group=pp_group)
        sq = t.cpu()
    return sq.sqrt()


@torch.no_grad()
def clip_grads_(params: list[torch.nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    if max_norm <= 0:
        return
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0).item()
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
