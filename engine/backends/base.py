"""The seam between the Trainer (data, schedule, metrics, checkpoint cadence, signals) and whatever runs the
forward/backward/optimizer step: the native torch stack or DeepSpeed's engine.

A backend owns the partitioned model, the optimizer and (fp16) the loss scaler; the Trainer and the
Checkpointer use it only through this interface.
"""

from __future__ import annotations

import math
import signal
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from ..checkpoint.safe_load import check_state_dir
from ..data import Batch

# The signals a stop request can carry (engine/trainer.py installs handlers for them); a slot each in the
# step's scalar all-reduce.
STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)


@dataclass
class StepResult:
    loss: float            # mean token loss over the global batch (same value on every rank)
    grad_norm: float       # before clipping; nan when the step was skipped
    skipped: bool          # fp16 overflow: no parameter or optimizer state changed
    loss_scale: float | None  # fp16: the scale after this step's update (what the next step uses)
    tokens: int            # tokens in the global batch
    lr: float = math.nan   # the learning rate of this step (set by the Engine, engine/api.py)
    nonfinite: bool = False  # inf/nan in the loss or a gradient on any rank (the step was skipped)
    stop_signal: int = 0   # a stop signal any rank had received before this step's scalar reduction (0: none)


@dataclass
class StepScalars:
    """What the step's ONE scalar all-reduce agrees on over the world (`reduce_step_scalars`)."""

    loss: float       # the sum of every rank's loss contribution (each backend makes it the global mean)
    tokens: int       # the sum of every rank's counted targets (the loss normaliser, confirmed)
    grad_sq: float    # the sum of every rank's (owned) squared gradient norms
    nonfinite: bool   # inf/nan on any rank
    stop_signal: int  # the largest stop signal any rank had received, 0 if none


def reduce_step_scalars(loss, tokens, grad_sq, stop_signal, device, group=None) -> StepScalars:
    """Loss, token count, squared gradient norm, non-finite flag and stop signal of one step in a single
    float64 all-reduce (SUM over `group`, default the world): the step's only scalar collective and its only
    host sync. `loss` and `grad_sq` may be device tensors (no sync before the collective); the non-finite flag
    is each rank's own check of its loss and gradient sum, so a NaN anywhere skips the step everywhere."""
    def f64(x):
        return x.detach().to(device=device, dtype=torch.float64).reshape(()) if torch.is_tensor(x) else \
            torch.tensor(float(x), dtype=torch.float64, device=device)

    loss_t, sq_t = f64(loss), f64(grad_sq)
    bad = (~torch.isfinite(loss_t) | ~torch.isfinite(sq_t)).to(torch.float64)
    received = int(stop_signal() if callable(stop_signal) else stop_signal)
    sig = torch.tensor([float(received == int(s)) for s in STOP_SIGNALS], dtype=torch.float64, device=device)
    vec = torch.cat([torch.stack([loss_t, f64(tokens), sq_t, bad]), sig])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(vec, group=group)
    v = vec.tolist()
    got = [s for s, n in zip(STOP_SIGNALS, v[4:]) if n > 0]
    return StepScalars(loss=v[0], tokens=int(round(v[1])), grad_sq=v[2], nonfinite=v[3] > 0 or not math.isfinite(v[0])
                       or not math.isfinite(v[2]), stop_signal=int(max(got)) if got else 0)


class LossScaler(Protocol):
    """fp16 loss scaling as the Trainer and the Checkpointer see it (engine/amp.py, or DeepSpeed's)."""

    @property
    def scale(self) -> float: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Backend(ABC):
    name: str
    module: torch.nn.Module  # this rank's (partitioned) model
    named_trainable: list[tuple[str, torch.nn.Parameter]]  # set by the backend's constructor
    scaler: LossScaler | None = None

    @classmethod
    def check_supported(cls, cfg) -> None:
        """ConfigError when this backend refuses `cfg` on this machine; runs in the launching process before
        any rank starts, so it must be cheap (no heavy imports)."""

    @abstractmethod
    def train_step(self, micro_batches: list[Batch], lr: float, loss_fn=None, stop_signal=0) -> StepResult:
        """Forward/backward over this rank's micro-batches, gradient reduction, optimizer step. `loss_fn`: a
        user's per-micro-batch loss (engine/loss.py), None = causal-LM cross-entropy. `stop_signal`: a stop
        signal this rank received (0: none) or a function returning it (read at the step's scalar reduction),
        agreed over the world there and returned in StepResult.stop_signal."""

    @abstractmethod
    def eval_loss(self, micro_batches: list[Batch], loss_fn=None) -> float:
        """Mean token loss over the global batch, no gradients."""

    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(FQN, parameter) of what this rank trains, as the backend set it up (`named_trainable`)."""
        return self.named_trainable

    @abstractmethod
    def memory_report(self) -> dict:
        """Bytes on this rank by category, measured from live tensors and the live optimizer (keys as the
        estimator's: params, grads, optimizer_states, master_weights, trainable_params, ...)."""

    @property
    def loss_scaler(self) -> LossScaler | None:
        """The fp16 loss scaler (None unless precision.dtype='fp16'): the backend's `scaler`."""
        return self.scaler

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write model and optimizer state (every rank its part) into `directory`, inside the Checkpointer's
        atomic step-N flow."""

    def check_state(self, directory: Path) -> None:
        """Refuse (CheckpointError) a checkpoint state directory holding any pickle that could run code, before
        any rank loads it (engine/checkpoint/safe_load.py)."""
        check_state_dir(directory)

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Read back what `save` wrote (possibly on another layout, where the backend supports it)."""
