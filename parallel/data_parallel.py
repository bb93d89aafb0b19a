"""Data parallel and ZeRO over the mesh's "dp" axis.

Semantics (what each stage keeps per dp rank; Ψ = trainable parameters on this rank's tp/pp shard):
- ZeRO-0: params, grads and optimizer state replicated; grads all-reduced (sum) over dp.
- ZeRO-1: params and grads replicated, grads all-reduced; each dp rank owns a subset of whole parameters
  (greedy balance by size) and keeps optimizer state only for those; after its step it broadcasts the
  updated parameters to the other dp ranks. Optimizer state ≈ 8Ψ/dp bytes (whole-tensor granularity).
- ZeRO-2: FSDP2 `fully_shard(reshard_after_forward=False)`: params, grads and optimizer state sharded;
  the gathered params stay between forward and backward (no re-gather in backward).
- ZeRO-3: FSDP2 `fully_shard(reshard_after_forward=True)`: like ZeRO-2 but params are re-sharded after
  each block's forward and gathered again for backward.
- CPU offload (ZeRO-3 only natively): FSDP2 CPUOffloadPolicy (params, grads, optimizer step on CPU), in
  page-locked memory with zero.pin_memory (needs a GPU).

Gradients are always reduced in fp32 and summed (the loss is already normalised by the global token
count), never averaged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from trellis.errors import ConfigError

from .models.base import FamilySpec
from .quant4bit import is_quantized_param


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ReplicatedGradSync:
    """ZeRO-0/1 gradient all-reduce over dp, overlapped with the backward (what torch DDP's reducer does).

    The trainable parameters are cut into buckets of about `bucket_mb` MB in reverse order (the order the
    backward produces their gradients). When the backward of the step's last micro-batch runs (`arm()`), each
    parameter's post-accumulate-grad hook marks it ready; a bucket whose parameters are all ready is flattened
    (one fp32 buffer per dtype) and all-reduced asynchronously while the backward goes on. Buckets are
    launched strictly in index order, so every rank issues the same collectives in the same order whatever
    order its hooks fire in. `sync()` after the backward launches what is left (parameters without a gradient
    this step are left out, as on every rank), waits, and copies the sums back. Without `arm()` (gradient
    accumulation's earlier micro-batches, pipeline stages) `sync()` reduces everything after the backward."""

    def __init__(self, params: list[torch.nn.Parameter], dp_group, dp_size: int, bucket_mb: float = 25.0):
        self.group = dp_group
        self.dp_size = dp_size
        self.buckets: list[list[torch.nn.Parameter]] = []
        cap, size = bucket_mb * 2 ** 20, 0.0
        for p in reversed(params):
            if not self.buckets or size >= cap:
                self.buckets.append([])
                size = 0.0
            self.buckets[-1].append(p)
            size += local(p).numel() * 4
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._armed = False
        self._ready: list[int] = [0] * len(self.buckets)
        self._next = 0  # the next bucket to launch
        self._pending: list[tuple] = []
        self._hooks = []
        if dp_size > 1:
            self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def arm(self) -> None:
        """The coming backward is the step's last: reduce buckets as their gradients complete."""
        self._armed = self.dp_size > 1
        self._ready = [0] * len(self.buckets)
        self._next = 0
        self._pending = []

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if not self._armed:
            return
        i = self._bucket_of[id(p)]
        if i < self._next:  # a second backward after arm(): this bucket's sum went out without it
            raise RuntimeError(f"gradient sync: a gradient arrived after its bucket {i} was all-reduced (a "
                               "second backward in the step's last micro-batch); reduce after it instead")
        self._ready[i] += 1
        while self._next < len(self.buckets) and self._ready[self._next] == len(self.buckets[self._next]):
            self._launch(self._next)
            self._next += 1

    @torch.no_grad()
    def _launch(self, i: int) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.buckets[i]:
            if p.grad is not None:
                g = local(p.grad)
                by_dtype.setdefault(g.dtype, []).append(g)
        for gs in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in gs])
            self._pending.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, gs))

    @torch.no_grad()
    def sync(self) -> None:
        if self.dp_size == 1:
            return
        if not self._armed:
            self.arm()
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1
        for work, flat, gs in self._pending:
            work.wait()
            offset = 0
            for g in gs:
                n = g.numel()
                g.copy_(flat[offset: offset + n].view_as(g))
                offset += n
        self._pending = []
        self._armed = False


class ZeroOneOptimizer:
    """ZeRO-1: optimizer state sharded over dp by parameter ownership; params re-broadcast after step."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], build_optimizer, dp_group, dp_size: int):
        self.group = dp_group
        self.dp_size = dp_size
        self.dp_rank = dist.get_rank(dp_group)
        self.named_params = named_params
        loads = [0] * dp_size
        self.owner: list[int] = []
        # Largest first for balance, ties broken by position: deterministic on every rank.
        order = sorted(range(len(named_params)), key=lambda i: (-local(named_params[i][1]).numel(), i))
        owner = [0] * len(named_params)
        for i in order:
            r = min(range(dp_size), key=lambda k: (loads[k], k))
            owner[i] = r
            loads[r] += local(named_params[i][1]).numel()
        self.owner = owner
        mine = [np for np, o in zip(named_params, owner) if o == self.dp_rank]
        self.inner = build_optimizer(mine) if mine else None
        self._src = [dist.get_global_rank(dp_group, o) for o in owner]

    @property
    def param_groups(self):
        return self.inner.param_groups if self.inner is not None else []

    @property
    def state(self):
        return self.inner.state if self.inner is not None else {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, p in self.named_params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if self.inner is not None:
            self.inner.step()
        works = [dist.broadcast(local(p.data), src=src, group=self.group, async_op=True)
                 for (_, p), src in zip(self.named_params, self._src)]
        for w in works:
            w.wait()

    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, sd: dict) -> None:
        if self.inner is not None:
            self.inner.load_state_dict(sd)


def apply_fsdp(model: torch.nn.Module, blocks: list[torch.nn.Module], dp_mesh, *, stage: int, compute_dtype: torch.dtype,
               cpu_offload: bool, pin_memory: bool = False) -> None:
    """ZeRO-2/3 via FSDP2: one FSDP unit per decoder block plus the root (embeddings, norm, head).
    `pin_memory` (zero.pin_memory): the CPU-offloaded shards in page-locked memory (faster host <-> GPU copies).
    torch can pin only with an accelerator ("Cannot access accelerator device when none is available"), so
    on a CPU-only machine that is a ConfigError naming the key."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if cpu_offload and pin_memory and not torch.accelerator.is_available():
        raise ConfigError("zero.pin_memory=true with CPU offload needs an accelerator: page-locked host memory "
                          "speeds up host <-> GPU copies and torch cannot pin without a GPU; set "
                          "zero.pin_memory=false on a CPU-only machine")

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=pin_memory) if cpu_offload else OffloadPolicy()
    reshard = stage == 3
    # A QLoRA base's packed 4-bit weights (bitsandbytes Params4bit: uint8 data + quant_state) cannot be
    # split row-wise by FSDP2, are frozen and are already 1/8 of fp32: they stay whole on every dp rank;
    # the adapters (and the rest of the model) are sharded as usual.
    packed = {p for p in model.parameters() if is_quantized_param(p)} or None
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload,
                    ignored_params=packed)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload,
                ignored_params=packed)
    for m in [*blocks, model]:
        m.set_gradient_divide_factor(1.0)  # sum: the loss is normalised by the global token count
        m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)


def decoder_blocks(model: torch.nn.Module, spec: FamilySpec) -> list[torch.nn.Module]:
    layers = model.get_submodule(spec.layers)
    return list(layers.values()) if isinstance(layers, torch.nn.ModuleDict) else list(layers)
