"""Run a function on N real gloo ranks (fresh processes) and collect each rank's return value.

Every call has a deadline: a hung collective fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, outdir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      TOKENIZERS_PARALLELISM="false")
    import torch

    torch.set_num_threads(1)
    out = Path(outdir) / f"rank{rank}.pkl"
    try:
        result = fn(rank, world, *args)
        out.write_bytes(pickle.dumps(("ok", result)))
    except BaseException as e:  # report to the parent instead of dying silently
        out.write_bytes(pickle.dumps(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout: float = 300.0) -> list:
    """fn(rank, world, *args) on `world` processes; returns the list of results by rank."""
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), d, fn, args), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks did not finish within {timeout:.0f} s")
        except Exception:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            errors = []
            for r in range(world):
                f = Path(d) / f"rank{r}.pkl"
                if f.exists():
                    status, val = pickle.loads(f.read_bytes())
                    if status == "error":
                        errors.append(f"rank {r}: {val}")
            if errors:
                raise AssertionError("\n".join(errors)) from None
            raise
        results = []
        for r in range(world):
            status, val = pickle.loads((Path(d) / f"rank{r}.pkl").read_bytes())
            if status != "ok":
                raise AssertionError(f"rank {r}: {val}")
            results.append(val)
        return results
