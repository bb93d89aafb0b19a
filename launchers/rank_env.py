"""Which rank am I? Read from whichever launcher started this process.

Order of precedence: torchrun / deepspeed launcher / trellis' own spawner (RANK, WORLD_SIZE, ...),
Open MPI (OMPI_COMM_WORLD_*), MPICH/Hydra (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID), Slurm srun
(SLURM_PROCID, SLURM_NTASKS, ...). For MPI the rendezvous address is not in the environment:
`share_master_addr_via_mpi` broadcasts rank 0's address and a free port with mpi4py.
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace

from .base import DEFAULT_PORT


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int
    source: str  # torchrun | openmpi | mpich | slurm


def rank_env(environ: Mapping[str, str]) -> RankEnv | None:
    e = environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return RankEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)),
                       int(e.get("LOCAL_WORLD_SIZE", 1)), e.get("MASTER_ADDR", "127.0.0.1"),
                       int(e.get("MASTER_PORT", DEFAULT_PORT)), "torchrun")
    if "OMPI_COMM_WORLD_RANK" in e:
        return RankEnv(int(e["OMPI_COMM_WORLD_RANK"]), int(e["OMPI_COMM_WORLD_SIZE"]),
                       int(e.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), int(e.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1)),
                       e.get("MASTER_ADDR"), int(e.get("MASTER_PORT", 0)), "openmpi")
    if "PMI_RANK" in e and "PMI_SIZE" in e:
        return RankEnv(int(e["PMI_RANK"]), int(e["PMI_SIZE"]), int(e.get("MPI_LOCALRANKID", 0)),
                       int(e.get("MPI_LOCALNRANKS", 1)), e.get("MASTER_ADDR"), int(e.get("MASTER_PORT", 0)), "mpich")
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e and "SLURM_STEP_ID" in e:
        nodes = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        first = expand_hostlist(nodes)[0]
        job = int(e.get("SLURM_JOB_ID", "0"))
        port = int(e.get("MASTER_PORT", 20000 + job % 20000))
        return RankEnv(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)),
                       _tasks_on_this_node(e), e.get("MASTER_ADDR") or resolve(first), port, "slurm")
    return None


def _tasks_on_this_node(e: Mapping[str, str]) -> int:
    raw = e.get("SLURM_STEP_TASKS_PER_NODE") or e.get("SLURM_TASKS_PER_NODE") or "1"
    node = int(e.get("SLURM_NODEID", 0))
    counts: list[int] = []
    for part in raw.split(","):  # "2(x3),1" = 2,2,2,1
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts[node] if node < len(counts) else (counts[-1] if counts else 1)


def expand_hostlist(hostlist: str) -> list[str]:
    """'n[1-3,5],gpu7' -> ['n1', 'n2', 'n3', 'n5', 'gpu7'] (Slurm's compressed host lists)."""
    out: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", hostlist):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            out.append(prefix)
            continue
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-")
                out.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
            else:
                out.append(prefix + r)
    return out


def resolve(host: str) -> str:
    """An address every node can reach: Slurm's NodeAddr, then DNS, else the name itself."""
    try:
        out = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"NodeAddr=(\S+)", out)
        if m:
            return m.group(1)
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def share_master_addr_via_mpi(env: RankEnv) -> RankEnv:
    """MPI ranks agree on rank 0's address and a free port (mpi4py broadcast)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    payload = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        payload = (_my_address(), env.master_port or port)
    addr, port = comm.bcast(payload, root=0)
    return replace(env, master_addr=addr, master_port=port)


def _my_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
