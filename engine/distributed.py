"""Process-group set-up for one rank: rank/world from whichever launcher started us, timeouts always on."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trellis.launchers.rank_env import rank_env, share_master_addr_via_mpi


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str  # which environment we were started from: torchrun, mpi, slurm, trellis-spawn, single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_rank_env():
    """RankEnv when started by torchrun / deepspeed / mpirun / srun / trellis itself, else None."""
    env = rank_env(os.environ)
    if env is not None and env.master_addr is None:
        env = share_master_addr_via_mpi(env)
    return env


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_s: float) -> DistContext:
    """Initialise the default group (also for a single process, so every code path is the same)."""
    env = launcher_rank_env()
    if env is None:
        rank, world, local_rank, addr, port, source = 0, 1, 0, "127.0.0.1", free_port(), "single"
    else:
        rank, world, local_rank = env.rank, env.world_size, env.local_rank
        addr, port, source = env.master_addr, env.master_port, env.source
    device = pick_device(local_rank)
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, init_method=f"tcp://{addr}:{port}",
                                timeout=timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend,
                       launcher=source)


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (pickled by torch; only our own small Python values)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown(clean: bool = True, destroy: bool = True) -> None:
    """End this rank's part in the group. On a clean exit every rank first meets at a barrier, so no rank
    leaves while a peer still has traffic in flight. destroy=False leaves the group's C++ objects alone for a
    process that ends with os._exit right after (engine/run.py: end_rank_process)."""
    if dist.is_initialized():
        if clean:
            try:
                dist.barrier()
            except RuntimeError:
                pass
        if destroy:
            dist.destroy_process_group()
