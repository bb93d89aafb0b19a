"""torchrun: `--standalone` on one node; c10d rendezvous at ADDR:PORT across nodes (run it on every node).
Ranks run `-m trellis train ...` or the user's script (torchrun's own `SCRIPT.py args` form)."""

from __future__ import annotations

from .base import DEFAULT_PORT, LaunchSpec, Launcher


class TorchrunLauncher(Launcher):
    name = "torchrun"
    binary = "torchrun"
    install_hint = "it comes with PyTorch (pip install torch)"

    def build_command(self, spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
        argv = ["torchrun", "--nnodes", str(spec.nnodes), "--nproc-per-node", str(spec.nproc_per_node)]
        if spec.nnodes == 1 and not spec.master_addr:
            argv.append("--standalone")  # private store on a free port: nothing to agree on
        else:
            # c10d: the agent on ADDR hosts the store; every node runs this same command. A node *address*,
            # not a hostname, because compute-node names often do not resolve from their peers.
            endpoint = f"{spec.master_addr or '127.0.0.1'}:{spec.master_port or DEFAULT_PORT}"
            argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "trellis",
                     "--max-restarts", "0"]
        argv += spec.rank_argv()
        return argv, dict(spec.env)
