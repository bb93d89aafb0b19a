"""srun inside a Slurm allocation (or making one): one task per rank; each rank reads SLURM_* (rank_env)."""

from __future__ import annotations

from .base import LaunchSpec, Launcher


class SrunLauncher(Launcher):
    name = "srun"
    binary = "srun"
    install_hint = "install the Slurm client (Debian/Ubuntu: apt-get install slurm-client) or run on a Slurm login node"

    def build_command(self, spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
        argv = ["srun", "--nodes", str(spec.nnodes), "--ntasks", str(spec.nnodes * spec.nproc_per_node),
                "--ntasks-per-node", str(spec.nproc_per_node),
                # One dead rank ends the step at once instead of leaving the others in a collective.
                "--kill-on-bad-exit=1",
                # Ranks rendezvous over TCP from SLURM_* (no PMI needed); Debian's pmi2 does not work with Open MPI.
                "--mpi=none"]
        if spec.include:
            argv += ["--nodelist", spec.include]
        if spec.exclude:
            argv += ["--exclude", spec.exclude]
        env = dict(spec.env)
        if spec.master_addr:
            env["MASTER_ADDR"] = spec.master_addr
        if spec.master_port:
            env["MASTER_PORT"] = str(spec.master_port)
        argv += [spec.python, *spec.rank_argv()]
        return argv, env
