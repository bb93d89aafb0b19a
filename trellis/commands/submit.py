"""`trellis submit CONFIG --nodes N --gpus-per-node G [...] [--via sbatch|submitit] [--dry-run] [--wait]`:
run `trellis train` as a Slurm batch job that checkpoints on the warning signal and requeues itself.
`trellis submit [...] SCRIPT.py [args]` runs `python SCRIPT.py args` on every rank instead (everything after the
script path is the script's, as with `trellis launch`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trellis import configs
from trellis.commands import add_resume_allow_change

from .scripts import user_script


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="submit training as a Slurm job (sbatch script or submitit), with checkpoint + requeue",
        description="Dotted overrides work as with `trellis train`. On the warning signal every rank finishes its "
                    "step, saves a checkpoint (set checkpoint.dir) and the job requeues itself; the requeued "
                    "job resumes from the newest valid checkpoint.",
    )
    p.add_argument("config", metavar="CONFIG | SCRIPT.py",
                   help="config file (TOML) or preset name; or a Python script to run on every rank")
    p.add_argument("--nodes", type=int, default=1, help="Slurm nodes (sbatch --nodes); default 1")
    p.add_argument("--gpus-per-node", type=int, default=0, help="0 on CPU-only nodes")
    p.add_argument("--ntasks-per-node", "--nproc-per-node", dest="ntasks_per_node", type=int, default=0,
                   help="ranks per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--partition", default="", help="Slurm partition (default: the cluster's)")
    p.add_argument("--time", default="", help="time limit in Slurm's forms: 30, 2:00:00, 1-12:00:00")
    p.add_argument("--account", default="", help="Slurm account to charge")
    p.add_argument("--qos", default="", help="Slurm quality of service")
    p.add_argument("--constraint", default="", help="Slurm node features, e.g. h100")
    p.add_argument("--exclusive", action="store_true", help="do not share the nodes with other jobs")
    p.add_argument("--signal", default="USR1@90", help="warning signal before the time limit (default USR1@90)")
    p.add_argument("--mode", choices=("per-task", "per-node"), default="per-task",
                   help="per-task: one Slurm task per rank; per-node: one torchrun per node")
    p.add_argument("--via", choices=("sbatch", "submitit"), default="sbatch",
                   help="submit a generated sbatch script, or through submitit (Python-side requeue)")
    p.add_argument("--job-name", default="trellis", help="Slurm job name (default trellis)")
    p.add_argument("--log-dir", default="runs/slurm", help="job scripts and logs (default runs/slurm)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script without submitting")
    p.add_argument("--wait", action="store_true", help="follow the job's log until it ends; exit with its code")
    p.add_argument("--wait-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --wait: stop following (the job keeps running) after this long")
    add_resume_allow_change(p)
    p.set_defaults(func=_submit, accepts_overrides=True, takes_script=True)


def build_submit_spec(args):
    from trellis.launchers.base import caller_env
    from trellis.slurm.submit import SubmitSpec

    script = user_script(args)
    if script is None:
        configs.load(args.config, list(args.overrides))  # config errors now, not in the queue an hour later
    log_dir = Path(args.log_dir)
    return SubmitSpec(
        config="" if script else args.config, script=script or "", script_args=list(args.script_args or []),
        overrides=list(args.overrides), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        ntasks_per_node=args.ntasks_per_node, partition=args.partition, time=args.time, account=args.account,
        qos=args.qos, constraint=args.constraint, exclusive=args.exclusive, signal=args.signal, mode=args.mode,
        job_name=args.job_name, log_dir=str(log_dir if log_dir.is_absolute() else Path.cwd() / log_dir),
        workdir=os.getcwd(), python=sys.executable, exports=caller_env(os.environ),
    )


def _submit(args) -> int:
    from trellis.slurm import submit as slurm

    spec = build_submit_spec(args)
    if args.via == "submitit":
        if args.dry_run:
            print(slurm.render_sbatch(spec), end="")  # what the sbatch path would run; submitit writes its own
            print("# --via submitit: submitit writes its own script with the same resources", file=sys.stderr)
            return 0
        job = slurm.submit_submitit(spec)
        log = Path(str(job.paths.stdout).replace("%j", str(job.job_id)).replace("%t", "0"))
        _announce(job.job_id, log)
    else:
        script = slurm.render_sbatch(spec)
        if args.dry_run:
            print(script, end="")
            return 0
        job_id = slurm.submit_sbatch(script, Path(spec.log_dir))
        log = Path(spec.log_dir) / f"{spec.job_name}-{job_id}.out"
        _announce(job_id, log)
        job = None
    if not args.wait:
        return 0
    return slurm.wait_job(str(job.job_id) if job else job_id, log, timeout_s=args.wait_timeout)


def _announce(job_id, log: Path) -> None:
    print(f"submitted job {job_id}")
    print(f"log: {log}")
    print(f"follow: tail -F {log}    status: squeue -j {job_id}    cancel: scancel {job_id}")
