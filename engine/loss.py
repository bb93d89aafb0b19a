"""The per-micro-batch loss a backend runs: trellis' causal-LM cross-entropy, or a user's
`loss_fn(logits, batch) -> (loss_sum, n_tokens)` (the Python API, engine/api.py).

Normalisation is the backend's, not the loss function's: every backend divides each micro-batch's loss_sum by
the step's GLOBAL count of counted labels (labels != -100 over all micro-batches and dp ranks), taken before
the first forward (engine/data: global_token_count). It must be known before the first backward: the pipeline
schedule runs each micro-batch's backward inside its step and DeepSpeed's engine steps its optimizer inside
the micro-batch loop, so a normaliser known only after the last forward could not be applied. `n_tokens` is
therefore the loss function's own count, not used to normalise: a loss that weights tokens returns its
weighted sum and the engine still divides by the label count; positions a loss does not count must have
label -100 to leave the normaliser.

Tensor parallel: the logits are vocab-sharded DTensors. The default loss reads them inside torch's
`loss_parallel` (no gather). A user's loss gets the full-vocabulary logits (`DTensor.full_tensor()`: one
all-gather over tp of [b, s, V] per micro-batch, and the full logits held on every tp rank), unless it has
the attribute `vocab_parallel = True`: then it gets the sharded DTensor inside `loss_parallel`.
"""

from __future__ import annotations

from typing import Callable

import torch

from trellis.parallel.loss import causal_lm_loss_sum

from .data import Batch, map_tensors

LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, "int | torch.Tensor"]]


def takes_sharded_logits(loss_fn: LossFn | None) -> bool:
    """True when the loss reads vocab-sharded logits (the default loss, or one declaring vocab_parallel)."""
    return loss_fn is None or bool(getattr(loss_fn, "vocab_parallel", False))


def on_device(b: Batch, device) -> Batch:
    """`b` with every tensor (the extras too) on `device`."""
    return map_tensors(b, lambda v: v.to(device))


def micro_loss_sum(loss_fn: LossFn | None, logits: torch.Tensor, b: Batch) -> torch.Tensor:
    """The summed (unnormalised) loss of one micro-batch `b` (already on the logits' device)."""
    if loss_fn is None:
        return causal_lm_loss_sum(logits, b.labels)[0]
    if not takes_sharded_logits(loss_fn) and hasattr(logits, "full_tensor"):
        logits = logits.full_tensor()  # all-gather over tp: the user's loss sees every vocabulary column
    out = loss_fn(logits, b)
    if not (isinstance(out, tuple) and len(out) == 2 and torch.is_tensor(out[0]) and out[0].numel() == 1):
        raise TypeError(f"loss_fn must return (loss_sum: a scalar tensor, n_tokens), got {type(out).__name__}")
    return out[0].reshape(())


class PipelineFeed:
    """The micro-batches of the current step for the last pipeline stage's loss closure.

    torch's schedules call the loss once per micro-batch, with only that micro-batch's slice of the target
    (the labels). torch runs the loss inside the last stage's forward, and every schedule trellis runs (GPipe,
    1F1B, interleaved 1F1B, and the zero-bubble interleaved ZB / ZBV / DualPipeV, whose reordering is in the
    backward) runs a stage's forwards in micro-batch order 0, 1, ...; the feed hands out the step's micro-batches
    in that order and checks each against the labels the schedule passed, so an order it did not expect is an
    error, never a wrong loss."""

    def __init__(self, micro_batches: list[Batch], device, inference_call: bool = False):
        """`inference_call`: the schedule's first step, whose first loss call is torch's metadata inference on
        micro-batch 0 (Pipeline.first_run); it gets micro-batch 0 without advancing."""
        self._batches = micro_batches
        self._device = device
        self._next = 0
        self._inference_call = inference_call

    def take(self, labels: torch.Tensor) -> Batch:
        if self._inference_call:
            self._inference_call = False
            return self._check(on_device(self._batches[0], self._device), labels, 0)
        if self._next >= len(self._batches):
            raise RuntimeError(f"the pipeline schedule asked for a loss of micro-batch {self._next} of "
                               f"{len(self._batches)}")
        b = self._check(on_device(self._batches[self._next], self._device), labels, self._next)
        self._next += 1
        return b

    @staticmethod
    def _check(b: Batch, labels: torch.Tensor, i: int) -> Batch:
        if not torch.equal(b.labels, labels.to(b.labels.device)):
            raise RuntimeError(f"the pipeline schedule's loss call for micro-batch {i} got other labels: the "
                               "schedule's order is not the one trellis relies on")
        return b
