"""Measure per-rank memory from live objects, in the same keys as the estimator's JSON.

Used to validate `engine/memory/estimator.py` against reality: parameters and gradients from live tensors (DTensor
shards via `.to_local()`), optimizer state by walking `optimizer.state`, and activations as the bytes of the
unique storages autograd saves for backward (`torch.autograd.graph.saved_tensors_hooks`). Parameter
storages are excluded from activations: autograd saves weights by reference, they are not new memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


from trellis.parallel.quant4bit import is_quantized_param
from trellis.parallel.data_parallel import local as _local


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def _quant_state_bytes(p: torch.Tensor) -> int:
    qs = p.quant_state
    n = _nbytes(qs.absmax)
    if getattr(qs, "nested", False) and getattr(qs, "state2", None) is not None:
        n += _nbytes(qs.state2.absmax) + _nbytes(qs.offset)
    return n


def param_bytes(model: torch.nn.Module) -> dict:
    """Bytes of this rank's parameters: total, by dtype, trainable vs frozen (4-bit constants included)."""
    by_dtype: dict[str, int] = {}
    trainable = frozen = 0
    for p in model.parameters():
        n = _nbytes(p)
        if is_quantized_param(p):
            n += _quant_state_bytes(p)
            key = "4bit"
        else:
            key = str(_local(p).dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + n
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return {"total": trainable + frozen, "by_dtype": by_dtype, "trainable": trainable, "frozen": frozen}


def grad_bytes(model: torch.nn.Module) -> int:
    return sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer) -> int:
    """Every tensor in `optimizer.state` (Adam m and v, 8-bit quantization constants), local shards only.

    0-dim `step` counters are excluded: they are bookkeeping, not per-parameter state.
    """
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0:
                total += _nbytes(v)
    return total


def _is_param_cast(t: torch.Tensor, param_shapes: set) -> bool:
    """A low-precision copy of a weight made by autocast (kept for backward), not an activation.

    Trainable weight: its grad_fn is the cast (ToCopy, possibly through a transpose) of a leaf. Frozen
    weight: the copy has no autograd history; it is recognised by a parameter's shape (either orientation),
    so measurements must use a token count that is not a parameter dimension."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in ("TBackward0", "TransposeBackward0", "PermuteBackward0"):
        fn = fn.next_functions[0][0]
    if fn is not None:
        return type(fn).__name__ == "ToCopyBackward0" and \
            type(fn.next_functions[0][0]).__name__ == "AccumulateGrad"
    return (not t.requires_grad and t.is_floating_point() and t.dim() == 2 and t.dtype != torch.float32
            and tuple(t.shape) in param_shapes)


@dataclass
class SavedTensorMeter:
    """Counts the unique storages autograd saves while active; `peak` = their bytes at end of forward.

    Only storages that are not parameters count (weights are saved by reference). Autocast's 16-bit weight
    copies are counted apart (`weight_copies`: the estimator lists them under buffers). Inputs held by
    activation-checkpointed modules (`module._trellis_checkpointed`) count as activations: the checkpoint
    keeps them alive for the recompute. Call inside forward only: the saved tensors are freed by backward,
    so their total right before backward is the peak (recomputation inside backward is not seen).
    """

    exclude: set[int] = field(default_factory=set)
    param_shapes: set = field(default_factory=set)
    checkpointed: list = field(default_factory=list)
    storages: dict[int, int] = field(default_factory=dict)
    by_dtype: dict[str, int] = field(default_factory=dict)
    weight_copies: int = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "SavedTensorMeter":
        ex, shapes = set(), set()
        for p in model.parameters():
            lp = _local(p.data)
            ex.add(lp.untyped_storage().data_ptr())
            if lp.dim() == 2:
                shapes.update({tuple(lp.shape), tuple(lp.shape[::-1])})
        for b in model.buffers():
            ex.add(b.untyped_storage().data_ptr())
        ckpt = [m for m in model.modules() if getattr(m, "_trellis_checkpointed", False)]
        return cls(exclude=ex, param_shapes=shapes, checkpointed=ckpt)

    def _add(self, t: torch.Tensor) -> None:
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return  # a weight or a view of it (e.g. FSDP2's unsharded params, registered during forward)
        lt = _local(t)
        if lt.device.type == "meta" or lt.numel() == 0:
            return
        st = lt.untyped_storage()
        key = st.data_ptr()
        if key in self.exclude or key in self.storages:
            return
        self.exclude.add(key)
        if _is_param_cast(t, self.param_shapes):
            self.weight_copies += st.nbytes()
            return
        self.storages[key] = st.nbytes()
        d = str(lt.dtype).removeprefix("torch.")
        self.by_dtype[d] = self.by_dtype.get(d, 0) + st.nbytes()

    def _pack(self, t: torch.Tensor):
        self._add(t)
        return t

    def _checkpoint_inputs(self, module, args, kwargs) -> None:
        for a in (*args, *kwargs.values()):
            for x in (a if isinstance(a, (tuple, list)) else (a,)):
                if torch.is_tensor(x) and x.is_floating_point():
                    self._add(x)

    @contextlib.contextmanager
    def track(self):
        handles = [m.register_forward_pre_hook(self._checkpoint_inputs, with_kwargs=True) for m in self.checkpointed]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in handles:
                h.remove()

    @property
    def peak(self) -> int:
        return sum(self.storages.values())


def measure_model_states(model: torch.nn.Module, optimizer=None) -> dict:
    """Per-rank model-state bytes with the estimator's keys (params, grads, optimizer_states, ...).

    Call after backward (grads live) and after one optimizer step (state allocated). `master_weights` is
    what an optimizer wrapper keeps as fp32 copies outside `optimizer.state` (exposed as `master_params`);
    the native backend keeps none: its fp32 params are the master weights.
    """
    pb = param_bytes(model)
    opt_bytes = optimizer_state_bytes(optimizer) if optimizer is not None else 0
    master = 0
    for p in getattr(optimizer, "master_params", []) or []:
        master += _nbytes(p)
    return {
        "params": pb["total"],
        "params_by_dtype": pb["by_dtype"],
        "trainable_params": pb["trainable"],
        "grads": grad_bytes(model),
        "optimizer_states": opt_bytes,
        "master_weights": master,
    }
