"""Entry for `trellis train`: start local ranks ourselves, or run as one rank of a launcher's job."""

from __future__ import annotations

import sys

from trellis.errors import UserError

from .backends import check_supported
from .distributed import init_distributed, launcher_rank_env, shutdown
from .spawn import spawn_local_ranks
from .trainer import train_this_rank


def local_world_size(cfg) -> int:
    return cfg.launcher.nproc_per_node or cfg.parallel.world_size()


def run_training(cfg, argv: list[str]) -> int:
    # Refuse what the backend cannot do on this machine before any rank starts (e.g. DeepSpeed fp16 on a CPU).
    check_supported(cfg)
    if launcher_rank_env() is None:
        world = local_world_size(cfg)
        if world > 1:
            return spawn_local_ranks(world, argv)
    return run_rank(cfg)


def run_rank(cfg) -> int:
    ctx = init_distributed(cfg.parallel.timeout_s)
    clean = False
    try:
        train_this_rank(cfg, ctx)
        clean = True
    except UserError as e:
        # Every rank hits the same config error; print it once.
        if ctx.rank == 0:
            for m in e.messages:
                print(f"error: {m}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        shutdown(clean)
    return 0


