"""Preference training with the sigmoid DPO loss, built only on the public Engine API (engine/api.py).

A micro-batch of preference data (engine/data, data.packing="pad") holds micro_batch_size pairs as 2*mb rows:
rows [0, mb) the chosen, rows [mb, 2mb) the rejected responses of the same pairs, labels -100 on the prompt
and the padding. A row's log-probability is the sum of its response tokens' log-probs (labels != -100).

One DPO step is two Engine calls over the same micro-batches:
1. the reference pass, `engine.eval_loss(mbs, capture)` inside `engine.adapters_disabled()`: the same model
   with its PEFT adapters switched off is the reference (no second model in memory); for full fine-tuning,
   `reference.eval_loss(mbs, capture)` on a frozen second Engine partitioned exactly like the policy. The
   capturing loss keeps each row's log-prob where the loss runs (every tp rank, the last pipeline stage);
2. the policy step, `engine.train_step(mbs, dpo_loss)`, each micro-batch carrying its reference log-probs
   in `extra` (the PipelineFeed delivers extras to the last stage).

Normalisation: the engine divides every micro-batch's loss_sum by the step's global count of labels != -100
(engine/loss.py), while DPO is a mean over the global batch's pairs. The loss therefore returns its pair-loss
sum times (global counted tokens / global pairs), both known before the step, so the engine's division
leaves the mean over pairs.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .api import Engine, as_batches
from .backends import StepResult
from .data import Batch

IGNORE_INDEX = -100
_INDEX, _REF = "dpo_index", "dpo_ref_logps"


def row_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[rows] summed log-probs of each row's counted targets (labels != -100), in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = labels != IGNORE_INDEX
    tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def dpo_terms(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair loss, per-pair margin) of rows [chosen..., rejected...]: margin = beta((pc - rc) - (pr - rr)),
    loss = -logsigmoid(margin)."""
    n = policy.shape[0] // 2
    margin = beta * ((policy[:n] - ref[:n]) - (policy[n:] - ref[n:]))
    return -F.logsigmoid(margin), margin


@dataclasses.dataclass
class DPOResult:
    step: StepResult
    reward_margin: float
    reward_accuracy: float


def frozen_reference(engine: Engine) -> Engine:
    """Full fine-tuning's reference: a second Engine of the same config, hence the same seeded weights
    (cfg.model) partitioned exactly like the policy (the same mesh, tp plan, stages, ZeRO sharding), its
    parameters frozen. It is only ever run by eval_loss: its optimizer never steps, so it allocates no state;
    it holds no checkpointer."""
    cfg = dataclasses.replace(engine.cfg, checkpoint=dataclasses.replace(engine.cfg.checkpoint, dir=""),
                              train=dataclasses.replace(engine.cfg.train, epochs=0))  # steps already resolved
    ref = Engine(cfg, engine.ctx)
    for p in ref.model.parameters():
        p.requires_grad_(False)
    return ref


class DPO:
    """`train_step(micro_batches)` / `eval_loss(micro_batches)` of sigmoid DPO for an Engine. The reference:
    the same model with its adapters disabled when PEFT is on, else `reference` (default: frozen_reference)."""

    def __init__(self, engine: Engine, beta: float | None = None, reference: Engine | None = None):
        self.engine = engine
        self.beta = engine.cfg.train.dpo_beta if beta is None else beta
        if reference is None and engine.cfg.peft.method == "none":
            reference = frozen_reference(engine)
        self.reference = reference
        self._ref: dict[int, torch.Tensor] = {}
        self._stats: dict[int, torch.Tensor] = {}  # micro-batch index -> [margin sum, correct, pairs]

    # ---- the two loss functions (called per micro-batch where the loss runs) -------------------------------
    def _capture(self, logits: torch.Tensor, b: Batch):
        if (b.labels != IGNORE_INDEX).any():  # not the pipeline's label-less filler micro-batch
            self._ref[b.extra[_INDEX]] = row_logps(logits, b.labels).detach()
        return logits.sum() * 0.0, 0

    def _make_loss(self, norm: float):
        def dpo_loss(logits: torch.Tensor, b: Batch):
            if not (b.labels != IGNORE_INDEX).any():  # the pipeline's label-less filler (eval rounds)
                return logits.sum() * 0.0, 0
            losses, margin = dpo_terms(row_logps(logits, b.labels), b.extra[_REF].to(logits.device), self.beta)
            m = margin.detach().double()
            self._stats[b.extra[_INDEX]] = torch.stack([m.sum(), (m > 0).double().sum(),
                                                        torch.tensor(float(m.numel()), dtype=torch.float64)])
            return losses.sum() * norm, int((b.labels != IGNORE_INDEX).sum())

        return dpo_loss

    # ---- steps --------------------------------------------------------------------------------------------
    def _prepare(self, micro_batches, where: str) -> tuple[list[Batch], float]:
        """The micro-batches with their reference log-probs attached, and the pair-mean normaliser."""
        mbs = [dataclasses.replace(b, extra={**b.extra, _INDEX: i})
               for i, b in enumerate(as_batches(micro_batches, where))]
        for b in mbs:
            if b.input_ids.shape[0] % 2:
                raise ValueError(f"DPO: a micro-batch of {b.input_ids.shape[0]} rows; preference micro-batches "
                                 "hold chosen rows then rejected rows (data.type='preference')")
        self._ref.clear()
        with torch.no_grad():
            if self.reference is not None:
                self.reference.eval_loss(mbs, loss_fn=self._capture)
            else:
                with self.engine.adapters_disabled():
                    self.engine.eval_loss(mbs, loss_fn=self._capture)
        mbs = [dataclasses.replace(b, extra={**b.extra, _REF: self._ref.get(i)}) for i, b in enumerate(mbs)]
        counts = torch.tensor([sum(int((b.labels != IGNORE_INDEX).sum()) for b in mbs),
                               sum(b.input_ids.shape[0] // 2 for b in mbs)], dtype=torch.float64)
        dist.all_reduce(counts)  # every rank of a dp replica holds the same micro-batches: the ratio is global
        tokens, pairs = counts.tolist()
        return mbs, tokens / pairs

    def _metrics(self) -> tuple[float, float]:
        """Global (margin mean, accuracy): summed over the ranks that ran the loss (each tp rank counts its
        replica's pairs once more, in numerator and denominator alike)."""
        s = sum(self._stats.values()) if self._stats else torch.zeros(3, dtype=torch.float64)
        dist.all_reduce(s)
        self._stats.clear()
        margin_sum, correct, pairs = s.tolist()
        return (margin_sum / pairs, correct / pairs) if pairs else (math.nan, math.nan)

    def train_step(self, micro_batches) -> DPOResult:
        mbs, norm = self._prepare(micro_batches, "train_step")
        res = self.engine.train_step(mbs, loss_fn=self._make_loss(norm))
        return DPOResult(res, *self._metrics())

    def eval_loss(self, micro_batches) -> float:
        mbs, norm = self._prepare(micro_batches, "eval_loss")
        loss = self.engine.eval_loss(mbs, loss_fn=self._make_loss(norm))
        self._stats.clear()
        return loss
