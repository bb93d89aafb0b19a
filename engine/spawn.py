"""`trellis train` outside any launcher with world size > 1: start the local ranks ourselves
(like `torchrun --standalone`). If one rank fails, the others are stopped at once (no hang).

Signals (engine/process_tree.py): SIGTERM, SIGINT (Ctrl-C), SIGHUP and SIGUSR1 to this parent are forwarded to
every rank, which finish the step, save a final checkpoint (with checkpoint.dir) and exit; the parent waits for
them (at most launcher.stop_timeout_s, then kills them) and exits only once every rank is gone, with a code of
trellis/exit_codes.py (75 = stopped after saving). A second Ctrl-C is forwarded too: the ranks stop at once.
The ranks die with this process even if it is SIGKILLed (parent-death signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from trellis import exit_codes

from .distributed import free_port
from .process_tree import FORWARDED, PARENT_PID_ENV, combine_after_signal

GRACE_S = 10.0  # a failed rank's peers: SIGTERM, then SIGKILL after this
STOP_TIMEOUT_S = 300.0  # default of launcher.stop_timeout_s: a forwarded signal's final save, then SIGKILL


def spawn_local_ranks(nproc: int, argv: list[str], stop_timeout_s: float = STOP_TIMEOUT_S) -> int:
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum, frame):
        if not received:
            received.append(time.monotonic())
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        for r in range(nproc):
            env = dict(os.environ)
            env.update(RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nproc),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRELLIS_SPAWNED="1")
            env[PARENT_PID_ENV] = str(os.getpid())
            env.setdefault("OMP_NUM_THREADS", str(threads))
            # Same process group as this parent: `kill -9 -- -PGID` still ends everything at once. A signal to
            # the group (terminal Ctrl-C) then reaches a rank twice (directly, and forwarded): the rank counts
            # one stop request for both (engine/trainer.StopRequested).
            procs.append(subprocess.Popen([sys.executable, "-m", "trellis", *argv], env=env))
            if received:  # a signal came while starting: the ranks started since get it too
                procs[-1].send_signal(received[1])
        return _wait(procs, received, stop_timeout_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _kill([p for p in procs if p.poll() is None])


def _wait(procs: list[subprocess.Popen], received: list, stop_timeout_s: float) -> int:
    while True:
        codes = [p.poll() for p in procs]
        if received:
            return _wait_stopping(procs, received, stop_timeout_s)
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            _kill(procs)
            code = failed[0]
            why = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            print(f"trellis: a rank {why}; stopped the other ranks", file=sys.stderr)
            return exit_codes.killed_by(-code) if code < 0 else code
        if all(c == 0 for c in codes):
            return exit_codes.OK
        time.sleep(0.1)


def _wait_stopping(procs: list[subprocess.Popen], received: list, stop_timeout_s: float) -> int:
    """After a forwarded signal: every rank saves and exits; a rank that fails instead stops the others."""
    name = signal.Signals(received[1]).name
    deadline = received[0] + stop_timeout_s
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c is not None and c not in (exit_codes.OK, exit_codes.STOPPED_SAVED)]
        if failed and any(c is None for c in codes):
            _kill(procs)
            codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            code = combine_after_signal(codes)
            print(f"trellis: {name}: the ranks stopped; exit code {code} ({exit_codes.describe(code)})",
                  file=sys.stderr, flush=True)
            return code
        if time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            print(f"trellis: {name}: the ranks did not stop within launcher.stop_timeout_s={stop_timeout_s:g}s "
                  f"(saving a checkpoint takes longer? raise it); killed them", file=sys.stderr, flush=True)
            return exit_codes.FAILURE
        time.sleep(0.1)


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
