"""The process tree of a self-spawned `trellis train`: the parent forwards signals to its ranks and waits for
their final save; every rank dies with its parent (no orphan), whatever killed the parent.

Parent side (engine/spawn.py): SIGTERM, SIGINT, SIGHUP and SIGUSR1 are caught and forwarded to every rank
(which stay in the parent's process group, so `kill -9 -- -PGID` still ends all at once; a signal sent to the
whole group reaches a rank twice, which it counts as one); the parent then waits up to
`launcher.stop_timeout_s` for the ranks to finish their step, save and exit, and exits with a code of
trellis/exit_codes.py.

Rank side: `adopt_parent_death()` runs first thing in a spawned rank (trellis/__main__.py, main thread,
before torch is imported). It asks the kernel for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG), then
compares os.getppid() with the parent's pid (TRELLIS_PARENT_PID) to close the race of a parent that died
before the prctl. SIGTERM then takes the rank's normal stop path: finish the step, save, exit. Caveat:
Linux sends the parent-death signal when the parent *thread* that forked the rank ends, so the parent must
start its ranks from its main thread (spawn.py does).
"""

from __future__ import annotations

import os
import signal
import sys

from trellis import exit_codes

PARENT_PID_ENV = "TRELLIS_PARENT_PID"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """prctl(PR_SET_PDEATHSIG, signum) for this process; False where it does not exist (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def adopt_parent_death(environ=os.environ) -> None:
    """In a rank started by spawn.py: die (via SIGTERM, the rank's stop path) when the parent dies."""
    want = environ.get(PARENT_PID_ENV)
    if not want:
        return
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != int(want):  # the parent died before the prctl took effect
        print(f"trellis: the parent process {want} is gone; this rank exits", file=sys.stderr, flush=True)
        os._exit(exit_codes.FAILURE)


def rank_exit_code(summary: dict, steps: int) -> int:
    """A rank's exit code after its training loop returned (trellis/exit_codes.py)."""
    sig = summary.get("stopped_by_signal")
    if not sig or summary.get("steps", 0) >= steps:
        return exit_codes.OK
    if summary.get("checkpoint"):
        return exit_codes.STOPPED_SAVED
    return exit_codes.killed_by(sig)


def combine_after_signal(codes: list[int]) -> int:
    """The job's code from the ranks' codes (Popen returncodes) once all exited after a forwarded signal."""
    norm = [exit_codes.killed_by(-c) if c < 0 else c for c in codes]
    bad = [c for c in norm if c not in (exit_codes.OK, exit_codes.STOPPED_SAVED)]
    if bad:
        return bad[0]
    return exit_codes.STOPPED_SAVED if exit_codes.STOPPED_SAVED in norm else exit_codes.OK
