"""The launcher seam: a LaunchSpec in, a pure `build_command(spec) -> (argv, env)` out, and `run` that executes it.

Every launcher starts the same per-rank entry point on every rank: `python -m trellis train CONFIG [overrides]`,
or a user's `python SCRIPT.py [args]` (`trellis launch SCRIPT.py`); either reads its rank/world/master from the
launcher's environment (launchers/rank_env.py, through engine/distributed.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from trellis.errors import UserError

# Seconds the launcher's process group gets to stop after SIGTERM before SIGKILL.
GRACE_S = 15.0
# The rendezvous port when none is given (torchrun's and DeepSpeed's default; what a rank reads without MASTER_PORT).
DEFAULT_PORT = 29500


@dataclass(kw_only=True)
class LaunchSpec:
    config: str = ""
    # A user script run on every rank instead of `trellis train` (its arguments are passed through untouched).
    script: str = ""
    script_args: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    # "" / 0 = the launcher's default (torchrun and deepspeed: 127.0.0.1:29500; MPI: rank 0's address and a
    # free port, shared through mpi4py; srun: the first node's address and a port derived from the job id).
    master_addr: str = ""
    master_port: int = 0
    hostfile: str = ""
    include: str = ""
    exclude: str = ""
    env: dict[str, str] = field(default_factory=dict)
    # The interpreter every rank runs (a plain name keeps dry-run output copyable to other nodes).
    python: str = "python"

    def rank_argv(self) -> list[str]:
        """What each rank runs, after the interpreter: the user's script, or `-m trellis train`."""
        if self.script:
            return [self.script, *self.script_args]
        return ["-m", "trellis", "train", self.config, *self.overrides]


class Launcher(ABC):
    name: str = ""
    # Executable that must be on PATH for `run` (None = the Python interpreter itself).
    binary: str | None = None
    install_hint: str = ""

    @abstractmethod
    def build_command(self, spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
        """Pure: argv and the extra environment (on top of the caller's) that start every rank."""

    def resolve_binary(self) -> str | None:
        """The binary on PATH, else next to this interpreter (a venv that is not activated)."""
        if not self.binary:
            return None
        found = shutil.which(self.binary)
        if found is None:
            beside = os.path.join(os.path.dirname(sys.executable), self.binary)
            found = beside if os.access(beside, os.X_OK) else None
        return found

    def check_available(self) -> None:
        if self.binary and self.resolve_binary() is None:
            raise UserError(f"--launcher {self.name}: `{self.binary}` is not on PATH; {self.install_hint}, "
                            "or add --dry-run to print the command without running it")

    def run(self, spec: LaunchSpec, timeout_s: float | None = None) -> int:
        """Run the command in its own process group; propagate its exit code. Ctrl-C or a timeout stops the
        whole group (SIGTERM, then SIGKILL after GRACE_S), so no rank is ever left behind."""
        self.check_available()
        argv, extra = self.build_command(spec)
        if self.binary and argv and argv[0] == self.binary:
            argv = [self.resolve_binary(), *argv[1:]]
        env = {**os.environ, **extra}
        proc = subprocess.Popen(argv, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except KeyboardInterrupt:
            _stop_group(proc, signal.SIGINT)
            return 130
        except subprocess.TimeoutExpired:
            print(f"trellis launch: timed out after {timeout_s:.0f}s; stopping every rank", file=sys.stderr)
            _stop_group(proc, signal.SIGTERM)
            return 124
        finally:
            if proc.poll() is None:
                _stop_group(proc, signal.SIGTERM)


def _stop_group(proc: subprocess.Popen, first: int) -> None:
    try:
        os.killpg(proc.pid, first)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, even when the leader already exited
    except ProcessLookupError:
        pass
    proc.wait()


# Variables the ranks need from the caller's environment; MPI does not pass them to remote nodes by itself.
RANK_ENV_NAMES = ("PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM",
                  "TORCH_EXTENSIONS_DIR", "HF_HOME")


def caller_env(environ) -> dict[str, str]:
    """The RANK_ENV_NAMES that are set here (to put in LaunchSpec.env; PATH is always forwarded)."""
    return {k: environ[k] for k in RANK_ENV_NAMES if k in environ}
