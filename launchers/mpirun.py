"""mpirun, Open MPI or MPICH (Hydra) flavour. Ranks read OMPI_COMM_WORLD_* / PMI_* and agree on rank 0's
address through mpi4py (launchers/rank_env.py), unless --master-addr is given."""

from __future__ import annotations

import os
import re
import subprocess

from .base import LaunchSpec, Launcher


def detect_flavour(binary: str = "mpirun") -> str:
    """'openmpi' or 'mpich' from `mpirun --version`; Open MPI when it cannot be told (the Debian default)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20)
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired):
        return "openmpi"
    if re.search(r"HYDRA|MPICH|Intel\(R\) MPI", text, re.IGNORECASE):
        return "mpich"
    return "openmpi"


class MpirunLauncher(Launcher):
    name = "mpirun"
    binary = "mpirun"
    install_hint = "install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin) and mpi4py (pip install mpi4py)"

    def __init__(self, flavour: str = "openmpi", as_root: bool | None = None):
        if flavour not in ("openmpi", "mpich"):
            raise ValueError(f"unknown MPI flavour {flavour!r}; use openmpi or mpich")
        self.flavour = flavour
        self.as_root = (os.geteuid() == 0) if as_root is None else as_root

    def build_command(self, spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
        env = dict(spec.env)
        if spec.master_addr:
            env["MASTER_ADDR"] = spec.master_addr
        if spec.master_port:
            env["MASTER_PORT"] = str(spec.master_port)
        total = spec.nnodes * spec.nproc_per_node
        if self.flavour == "openmpi":
            argv = ["mpirun"]
            if self.as_root:
                argv.append("--allow-run-as-root")  # Open MPI refuses root without it (containers)
            # --oversubscribe: more ranks than cores is fine for CPU tests; --bind-to none: torch runs its own
            # thread pool per rank, pinning each rank to one core would starve it.
            argv += ["--oversubscribe", "--bind-to", "none", "-np", str(total)]
            if spec.hostfile:
                argv += ["--hostfile", spec.hostfile, "--npernode", str(spec.nproc_per_node)]
            elif spec.include:
                argv += ["-H", spec.include, "--npernode", str(spec.nproc_per_node)]
            # Remote ranks do not inherit our environment: forward what the ranks need, set what we add.
            argv += ["-x", "PATH"]
            argv += [x for k, v in env.items() for x in ("-x", f"{k}={v}")]
        else:
            # Hydra forwards the whole environment by default; -genv sets what we add.
            argv = ["mpirun", "-n", str(total), "-ppn", str(spec.nproc_per_node)]
            if spec.hostfile:
                argv += ["-f", spec.hostfile]
            elif spec.include:
                argv += ["-hosts", spec.include]
            for k, v in env.items():
                argv += ["-genv", k, v]
        argv += [spec.python, *spec.rank_argv()]
        return argv, env
