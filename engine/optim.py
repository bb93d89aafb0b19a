"""Optimizers over trainable parameters only, and the LR schedule (linear warmup + cosine/linear/constant)."""

from __future__ import annotations

import math

import torch

from trellis.errors import ConfigError


def lr_at(step: int, t) -> float:
    """LR for optimizer step `step` (0-based) under train config `t`."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    decay_steps = max(t.steps - t.warmup_steps, 1)
    progress = min(max(step - t.warmup_steps, 0) / decay_steps, 1.0)
    if t.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        factor = 1.0 - progress
    floor = min_lr(t)
    return floor + (t.lr - floor) * factor


def min_lr(t) -> float:
    """The schedule's floor: an absolute train.min_lr when set (> 0) wins; else train.min_lr_ratio x train.lr (it
    follows any lr, e.g. a DeepSpeed JSON's)."""
    return t.min_lr if t.min_lr > 0 else t.min_lr_ratio * t.lr


def param_groups(params: list[torch.nn.Parameter], names: list[str], weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors), the usual LM recipe."""
    decay, no_decay = [], []
    for p, n in zip(params, names):
        (no_decay if p.ndim < 2 or n.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(named_params: list[tuple[str, torch.nn.Parameter]], t, allow_empty: bool = False) -> torch.optim.Optimizer:
    """`allow_empty`: a pipeline stage may hold no trainable parameter (e.g. prompt tuning's virtual tokens
    live on the first stage only); it then gets an optimizer with one empty group."""
    names = [n for n, _ in named_params]
    params = [p for _, p in named_params]
    groups = param_groups(params, names, t.weight_decay)
    if not groups:
        if not allow_empty:
            raise ConfigError("no trainable parameters on this rank; check peft.target_modules and the layout")
        groups = [{"params": [], "weight_decay": 0.0}]
    if t.optimizer == "adamw":
        # foreach=False: the per-tensor loop is the reference implementation, bit-stable across layouts.
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=False)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr)
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("train.optimizer='adamw8bit' needs bitsandbytes: pip install 'trellis-train[peft]'") from None
        return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, min_8bit_size=0)
    raise ConfigError(f"train.optimizer={t.optimizer!r} is not supported")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
