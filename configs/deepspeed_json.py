"""Map a stock DeepSpeed `ds_config.json` onto trellis config keys.

Every field is either mapped onto a trellis key, passed through to DeepSpeed untouched (the JSON is
handed to `deepspeed.initialize` as-is by the deepspeed backend, so its tuning knobs are honoured by
DeepSpeed itself), or rejected with an error naming it. Nothing is silently dropped. "auto" (the HF
Trainer convention) means "take the value from the trellis config".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trellis.errors import ConfigError

# Top-level sections DeepSpeed honours itself when given the JSON unchanged.
_PASS_THROUGH = {
    "steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer", "prescale_gradients",
    "gradient_predivide_factor", "communication_data_type", "seq_parallel_communication_data_type",
    "aio", "activation_checkpointing", "memory_breakdown", "dump_state", "checkpoint",
    "zero_force_ds_cpu_optimizer", "data_types", "comms_logger", "flops_profiler", "tensorboard",
    "csv_monitor", "wandb", "torch_autocast",
}
# Fields about tensor / pipeline / sequence parallelism: the native backend does these (parallel.tp / parallel.pp).
_PARALLEL_FIELDS = {"tensor_parallel", "pipeline", "pipeline_parallel_size", "sequence_parallel_size", "autotp_size",
                    "zero_optimization.mics_shard_size"}
# Documented aliases DeepSpeed still reads (deepspeed/runtime/config.py: BFLOAT16_OLD).
ALIASES = {"bfloat16": "bf16"}
_OPTIMIZERS = {"adam": "adamw", "adamw": "adamw", "sgd": "sgd"}
_SCHEDULERS = {"warmuplr": "constant", "warmupdecaylr": "linear", "warmupcosinelr": "cosine"}
_DEVICES = ("none", "cpu", "nvme")


def _is_auto(v: Any) -> bool:
    return v == "auto"


def map_deepspeed_json(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--deepspeed: no such file {path!r}")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed {path}: not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed {path}: top level must be a JSON object")

    out: dict[str, Any] = {"zero.backend": "deepspeed", "zero.deepspeed_config": str(p)}
    errors: list[str] = []

    def put(key: str, value: Any) -> None:
        if not _is_auto(value):
            out[key] = value

    for k, v in ds.items():
        k = ALIASES.get(k, k)
        if isinstance(v, dict) and v.get("enabled") in (False, "false") and k not in ("fp16", "bf16"):
            continue  # a disabled section (DeepSpeed-Chat's hybrid_engine, ...) asks for nothing
        if k == "train_micro_batch_size_per_gpu":
            put("train.micro_batch_size", v)
        elif k == "gradient_accumulation_steps":
            put("train.grad_accum", v)
        elif k == "train_batch_size":
            put("train.global_batch_size", v)
        elif k == "gradient_clipping":
            put("train.grad_clip", v)
        elif k == "zero_optimization":
            _map_zero(v, put, errors)
        elif k in ("fp16", "bf16"):
            _map_precision(k, v, put, errors)
        elif k == "optimizer":
            _map_optimizer(v, put, errors)
        elif k == "scheduler":
            _map_scheduler(v, put, errors)
        elif k in _PASS_THROUGH:
            pass  # honoured by DeepSpeed from the unchanged JSON
        elif k in _PARALLEL_FIELDS:
            errors.append(f"--deepspeed {p.name}: field {k!r} cannot be honoured by trellis; remove it "
                          "(tensor/pipeline parallel come from parallel.tp / parallel.pp with the native backend)")
        else:
            errors.append(f"--deepspeed {p.name}: field {k!r} is not one trellis maps or hands to DeepSpeed; remove "
                          'it, or set "enabled": false if it is a section')
    if errors:
        raise ConfigError(errors)
    return out


def _map_zero(z: Any, put, errors: list[str]) -> None:
    if not isinstance(z, dict):
        errors.append("zero_optimization: must be an object")
        return
    if "stage" in z:
        put("zero.stage", z["stage"])
    for which in ("offload_optimizer", "offload_param"):
        off = z.get(which)
        if off is None:
            continue
        if not isinstance(off, dict):
            errors.append(f"zero_optimization.{which}: must be an object")
            continue
        device = off.get("device", "none")
        if device not in _DEVICES:
            errors.append(f"zero_optimization.{which}.device={device!r}: use one of {', '.join(_DEVICES)}")
            continue
        put(f"zero.{which}", device)
        if off.get("nvme_path"):
            put("zero.nvme_path", off["nvme_path"])
        if "pin_memory" in off:
            put("zero.pin_memory", off["pin_memory"])
    # Everything else in zero_optimization (bucket sizes, overlap_comm, stage3_* ...) is tuning that
    # DeepSpeed reads from the JSON itself.


def _map_precision(kind: str, sec: Any, put, errors: list[str]) -> None:
    if not isinstance(sec, dict):
        errors.append(f"{kind}: must be an object")
        return
    enabled = sec.get("enabled", False)
    if enabled is True or enabled == "true":
        put("precision.dtype", kind)
    elif _is_auto(enabled):
        pass
    if kind == "fp16":
        if "loss_scale" in sec and not _is_auto(sec["loss_scale"]):
            ls = sec["loss_scale"]
            put("precision.loss_scale", "dynamic" if ls == 0 else str(ls))
        for src, dst in (("initial_scale_power", "initial_scale_power"),
                         ("loss_scale_window", "loss_scale_window"),
                         ("hysteresis", "hysteresis"), ("min_loss_scale", "min_loss_scale")):
            if src in sec:
                put(f"precision.{dst}", sec[src])
        unknown = set(sec) - {"enabled", "loss_scale", "initial_scale_power", "loss_scale_window",
                              "hysteresis", "min_loss_scale", "consecutive_hysteresis", "auto_cast"}
    else:
        unknown = set(sec) - {"enabled", "immediate_grad_update", "check_grad_overflow"}
    for k in sorted(unknown):
        errors.append(f"{kind}.{k}: not supported by trellis; remove it")


def _map_optimizer(sec: Any, put, errors: list[str]) -> None:
    if not isinstance(sec, dict):
        errors.append("optimizer: must be an object")
        return
    typ = str(sec.get("type", "")).lower()
    if typ not in _OPTIMIZERS:
        errors.append(f"optimizer.type={sec.get('type')!r}: trellis supports Adam, AdamW and SGD")
        return
    put("train.optimizer", _OPTIMIZERS[typ])
    params = sec.get("params", {}) or {}
    for k, v in params.items():
        if k == "lr":
            put("train.lr", v)
        elif k == "betas":
            if not _is_auto(v):
                put("train.beta1", v[0])
                put("train.beta2", v[1])
        elif k == "eps":
            put("train.eps", v)
        elif k == "weight_decay":
            put("train.weight_decay", v)
        elif k in ("torch_adam", "adam_w_mode", "momentum"):
            pass  # implementation choice honoured by DeepSpeed
        else:
            errors.append(f"optimizer.params.{k}: not supported by trellis; remove it")


def _map_scheduler(sec: Any, put, errors: list[str]) -> None:
    if not isinstance(sec, dict):
        errors.append("scheduler: must be an object")
        return
    typ = str(sec.get("type", "")).lower()
    if typ not in _SCHEDULERS:
        errors.append(f"scheduler.type={sec.get('type')!r}: trellis supports WarmupLR, WarmupDecayLR "
                      "and WarmupCosineLR")
        return
    put("train.schedule", _SCHEDULERS[typ])
    params = sec.get("params", {}) or {}
    for k, v in params.items():
        if k == "warmup_num_steps":
            put("train.warmup_steps", v)
        elif k == "warmup_max_lr":
            put("train.lr", v)
        elif k == "warmup_min_lr":
            if not _is_auto(v) and v not in (0, 0.0):
                errors.append("scheduler.params.warmup_min_lr: trellis warms up from 0; set it to 0")
        elif k == "total_num_steps":
            put("train.steps", v)
        elif k == "cos_min_ratio":
            pass  # mapped below once lr is known
        elif k == "warmup_type":
            if v != "linear":
                errors.append(f"scheduler.params.warmup_type={v!r}: trellis warms up linearly")
        else:
            errors.append(f"scheduler.params.{k}: not supported by trellis; remove it")
    if "cos_min_ratio" in params:
        put("train.min_lr_ratio", params["cos_min_ratio"])
