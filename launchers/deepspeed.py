"""The DeepSpeed launcher: hostfile (`host slots=N` lines, pdsh/ssh to each host), --include/--exclude
(`host:0,1@host2`), --num_nodes/--num_gpus. Ranks run `python -m trellis train ...` via --module, or the
user's script (deepspeed's own positional form: `deepspeed [opts] SCRIPT.py args`)."""

from __future__ import annotations

from .base import DEFAULT_PORT, LaunchSpec, Launcher


class DeepSpeedLauncher(Launcher):
    name = "deepspeed"
    binary = "deepspeed"
    install_hint = "pip install 'trellis-train[deepspeed]'"

    def build_command(self, spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
        argv = ["deepspeed"]
        if spec.hostfile:
            argv += ["--hostfile", spec.hostfile]
        if spec.include:
            argv += ["--include", spec.include]
        if spec.exclude:
            argv += ["--exclude", spec.exclude]
        # --include/--exclude already name the nodes and slots; deepspeed refuses them with --num_nodes/--num_gpus.
        if not (spec.include or spec.exclude):
            argv += ["--num_nodes", str(spec.nnodes), "--num_gpus", str(spec.nproc_per_node)]
        argv += ["--master_addr", spec.master_addr or "127.0.0.1", "--master_port", str(spec.master_port or DEFAULT_PORT)]
        # --no_local_rank: trellis reads LOCAL_RANK from the environment; a `--local_rank=N` argument would
        # be taken for a config override (or break a user script's own argument parsing). --module: the
        # "script" is the trellis package.
        argv.append("--no_local_rank")
        argv += spec.rank_argv() if spec.script else ["--module", "trellis", "train", spec.config, *spec.overrides]
        return argv, dict(spec.env)
