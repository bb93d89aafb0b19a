"""The seam between the Trainer (data, schedule, metrics, checkpoints, signals) and whatever runs the
forward/backward/optimizer step: the native torch stack or DeepSpeed's engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..data import Batch


@dataclass
class StepResult:
    loss: float            # mean token loss over the global batch (same value on every rank)
    grad_norm: float       # before clipping; nan when the step was skipped
    skipped: bool          # fp16 overflow: no parameter or optimizer state changed
    loss_scale: float | None  # fp16: the scale after this step's update (what the next step uses)
    tokens: int            # tokens in the global batch


class TrainingBackend(ABC):
    name: str

    @abstractmethod
    def train_step(self, micro_batches: list[Batch], lr: float) -> StepResult:
        """Forward/backward over this rank's micro-batches, gradient reduction, optimizer step."""

    @abstractmethod
    def eval_loss(self, micro_batches: list[Batch]) -> float:
        """Mean token loss over the global batch, no gradients."""

    @abstractmethod
    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        ...

    @abstractmethod
    def memory_report(self) -> dict:
        """Bytes on this rank by category, measured from live tensors and the live optimizer."""

    # Checkpointing hooks; engine/checkpoint.py drives them.
    def state_dict(self) -> dict:  # pragma: no cover - backend specific
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:  # pragma: no cover - backend specific
        raise NotImplementedError
