"""`trellis launch [--launcher torchrun|deepspeed|mpirun|srun] [...] CONFIG [--section.key=value ...]`:
start every rank of `trellis train` through a standard launcher on machines you already hold. Without
--launcher the config's `launcher.name` picks it ("auto" and "standalone": torchrun).

`trellis launch [...] SCRIPT.py [args]` runs `python SCRIPT.py args` on every rank instead (everything after the
script path is the script's, as with torchrun); --launcher defaults to torchrun, --nproc-per-node to 1."""

from __future__ import annotations

import argparse
import shlex

from trellis import configs
from trellis.commands import add_resume_allow_change
from trellis.errors import UserError
from trellis.launchers.registry import NAMES, get_launcher

from .scripts import user_script

DEFAULT_LAUNCHER = "torchrun"  # what launcher.name = "auto" / "standalone" means for `trellis launch`


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch", help="run `trellis train` through torchrun, deepspeed, mpirun or srun",
        description="Every rank runs `python -m trellis train CONFIG [overrides]`, or `python SCRIPT.py [args]` when "
                    "the positional is a .py file (everything after the script goes to it). Dotted overrides work "
                    "as with `trellis train`. Multi-node torchrun: run the same command on every node with "
                    "--master-addr set to the first node's address.",
    )
    p.add_argument("--launcher", choices=NAMES, default=None,
                   help="default: the config's launcher.name, torchrun when that is 'auto' or 'standalone' "
                        "(and for a script)")
    p.add_argument("config", metavar="CONFIG | SCRIPT.py",
                   help="config file (TOML) or preset name; or a Python script to run on every rank")
    p.add_argument("--nnodes", type=int, help="number of nodes (default: launcher.nnodes)")
    p.add_argument("--nproc-per-node", type=int,
                   help="ranks per node (default: launcher.nproc_per_node, else dp x pp x tp / nnodes; 1 for a script)")
    p.add_argument("--hostfile", help="deepspeed: `host slots=N` lines; mpirun: an MPI hostfile")
    p.add_argument("--include", default="", help="deepspeed: host:slots@host; mpirun: -H host list; srun: --nodelist")
    p.add_argument("--exclude", default="", help="deepspeed/srun: hosts or slots to leave out")
    p.add_argument("--master-addr", default="", help="first node's address (multi-node torchrun/deepspeed)")
    p.add_argument("--master-port", type=int, default=0, help="rendezvous port (default: launcher's choice)")
    p.add_argument("--mpi-flavour", choices=("auto", "openmpi", "mpich"), default="auto",
                   help="which mpirun is installed (auto: ask it); sets the flags it understands")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop every rank after this long (exit code 124)")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    add_resume_allow_change(p)
    p.set_defaults(func=_launch, accepts_overrides=True, takes_script=True)


def launcher_name(args, cfg) -> str:
    """--launcher, else the config's launcher.name when it names a launcher, else torchrun."""
    if args.launcher:
        return args.launcher
    return cfg.launcher.name if cfg.launcher.name in NAMES else DEFAULT_LAUNCHER


def build_spec(args, cfg=None) -> "LaunchSpec":  # noqa: F821 - imported lazily below
    from trellis.launchers.base import LaunchSpec

    # Load now so config errors are reported once, here, rather than by every rank.
    cfg = cfg or configs.load(args.config, list(args.overrides))
    nnodes = args.nnodes or cfg.launcher.nnodes or 1
    if nnodes < 1:
        raise UserError(f"--nnodes={nnodes} must be at least 1")
    nproc = args.nproc_per_node or cfg.launcher.nproc_per_node
    if not nproc:
        world = cfg.parallel.world_size()
        if world % nnodes:
            raise UserError(f"parallel.dp x pp x tp = {world} ranks do not split over --nnodes={nnodes}; "
                            "pass --nproc-per-node or change the layout")
        nproc = world // nnodes
    master_addr = args.master_addr or (cfg.launcher.master_addr if nnodes > 1 else "")
    return LaunchSpec(config=args.config, overrides=list(args.overrides), nnodes=nnodes, nproc_per_node=nproc,
                      master_addr=master_addr, master_port=args.master_port or cfg.launcher.master_port,
                      hostfile=args.hostfile or cfg.launcher.hostfile, include=args.include, exclude=args.exclude)


def build_script_spec(args, script: str) -> "LaunchSpec":  # noqa: F821 - imported lazily below
    """A script has no config to take a layout from: one node and one rank per node unless told."""
    from trellis.launchers.base import LaunchSpec

    nnodes, nproc = args.nnodes or 1, args.nproc_per_node or 1
    if nnodes < 1 or nproc < 1:
        raise UserError(f"--nnodes={nnodes} and --nproc-per-node={nproc} must be at least 1")
    return LaunchSpec(script=script, script_args=list(args.script_args), nnodes=nnodes, nproc_per_node=nproc,
                      master_addr=args.master_addr, master_port=args.master_port, hostfile=args.hostfile or "",
                      include=args.include, exclude=args.exclude)


def format_command(argv: list[str], env: dict[str, str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)])


def _launch(args) -> int:
    import os
    import sys

    script = user_script(args)
    if script is not None:
        spec, name = build_script_spec(args, script), args.launcher or DEFAULT_LAUNCHER
    else:
        cfg = configs.load(args.config, list(args.overrides))
        spec, name = build_spec(args, cfg), launcher_name(args, cfg)
    launcher = get_launcher(name, args.mpi_flavour)
    if args.dry_run:
        print(format_command(*launcher.build_command(spec)))
        return 0
    from trellis.launchers.base import caller_env

    spec.python = sys.executable  # the interpreter trellis runs in; every rank uses the same one
    spec.env = {**caller_env(os.environ), **spec.env}
    return launcher.run(spec, timeout_s=args.timeout)
