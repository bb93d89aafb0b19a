"""The seam between the Trainer (data, schedule, metrics, checkpoint cadence, signals) and whatever runs the
forward/backward/optimizer step: the native torch stack or DeepSpeed's engine.

A backend owns the partitioned model, the optimizer and (fp16) the loss scaler; the Trainer and the
Checkpointer use it only through this interface.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..checkpoint.safe_load import check_state_dir
from ..data import Batch


@dataclass
class StepResult:
    loss: float            # mean token loss over the global batch (same value on every rank)
    grad_norm: float       # before clipping; nan when the step was skipped
    skipped: bool          # fp16 overflow: no parameter or optimizer state changed
    loss_scale: float | None  # fp16: the scale after this step's update (what the next step uses)
    tokens: int            # tokens in the global batch
    lr: float = math.nan   # the learning rate of this step (set by the Engine, engine/api.py)


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
    def train_step(self, micro_batches: list[Batch], lr: float, loss_fn=None) -> StepResult:
        """Forward/backward over this rank's micro-batches, gradient reduction, optimizer step. `loss_fn`: a
        user's per-micro-batch loss (engine/loss.py), None = causal-LM cross-entropy."""

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
