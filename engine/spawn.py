"""`trellis train` outside any launcher with world size > 1: start the local ranks ourselves
(like `torchrun --standalone`). If one rank fails, the others are stopped at once (no hang); Ctrl-C
reaches every rank, which stop cleanly at the next step boundary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from .distributed import free_port

GRACE_S = 10.0


def spawn_local_ranks(nproc: int, argv: list[str]) -> int:
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs: list[subprocess.Popen] = []
    for r in range(nproc):
        env = dict(os.environ)
        env.update(RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRELLIS_SPAWNED="1")
        env.setdefault("OMP_NUM_THREADS", str(threads))
        procs.append(subprocess.Popen([sys.executable, "-m", "trellis", *argv], env=env))
    try:
        return _wait(procs)
    except KeyboardInterrupt:
        # The terminal already sent SIGINT to every rank: give them time to stop at a step boundary.
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        _kill(procs)
        return 130


def _wait(procs: list[subprocess.Popen]) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            _kill(procs)
            code = failed[0]
            why = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            print(f"trellis: a rank {why}; stopped the other ranks", file=sys.stderr)
            return 128 - code if code < 0 else code
        if all(c == 0 for c in codes):
            return 0
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
