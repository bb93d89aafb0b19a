"""The exit codes of `trellis train` (the self-spawning parent and every rank agree on them), and of every
other `trellis` command. This is the one table; README's "Exit codes" section repeats it.

| code    | meaning                                                                                     |
|---------|---------------------------------------------------------------------------------------------|
| 0       | done: every step trained (and the final checkpoint saved when checkpoint.dir is set)        |
| 1       | failure: a rank crashed or was killed, a collective timed out, ranks did not stop in time   |
| 2       | user error: config, flags, files, checkpoint refused (one `error:` line each, no traceback) |
| 75      | stopped by a signal (SIGTERM/SIGINT/SIGHUP/SIGUSR1) after saving a final checkpoint:          |
|         | rerun with `--resume auto` to continue                                                       |
| 128 + N | stopped by signal N without a checkpoint to resume from (no checkpoint.dir), e.g. 130 after |
|         | Ctrl-C, 143 after SIGTERM; or a rank was killed by signal N (e.g. 137 for SIGKILL)          |

Why 75: it is EX_TEMPFAIL of BSD's sysexits.h ("temporary failure, the user is invited to retry"), which is
what a preempted-but-saved run is. It is distinct from 0 (so `timeout`, systemd and Slurm do not see "done"),
from 1/2 (nothing is wrong), and from the shell's 128+N (the process handled the signal and saved). A Slurm
epilog or requeue wrapper can test for it: `[ $rc -eq 75 ] && scontrol requeue $SLURM_JOB_ID`.
"""

from __future__ import annotations

import signal

OK = 0
FAILURE = 1
USER_ERROR = 2
STOPPED_SAVED = 75


def killed_by(signum: int) -> int:
    """The shell's code for "ended by signal N" (128 + N)."""
    return 128 + int(signum)


def describe(code: int) -> str:
    if code == OK:
        return "done"
    if code == FAILURE:
        return "failure"
    if code == USER_ERROR:
        return "user error"
    if code == STOPPED_SAVED:
        return "stopped by a signal after saving a checkpoint (resume with --resume auto)"
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return f"ended by {name}"
    return f"exit code {code}"
