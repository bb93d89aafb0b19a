"""The DeepSpeed backend's pre-flight: the run's DeepSpeed config checked by DeepSpeed's own config model in the
launching process, before any rank starts (called by DeepSpeedBackend.check_supported)."""

from __future__ import annotations

import copy
import os

from trellis.errors import ConfigError

from . import ds_ops
from .deepspeed import build_ds_config, ds_validation_messages


def preflight_ds_config(cfg, world_size: int | None = None) -> dict:
    """Validate the DeepSpeed config this run will hand to `deepspeed.initialize` with DeepSpeed's own config
    model, in the launching process before any rank starts (trellis' own spawn, `trellis launch`, Slurm), so a
    bad field is one line naming it, exit 2, instead of the same traceback on every rank. "auto" is resolved
    first (build_ds_config) and the world size too: dp from parallel.dp, or from WORLD_SIZE / `world_size` when
    it is -1 (else 1, what trellis' own spawn starts). DeepSpeed's model, outside a process group, checks the
    batch arithmetic for one rank, so it sees the per-dp-rank train_batch_size (the dp product was checked by
    _check_consistent). Returns the checked config."""
    tp, pp = max(cfg.parallel.tp, 1), max(cfg.parallel.pp, 1)
    dp = cfg.parallel.dp
    if dp < 1:
        world = world_size or int(os.environ.get("WORLD_SIZE", tp * pp))
        dp = max(world // (tp * pp), 1)
    ds = build_ds_config(cfg, dp)
    ds_ops.use_project_extensions_dir()
    from deepspeed.runtime.config import DeepSpeedConfig

    one_rank = copy.deepcopy(ds)
    one_rank["train_batch_size"] = ds["train_batch_size"] // dp
    source = cfg.zero.deepspeed_config
    try:
        DeepSpeedConfig(one_rank)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        if hasattr(e, "errors") and hasattr(e, "title"):
            raise ConfigError(ds_validation_messages(e, source)) from None
        raise ConfigError(f"--deepspeed {source or '(built by trellis)'}: DeepSpeed refuses the config: "
                          f"{str(e).splitlines()[0]}") from None
    except AssertionError as e:
        raise ConfigError(f"--deepspeed {source or '(built by trellis)'}: DeepSpeed refuses the config: "
                          f"{str(e).splitlines()[0] if str(e) else 'a sanity check failed'}") from None
    return ds
