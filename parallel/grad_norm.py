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


@torch.no_grad()
def owned_grad_sq(params: list[torch.nn.Parameter], coordinate: dict[str, int],
                  exclude: set[int] | None = None) -> torch.Tensor | None:
    """This rank's share of the squared global gradient norm, such that the SUM over the world is the squared
    norm: each distinct gradient element is counted by exactly one rank. A gradient replicated along a mesh
    axis (a Replicate placement of its DTensor mesh, or an axis of the world outside that mesh, e.g. a
    ZeRO-0/1 gradient replicated over dp, a norm weight replicated over tp) is counted by the rank at
    coordinate 0 of that axis; sharded pieces are counted by their holders; pipeline stages hold different
    parameters (`exclude`: tied copies counted on another stage). `coordinate`: this rank's position on
    every axis the world is split along except pp (e.g. {"dp": 1, "tp": 0}). A float64 tensor on the
    gradients' device (no host sync), or None when a gradient is a Partial DTensor (not yet reduced: use
    total_grad_norm)."""
    from torch.distributed.tensor import Replicate, Shard

    sq = None
    for p in params:
        if p.grad is None or (exclude and id(p) in exclude):
            continue
        g = p.grad
        owner = True
        if isinstance(g, DTensor):
            names = g.device_mesh.mesh_dim_names or ()
            # a flattened axis ("dp_cp": FSDP2 over dp x cp) covers each of its parts
            covered = {part for n in names for part in n.split("_")}
            if any(n not in coordinate and n != "pp" for n in covered):
                return None  # a mesh axis this function does not know the replication of
            coord = g.device_mesh.get_coordinate() or []
            for i, pl in enumerate(g.placements):
                if isinstance(pl, Replicate):
                    owner = owner and coord[i] == 0
                elif not isinstance(pl, Shard):
                    return None  # Partial: the local pieces' squares do not add up to the norm
            outside = [a for a in coordinate if a not in covered]
            g = g.to_local()
        else:
            outside = list(coordinate)
        owner = owner and all(coordinate[a] == 0 for a in outside)
        if not owner:
            continue
        n = torch.linalg.vector_norm(g, dtype=torch.float32).double() ** 2
        sq = n if sq is None else sq + n
    if sq is None:
        dev = params[0].device if params else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float64, device=dev if dev.type != "meta" else "cpu")
    return sq
