"""Backends: what runs forward / backward / the optimizer step behind the Trainer.

`build_backend(cfg, ...)` is the one reader of `zero.backend`: the native stack (DTensor TP, pipelining,
FSDP2 ZeRO; native.py) or DeepSpeed's engine (deepspeed.py, the only module that imports deepspeed, lazily).
Both implement `Backend` (base.py). `check_supported(cfg)` refuses, before any rank starts, what the chosen
backend cannot run on this machine.
"""

from __future__ import annotations

from .base import Backend, LossScaler, StepResult
from .deepspeed import DeepSpeedBackend
from .native import NativeBackend

BACKENDS: dict[str, type[Backend]] = {"native": NativeBackend, "deepspeed": DeepSpeedBackend}

__all__ = ["BACKENDS", "Backend", "LossScaler", "StepResult", "build_backend", "check_supported"]


def build_backend(cfg, ctx, dims, model, inject_peft=None) -> Backend:
    """The backend `zero.backend` names, holding `model` partitioned for this rank (`inject_peft`: the PEFT
    injector, engine/peft/inject.py, or None)."""
    return BACKENDS[cfg.zero.backend](cfg, ctx, dims, model, inject_peft=inject_peft)


def check_supported(cfg) -> None:
    """ConfigError when the chosen backend refuses this config on this machine (e.g. DeepSpeed fp16 on a
    CPU). Cheap, no deepspeed import: the launching process calls it before ranks start."""
    BACKENDS[cfg.zero.backend].check_supported(cfg)
