"""AdaLoRA's two training-time mechanisms, which injecting peft's SVD layers alone does not run.

1. The orthogonal regulariser peft's `AdaLoraModel.forward` adds to the loss:
   orth_reg_weight * mean over every lora_A / lora_B of ||P Pᵀ - I||_F (A: P = A, B: P = Bᵀ).
2. The budget schedule: peft's own `RankAllocator` driven by peft's own `AdaLoraModel.update_and_allocate`
   (called here unbound on a small holder with the attributes it reads), after optimizer.step and before
   zero_grad, with grads present: importance EMAs of |p · grad|, lora_E entries of the least important
   triplets zeroed to a cubic budget between tinit and total_step - tfinal, the final mask re-applied after.

Correct only where every rank holds whole adapter tensors and whole (dp-summed) grads: tp = 1, pp = 1 and
native ZeRO-0/1 (any dp: the grads are all-reduced, so every dp rank computes the same importance and the
same masks). `check_layout` refuses the rest before training.
"""

from __future__ import annotations

import torch

from trellis.configs.validate import adalora_layout_errors
from trellis.errors import ConfigError

from .inject import build_peft_config

ADAPTER = "default"


def check_layout(cfg, tp: int, pp: int) -> None:
    """ConfigError unless the resolved layout is one where the rank allocator sees whole tensors and grads."""
    errors = adalora_layout_errors(cfg, tp, pp)
    if errors:
        raise ConfigError(errors)


class AdaLora:
    """The regulariser and the rank allocator for the adapters injected in `model` (attribute names are the
    ones peft's `AdaLoraModel.update_and_allocate` reads from `self`)."""

    def __init__(self, model: torch.nn.Module, peft_config):
        from peft.tuners.adalora import RankAllocator

        self.model = model
        self.trainable_adapter_name = ADAPTER
        self.peft_config = {ADAPTER: peft_config}
        self.rankallocator = RankAllocator(model, peft_config, ADAPTER)
        # the regulariser's matrices, listed once (tp = pp = 1, no FSDP: the parameter objects never change)
        self._orth = [("lora_A" in n, p) for n, p in model.named_parameters()
                      if ("lora_A" in n or "lora_B" in n) and ADAPTER in n]
        self.step = 0  # global step of the next update_and_allocate (0-based, as in peft's documented loop)

    def orth_reg(self) -> torch.Tensor | None:
        """orth_reg_weight × the mean ||P Pᵀ - I||_F, exactly as peft adds it to `outputs.loss`."""
        w = self.peft_config[ADAPTER].orth_reg_weight
        total = None
        for is_a, p in self._orth:
            cov = p @ p.T if is_a else p.T @ p
            eye = torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device)
            term = torch.norm(cov - eye, p="fro")
            total = term if total is None else total + term
        return None if not self._orth else w * (total / len(self._orth))

    def backward_orth_reg(self, scale: float, dp: int) -> float:
        """Backward of this rank's share of the regulariser (grads are summed over dp, so each dp rank adds
        1/dp of it); returns that share for the reported loss (its dp sum is peft's term)."""
        reg = self.orth_reg()
        if reg is None:
            return 0.0
        reg = reg / dp
        (reg * scale).backward()
        return float(reg.detach())

    @torch.no_grad()
    def update_and_allocate(self) -> None:
        from peft.tuners.adalora import AdaLoraModel

        AdaLoraModel.update_and_allocate(self, self.step)
        self.step += 1

    # ---- checkpoint state (replicated plain tensors: DCP saves one copy, loads on every rank) -----------
    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save and, filled in place by DCP, to load: step, importance EMAs, the final rank
        pattern (from total_step - tfinal on, the mask re-applied every step)."""
        ra = self.rankallocator
        out = {"step": torch.tensor([self.step], dtype=torch.int64)}
        for n, p in self.model.named_parameters():
            if "lora_" in n and ADAPTER in n:
                for d in (ra.exp_avg_ipt, ra.exp_avg_unc, ra.ipt):
                    d.setdefault(n, torch.zeros_like(p))  # what peft's update_ipt starts from
                out[f"exp_avg_ipt/{n}"] = ra.exp_avg_ipt[n]
                out[f"exp_avg_unc/{n}"] = ra.exp_avg_unc[n]
            if f"lora_E.{ADAPTER}" in n:
                pattern = self.peft_config[ADAPTER].rank_pattern
                keep = pattern[n] if pattern else [True] * p.shape[0]
                out[f"rank_pattern/{n}"] = torch.tensor(keep, dtype=torch.int8)
        out["has_rank_pattern"] = torch.tensor([int(bool(self.peft_config[ADAPTER].rank_pattern))])
        return out

    def load(self, st: dict[str, torch.Tensor]) -> None:
        """Take back what DCP loaded into `state()`'s tensors (the EMAs were loaded in place)."""
        self.step = int(st["step"].item())
        if int(st["has_rank_pattern"].item()):
            self.peft_config[ADAPTER].rank_pattern = {
                k.split("/", 1)[1]: v.bool().tolist() for k, v in st.items() if k.startswith("rank_pattern/")}


def build(cfg, spec, model: torch.nn.Module, tp: int, pp: int) -> AdaLora | None:
    """The AdaLoRA runtime for an `adalora` run (None otherwise), after the layout check."""
    if cfg.peft.method != "adalora":
        return None
    check_layout(cfg, tp, pp)
    return AdaLora(model, build_peft_config(cfg, spec, cfg.train.steps))
