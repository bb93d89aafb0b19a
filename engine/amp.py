"""Mixed precision: compute dtype, FP32 master weights, and the dynamic loss scaler for fp16.

Master weights: trainable parameters are always stored in fp32 (they are the optimizer's weights);
compute runs in bf16/fp16 through autocast (ZeRO 0/1) or FSDP2's MixedPrecisionPolicy (ZeRO 2/3), and
gradients are reduced in fp32.

Loss scaling (fp16 only), the DeepSpeed semantics users know:
- start at 2**initial_scale_power;
- an overflow (inf/nan in any gradient on ANY rank; the flag rides on the step's one scalar all-reduce) skips
  the optimizer step on every rank. The first `hysteresis - 1` overflows only use up hysteresis; from
  then on every overflow halves the scale, until the scale grows again (which refills hysteresis);
- after `window` consecutive clean steps the scale doubles;
- an overflow while already at `min_loss_scale` is an error: training cannot make progress.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from trellis.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def autocast_context(device_type: str, dtype_name: str):
    if dtype_name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype_name])


class LossScaleUnderflow(UserError):
    """fp16 loss scale hit its minimum while gradients still overflow."""


@dataclass
class DynamicLossScaler:
    scale: float = 2.0 ** 16
    window: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    # running state
    clean_steps: int = 0
    hysteresis_left: int = 0
    overflows: int = 0

    def __post_init__(self) -> None:
        self.hysteresis_left = self.hysteresis

    @classmethod
    def from_config(cls, p) -> "DynamicLossScaler | StaticLossScaler | None":
        if p.dtype != "fp16":
            return None
        if p.loss_scale != "dynamic":
            return StaticLossScaler(float(p.loss_scale))
        return cls(scale=2.0 ** p.initial_scale_power, window=p.loss_scale_window, hysteresis=p.hysteresis,
                   min_scale=p.min_loss_scale)

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.overflows += 1
            self.clean_steps = 0
            if self.hysteresis_left > 1:
                self.hysteresis_left -= 1
                return
            if self.scale <= self.min_scale:
                raise LossScaleUnderflow(
                    f"fp16 loss scale is at precision.min_loss_scale={self.min_scale:g} and gradients still overflow; "
                    "the run cannot make progress in fp16: use precision.dtype='bf16', lower train.lr, or lower "
                    "precision.min_loss_scale")
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        self.clean_steps += 1
        if self.clean_steps >= self.window:
            self.scale *= self.growth_factor
            self.clean_steps = 0
            self.hysteresis_left = self.hysteresis

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "hysteresis_left": self.hysteresis_left,
                "overflows": self.overflows}

    def load_state_dict(self, s: dict) -> None:
        self.scale = float(s["scale"])
        self.clean_steps = int(s["clean_steps"])
        self.hysteresis_left = int(s["hysteresis_left"])
        self.overflows = int(s.get("overflows", 0))


@dataclass
class StaticLossScaler:
    scale: float
    overflows: int = 0

    def update(self, found_inf: bool) -> None:
        self.overflows += int(found_inf)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "overflows": self.overflows}

    def load_state_dict(self, s: dict) -> None:
        self.overflows = int(s.get("overflows", 0))
