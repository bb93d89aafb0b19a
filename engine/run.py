"""Entry for `trellis train`: start local ranks ourselves, or run as one rank of a launcher's job."""

from __future__ import annotations

import logging
import os
import sys

from trellis.errors import UserError

from .backends import check_supported
from .checkpoint.lease import release_all
from .distributed import init_distributed, launcher_rank_env, shutdown
from .peft.inject import check_init_adapter
from .process_tree import rank_exit_code
from .spawn import spawn_local_ranks
from .trainer import train_this_rank


def local_world_size(cfg) -> int:
    return cfg.launcher.nproc_per_node or cfg.parallel.world_size()


def run_training(cfg, argv: list[str]) -> int:
    # Refuse what the backend cannot do on this machine before any rank starts (e.g. DeepSpeed fp16 on a CPU).
    check_supported(cfg)
    check_init_adapter(cfg)  # peft.init_adapter's files and adapter_config.json
    check_data_sources(cfg)  # data.path / data.eval_path exist and hold readable formats
    if launcher_rank_env() is None:
        world = local_world_size(cfg)
        if world > 1:
            return spawn_local_ranks(world, argv, cfg.launcher.stop_timeout_s)
    end_rank_process(run_rank(cfg))


def check_data_sources(cfg) -> None:
    """A missing path, a glob that matches nothing, an unknown extension: one error before any rank starts (the
    records themselves are read, and checked, once by the rank that prepares the corpus)."""
    from .data.corpus import is_prepared
    from .data.sources import source_files

    for path in (cfg.data.path, cfg.data.eval_path):
        if path and not is_prepared(path):
            source_files(cfg.data, path)


def end_rank_process(code: int) -> None:
    """End a rank's process with `code`, skipping interpreter teardown. The process group's C++ objects (gloo
    transport and store threads) are then never destroyed: destroying them at interpreter exit aborted about 1
    run in 20 with "terminate called without an active exception" (exit 134) after a successful run, which a
    launcher or Slurm reports as a failed job. Everything durable (checkpoint files fsynced and renamed, metrics
    closed, lease released) is done before this; the ranks met at a barrier first (shutdown)."""
    logging.shutdown()
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun the rank env came through mpi4py (launchers/rank_env.py)
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # mpirun fails a job whose rank called MPI_Init but exits without MPI_Finalize
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# What gloo / NCCL / torch.distributed say when a peer is gone or stuck past parallel.timeout_s.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "Broken pipe",
              "NCCL communicator was aborted", "Socket Timeout", "Connection refused",
              "Application timeout caused pair closure")


def lost_peer(e: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(e, getattr(dist, "DistError", ())) or any(m in str(e) for m in _PEER_LOST)


def run_rank(cfg) -> int:
    ctx = init_distributed(cfg.parallel.timeout_s)
    clean = False
    try:
        summary = train_this_rank(cfg, ctx)
        clean = True
    except UserError as e:
        # Every rank hits the same config error; print it once.
        if ctx.rank == 0:
            for m in e.messages:
                print(f"error: {m}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        # A peer died or hung (kill -9, OOM, SIGSTOP): every survivor's collective fails the same way. One line
        # each, not a gloo/NCCL traceback per rank; the launcher or trellis' parent names the rank that died.
        first = str(e).strip().splitlines()[0][:300]
        print(f"error: rank {ctx.rank}: lost contact with another rank ({first}); see the first rank that failed",
              file=sys.stderr)
        return 1
    finally:
        release_all()  # the checkpoint.dir lease (engine/checkpoint/lease.py)
        shutdown(clean, destroy=False)  # end_rank_process ends the process without tearing the group down
    return rank_exit_code(summary, cfg.train.steps)  # 75 when a signal stopped it after the final save


