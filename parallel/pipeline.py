"""Pipeline parallel with torch.distributed.pipelining: one stage per rank on the "pp" mesh axis.

A stage module keeps the ORIGINAL fully-qualified parameter names ("model.layers.3.mlp.up_proj.weight"):
the decoder-block ModuleList becomes a ModuleDict keyed by the original index and modules of other
stages are deleted, so checkpoints load on any layout. Tied input/output embeddings (GPT-2, OPT, BLOOM)
become two copies, on the first and the last stage; their gradients are summed across the pp group
before every optimizer step, so the copies stay identical. Modules that PEFT prompt learning replicates on
every stage (`PromptHooks.pp_replicated`: prefix tuning's encoder, each stage using the prefixes of its own
layers) are handled the same way.

Schedules (`parallel.pp_schedule`): GPipe and 1F1B run one stage per rank; interleaved 1F1B and the
zero-bubble schedules run two virtual stages per rank. Interleaved 1F1B and interleaved zero bubble (ZB1P)
place them round-robin (rank r holds stages r and r + pp); ZBV and DualPipeV place them as a V (stages r and
2pp - 1 - r), so rank 0 holds both the first and the last stage: a tied embedding's two copies then live on
one rank and their gradients add locally. The zero-bubble schedules split each backward into an input-gradient
pass (sent upstream at once) and a weight-gradient pass run later to fill the bubble (torch's
stage_backward_input / stage_backward_weight); torch refuses them for compiled stages.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from trellis.configs.validate import ZERO_BUBBLE_SCHEDULES
from trellis.errors import ConfigError

from . import stage_forward
from .models.base import FamilySpec
from .prompt_hooks import PromptHooks

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev")
# ZERO_BUBBLE_SCHEDULES (configs/validate.py): split backward, input grads first, weight grads later
V_SCHEDULES = ("zbv", "dualpipev")  # stages r and 2pp - 1 - r on rank r
TWO_STAGE_SCHEDULES = ("interleaved_1f1b", *ZERO_BUBBLE_SCHEDULES)  # two virtual stages per rank


def stage_ids_for(schedule: str, rank: int, pp: int) -> list[int]:
    """The global stage indices rank `rank` runs: [rank]; [rank, rank + pp] (round-robin); [rank, 2pp - 1 - rank]
    (V placement)."""
    if schedule in V_SCHEDULES:
        return [rank, 2 * pp - 1 - rank]
    if schedule in TWO_STAGE_SCHEDULES:
        return [rank, rank + pp]
    return [rank]


def split_layers(num_layers: int, pp: int, mode: str, layer_params: list[int] | None = None,
                 first_extra: int = 0, last_extra: int = 0) -> list[range]:
    """Layer ranges per stage: "even" by count, "params" balancing parameter counts (embedding counted on
    the first stage, head on the last), or explicit split points "2,4"."""
    if pp > num_layers:  # refused before: parallel/dims.py validate_model_dims
        raise ValueError(f"{pp} stages for {num_layers} layers")
    if mode == "even":
        base, rem = divmod(num_layers, pp)
        sizes = [base + (1 if s < rem else 0) for s in range(pp)]
    elif mode == "params":
        if layer_params is None:
            raise ValueError("params split needs layer_params")
        sizes = _balance(layer_params, pp, first_extra, last_extra)
    else:
        try:
            points = [int(x) for x in mode.split(",")]
        except ValueError:
            raise ConfigError(f"parallel.pp_split={mode!r}: use 'even', 'params' or layer indices like '2,4'") from None
        if len(points) != pp - 1 or points != sorted(set(points)) or points[0] <= 0 or points[-1] >= num_layers:
            raise ConfigError(f"parallel.pp_split={mode!r}: need {pp - 1} increasing split points between 1 and "
                              f"{num_layers - 1} for {pp} stages of {num_layers} layers")
        bounds = [0, *points, num_layers]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    return out


def _balance(layer_params: list[int], pp: int, first_extra: int, last_extra: int) -> list[int]:
    """Contiguous partition minimising the largest stage (every stage gets >= 1 layer)."""
    n = len(layer_params)
    best: tuple[int, list[int]] | None = None

    def cost(sizes: list[int]) -> int:
        i, worst = 0, 0
        for s, size in enumerate(sizes):
            c = sum(layer_params[i:i + size]) + (first_extra if s == 0 else 0) + (last_extra if s == pp - 1 else 0)
            worst, i = max(worst, c), i + size
        return worst

    def rec(prefix: list[int], remaining: int, stages_left: int):
        nonlocal best
        if stages_left == 1:
            sizes = prefix + [remaining]
            c = cost(sizes)
            if best is None or c < best[0]:
                best = (c, sizes)
            return
        for k in range(1, remaining - stages_left + 2):
            rec(prefix + [k], remaining - k, stages_left - 1)

    rec([], n, pp)
    return best[1]


class StageModule(nn.Module):
    """This rank's part of the model, with the original parameter names."""

    def __init__(self, model: nn.Module, spec: FamilySpec, layer_range: range, is_first: bool, is_last: bool,
                 prompt: PromptHooks | None = None):
        super().__init__()
        prompt = prompt or PromptHooks()
        self.spec = spec
        self.is_first, self.is_last = is_first, is_last
        self.config = model.config
        layers = model.get_submodule(spec.layers)
        kept = nn.ModuleDict({str(i): layers[i] for i in layer_range})
        parent_path, _, attr = spec.layers.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, kept)
        # PEFT virtual tokens (PromptHooks): embeds -> [virtual | embeds], first stage only
        self.input_prefix = prompt.input_prefix if is_first else None
        self.virtual_tokens = prompt.virtual_tokens  # every stage: its masks and positions cover them
        # PEFT prefix tuning (PromptHooks): per-layer key/value prefixes on every stage
        self.kv_prefix = prompt.kv_prefix
        self.prefix_len = prompt.prefix_len
        self.pp_replicated = tuple(prompt.pp_replicated)
        # context parallel: this rank's sequence chunk; the (segment_ids, position_ids) cover the whole sequence
        self.cp = getattr(model, "trellis_cp", None)
        drop = []
        if not is_first:
            drop += [spec.embed_tokens, spec.position_embedding, spec.embed_norm, *prompt.first_stage_only]
        if not is_last:
            drop += [spec.final_norm, spec.lm_head]
        for path in filter(None, drop):
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, None)
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_block_list", list(kept.values()))  # not registered twice

    def forward(self, x: torch.Tensor, segment_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None):
        """x: input ids (first stage) or hidden states. Packed batches: (segment_ids, position_ids) come with x
        (integer tensors, no grad: the schedule sends them on and sends no gradient back) and go on to the
        next stage with the hidden states."""
        h = stage_forward.embed(self, self.spec, x, segment_ids, position_ids) if self.is_first else x
        h = stage_forward.run_blocks(self, self.spec, self._block_list, h, segment_ids, position_ids)
        if self.is_last:
            return stage_forward.head(self, self.spec, h)
        return h if segment_ids is None else (h, segment_ids, position_ids)


class StageUnion(nn.Module):
    """Several stage modules of one rank (interleaved 1F1B's virtual stages) seen as ONE module with the
    original parameter names: the optimizer, grad sync, clipping, checkpoints (DCP, FQN keys) and the memory
    report use it. It shares the stages' submodules (so FSDP2's per-module state-dict hooks still fire) and
    has no forward: the pipeline schedule runs the stage modules themselves."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        merged = _merge_modules(stages, "")
        for name, child in merged.named_children():
            self.add_module(name, child)

    def forward(self, *args, **kwargs):
        raise RuntimeError("StageUnion is a parameter view; the pipeline schedule runs the stage modules")


def _has_state(m: nn.Module, recurse: bool) -> bool:
    if any(True for _ in m.parameters(recurse=recurse)):
        return True
    return any(n not in m._non_persistent_buffers_set for n, _ in m.named_buffers(recurse=False))


def _merge_modules(mods: list[nn.Module], path: str) -> nn.Module:
    """One module tree holding every stage's state under the names it has in the full model. A path present
    in several stages must be a stateless module (rotary tables, dropout) or a container (the decoder
    block ModuleDict, the backbone) whose children are merged; parameters of one name on two stages would
    make the names ambiguous and are refused."""
    if len(mods) == 1:
        return mods[0]
    if not any(_has_state(m, recurse=True) for m in mods):
        return mods[0]
    if any(_has_state(m, recurse=False) for m in mods):
        raise RuntimeError(f"{path or 'the stage root'} holds parameters on more than one virtual stage")
    shell = nn.ModuleDict() if all(isinstance(m, nn.ModuleDict) for m in mods) else nn.Module()
    names: list[str] = []
    for m in mods:
        names += [n for n, c in m._modules.items() if c is not None and n not in names]
    for name in names:
        subs = [m._modules[name] for m in mods if m._modules.get(name) is not None]
        shell.add_module(name, _merge_modules(subs, f"{path}.{name}" if path else name))
    return shell


class Pipeline:
    """This rank's stages: one, or two virtual stages (rank and rank + pp) for interleaved 1F1B."""

    def __init__(self, stages: list[StageModule], stage_ids: list[int], num_stages: int, pp_mesh, *,
                 schedule: str, n_microbatches: int, loss_fn, device, tied: bool):
        self.stage_module = stages[0]
        self.stage_modules = list(stages)
        self.stage_ids = stage_ids
        self.num_stages = num_stages
        self.pp_mesh = pp_mesh
        self.pp_group = pp_mesh.get_group()
        self.pp_rank = pp_mesh.get_local_rank()
        self.pp = pp_mesh.size()
        self.is_first = any(m.is_first for m in stages)
        self.is_last = any(m.is_last for m in stages)
        self.schedule_name = schedule
        self.n_microbatches = n_microbatches
        self.loss_fn = loss_fn
        self.device = device
        self.tied = tied
        self._schedule = None

    # --- built after the caller wrapped the stage (activation checkpointing, FSDP2) ---------------
    def make_schedule(self) -> None:
        from torch.distributed import pipelining as pl

        def stages():
            return [pl.PipelineStage(m, i, self.num_stages, self.device, group=self.pp_group)
                    for m, i in zip(self.stage_modules, self.stage_ids)]

        kw = dict(n_microbatches=self.n_microbatches, loss_fn=self.loss_fn, scale_grads=False)
        multi = {"interleaved_1f1b": pl.ScheduleInterleaved1F1B, "interleaved_zb": pl.ScheduleInterleavedZeroBubble,
                 "zbv": pl.ScheduleZBVZeroBubble, "dualpipev": pl.ScheduleDualPipeV}
        if self.schedule_name in multi:
            cls = multi[self.schedule_name]
            self._schedule = cls(stages(), **kw)
            if self.schedule_name in V_SCHEDULES:
                self._eval_schedule = _forward_only(cls(stages(), **kw))
            else:
                self._eval_schedule = pl.ScheduleInterleaved1F1B(stages(), **kw)
        else:
            cls = pl.Schedule1F1B if self.schedule_name == "1f1b" else pl.ScheduleGPipe
            self._schedule = cls(stages()[0], **kw)
            self._eval_schedule = pl.ScheduleGPipe(stages()[0], **kw)

    def _run(self, schedule, input_ids: torch.Tensor, labels: torch.Tensor, layout: tuple = ()) -> float | None:
        """`layout`: () or the (segment_ids, position_ids) of a packed batch (parallel/attention.stage_layout)."""
        losses: list[torch.Tensor] = []
        if self.is_first and self.is_last:  # V placement: rank 0 runs the first and the last stage
            schedule.step(input_ids, *layout, target=labels, losses=losses)
        elif self.is_first:
            schedule.step(input_ids, *layout)
        elif self.is_last:
            schedule.step(target=labels, losses=losses)
        else:
            schedule.step()
        if not self.is_last:
            return None
        total = sum(float((x.full_tensor() if hasattr(x, "full_tensor") else x).detach()) for x in losses)
        return total

    def first_run(self, train: bool) -> bool:
        """True before the training schedule's first step: torch then runs its backward metadata inference,
        which on the last stage makes one extra loss call on (detached copies of) micro-batch 0 before the real
        micro-batches. An eval step (no backward) makes no such call, even as the schedule's first step."""
        if not train:
            return False
        s = self._schedule
        return not getattr(s, "_stage_backward_initialized", getattr(s, "_stages_backward_initialized", True))

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor, layout: tuple = ()) -> float | None:
        return self._run(self._schedule, input_ids, labels, layout)

    @torch.no_grad()
    def eval_step(self, input_ids: torch.Tensor, labels: torch.Tensor, layout: tuple = ()) -> float | None:
        losses: list[torch.Tensor] = []
        if self.is_first and self.is_last:  # V placement
            self._eval_schedule.eval(input_ids, *layout, target=labels, losses=losses)
            return sum(float((x.full_tensor() if hasattr(x, "full_tensor") else x).detach()) for x in losses)
        if self.is_first:
            self._eval_schedule.eval(input_ids, *layout)
            return None
        if self.is_last:
            self._eval_schedule.eval(target=labels, losses=losses)
            return sum(float((x.full_tensor() if hasattr(x, "full_tensor") else x).detach()) for x in losses)
        self._eval_schedule.eval()
        return None

    # --- parameters with a copy on several stages: tied embeddings, pp-replicated modules ----------
    def _tied_params(self) -> list[nn.Parameter]:
        """This rank's copies of a tied input/output embedding: the first stage's embedding and/or the last
        stage's head (both on rank 0 under the V placement)."""
        spec = self.stage_module.spec
        out = []
        for m in self.stage_modules:
            if m.is_first:
                out.append(m.get_submodule(spec.embed_tokens).weight)
            if m.is_last:
                out.append(m.get_submodule(spec.lm_head).weight)
        return out

    def _replicated_params(self) -> list[nn.Parameter]:
        m = self.stage_module
        return [p for path in m.pp_replicated for p in m.get_submodule(path).parameters() if p.requires_grad]

    @torch.no_grad()
    def sync_replicated_grads(self) -> None:
        """Sum over the pp group the gradients of every parameter with a copy on each stage: the tied
        weight of the first and last stage (pp == 2 when tied; under the V placement both copies are on rank 0
        and add locally) and the pp-replicated modules."""
        from torch.distributed.tensor import DTensor

        tied = self._tied_params() if self.tied else []
        local_pair = len(tied) == 2  # V placement: both copies here, their grads add locally
        params = ([] if local_pair else tied) + self._replicated_params()
        if local_pair and tied[0].requires_grad:  # a frozen tied embedding (PEFT) has no gradient to sync
            a, b = (self._grad_like_param(p) for p in tied)
            al, bl = (g.to_local() if isinstance(g, DTensor) else g for g in (a, b))
            al.add_(bl)
            bl.copy_(al)
        for p in params:
            if not p.requires_grad:  # a frozen tied embedding (PEFT) has no gradient to sync
                continue
            g = self._grad_like_param(p)
            dist.all_reduce(g.to_local() if isinstance(g, DTensor) else g, group=self.pp_group)

    @staticmethod
    def _grad_like_param(p: nn.Parameter) -> torch.Tensor:
        """p.grad (zeros if none), with p's sharding."""
        from torch.distributed.tensor import DTensor

        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad
        if isinstance(g, DTensor) and g.placements != p.placements:
            # a vocab-parallel embedding's grad can come back Replicate; match the weight's sharding
            g = g.redistribute(p.device_mesh, p.placements)
            p.grad = g
        return g

    def duplicate_params(self) -> list[nn.Parameter]:
        """Copies the gradient norm counts on another stage: the last stage's tied weight, and the
        pp-replicated modules everywhere but the first stage."""
        tied = self._tied_params() if self.tied else []
        out = tied[-1:] if self.is_last else []  # the last stage's head (under the V placement: rank 0's second)
        return out + (self._replicated_params() if self.pp_rank > 0 else [])


def _forward_only(schedule):
    """`schedule` (a V-placement runtime schedule) with its backward actions removed, for eval(): torch's V
    schedules hand a local stage's input gradient to its neighbour even when eval() disabled the backward
    (torch 2.13: "can't steal_bwd_input if this stage doesn't have backward"). Every rank drops the same actions
    from the same lowered order, so the forward sends and receives stay matched."""
    from torch.distributed.pipelining.schedules import _ComputationType as C

    keep = {C.FORWARD, C.SEND_F, C.RECV_F, C.UNSHARD, C.RESHARD}
    order = {}
    for rank, actions in schedule.pipeline_order_with_comms.items():
        out = []
        for a in actions:
            if a.computation_type == C.OVERLAP_F_B:  # DualPipeV: (forward, backward) of two stages
                out += [sub for sub in a.sub_actions if sub.computation_type in keep]
            elif a.computation_type in keep:
                out.append(a)
        order[rank] = out
    schedule.pipeline_order_with_comms = order
    return schedule


def build_stage_module(model: nn.Module, spec: FamilySpec, stage_idx: int, num_stages: int,
                       layer_range: range, prompt: PromptHooks | None = None) -> StageModule:
    """This stage's module (original FQNs); `model` is consumed (other stages' modules are deleted)."""
    return StageModule(model, spec, layer_range, is_first=stage_idx == 0, is_last=stage_idx == num_stages - 1,
                       prompt=prompt)


def _process_groups(model: nn.Module) -> dict[int, object]:
    """The ProcessGroups the model's modules keep (tensor-parallel linears and their shared input `f` hold
    the tp group) as a deepcopy memo: the copies share them (a ProcessGroup cannot be copied)."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for v in vars(m).values():
            inner = vars(v).values() if hasattr(v, "__dict__") and not isinstance(v, (nn.Module, torch.Tensor)) else ()
            for x in (v, *inner):
                if isinstance(x, dist.ProcessGroup):
                    memo[id(x)] = x
    return memo


def build_pipeline(model: nn.Module, spec: FamilySpec, pp_mesh, *, schedule: str, n_microbatches: int,
                   split_mode: str, loss_fn, prompt: PromptHooks | None = None) -> Pipeline:
    if schedule not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
    layers = model.get_submodule(spec.layers)
    n = len(layers)
    pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    # interleaved 1F1B / zero bubble: 2 virtual stages per rank, round-robin or V placement (stage_ids_for)
    # (layers and micro-batches per schedule: checked by parallel/dims.py validate_model_dims)
    stage_ids = stage_ids_for(schedule, rank, pp)
    num_stages = pp * len(stage_ids)
    layer_params = [sum(p.numel() for p in b.parameters()) for b in layers]
    first_extra = sum(p.numel() for p in model.get_submodule(spec.embed_tokens).parameters())
    last_extra = sum(p.numel() for p in model.get_submodule(spec.lm_head).parameters())
    ranges = split_layers(n, num_stages, split_mode, layer_params, first_extra, last_extra)
    tied = model.get_submodule(spec.lm_head).weight is model.get_submodule(spec.embed_tokens).weight
    if tied and pp > 2:
        raise ConfigError(f"parallel.pp={pp}: tied input/output embeddings ({spec.name}) are supported with "
                          "parallel.pp=2 only for now")
    if tied and num_stages - 1 in stage_ids:
        # The last stage keeps its own copy of the tied weight (equal values; grads summed each step).
        head = model.get_submodule(spec.lm_head)
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    # each virtual stage consumes its own copy of the model (copies made before any is cut)
    sources = [model] + [copy.deepcopy(model, memo=_process_groups(model)) for _ in stage_ids[1:]]
    stages = [build_stage_module(src, spec, i, num_stages, ranges[i], prompt) for src, i in zip(sources, stage_ids)]
    device = next(stages[0].parameters()).device
    return Pipeline(stages, stage_ids, num_stages, pp_mesh, schedule=schedule, n_microbatches=n_microbatches,
                    loss_fn=loss_fn, device=device, tied=tied)
