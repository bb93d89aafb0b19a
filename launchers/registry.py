"""Launcher classes by name (what `trellis launch --launcher NAME` picks)."""

from __future__ import annotations

import shutil

from .base import Launcher
from .deepspeed import DeepSpeedLauncher
from .mpirun import MpirunLauncher, detect_flavour
from .srun import SrunLauncher
from .torchrun import TorchrunLauncher

NAMES = ("torchrun", "deepspeed", "mpirun", "srun")


def get_launcher(name: str, mpi_flavour: str = "auto") -> Launcher:
    if name == "torchrun":
        return TorchrunLauncher()
    if name == "deepspeed":
        return DeepSpeedLauncher()
    if name == "mpirun":
        if mpi_flavour == "auto":
            # Without mpirun (e.g. a --dry-run on a laptop) print the Open MPI form.
            mpi_flavour = detect_flavour() if shutil.which("mpirun") else "openmpi"
        return MpirunLauncher(mpi_flavour)
    if name == "srun":
        return SrunLauncher()
    raise ValueError(f"unknown launcher {name!r}; use one of {', '.join(NAMES)}")
