"""The torch-native backend: DTensor TP, torch.distributed.pipelining PP, ZeRO-0/1 grad sync or FSDP2
ZeRO-2/3 over dp, autocast/FSDP mixed precision with fp32 master weights, the engine's loss scaler."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from trellis.parallel.attention import cp_model_inputs, model_inputs, stage_layout
from trellis.parallel.data_parallel import ReplicatedGradSync, ZeroOneOptimizer, local
from trellis.parallel.grad_norm import clip_grads_, owned_grad_sq, total_grad_norm
from trellis.parallel.loss import IGNORE_INDEX, causal_lm_loss_sum, loss_parallel_context
from trellis.parallel.parallelize import ParallelModel, parallelize

from ..checkpoint.safe_load import dcp_load
from ..checkpoint.storage import TrellisWriter, empty_copy as _empty_copy
from ..amp import DynamicLossScaler, autocast_context, compute_dtype
from ..data import Batch, global_token_count, local_token_count, map_tensors
from ..loss import LossFn, PipelineFeed, micro_loss_sum, on_device, takes_sharded_logits
from ..optim import build_optimizer, set_lr
from ..peft.adalora import build as build_adalora
from .base import Backend, StepResult, reduce_step_scalars


class NativeBackend(Backend):
    name = "native"

    def __init__(self, cfg, ctx, dims, model: torch.nn.Module, inject_peft=None):
        self.cfg = cfg
        self.ctx = ctx
        self.dims = dims
        self.mesh = dims.mesh
        self.dtype_name = cfg.precision.dtype
        self._norm = 1.0  # global token count of the current step (loss normaliser)
        self._scale = 1.0
        self._loss_fn: LossFn | None = None  # the current step's loss (None = causal-LM cross-entropy)
        self._feed: PipelineFeed | None = None  # the current step's micro-batches for the pipeline's loss
        self._grad_bytes = 0  # the most gradient bytes held at once (live .grad tensors, before zero_grad)
        self.pm: ParallelModel = parallelize(
            model, dims, cfg, compute_dtype=compute_dtype(self.dtype_name), inject_peft=inject_peft,
            loss_fn=self._pipeline_loss)
        self.module = self.pm.module
        self.named_trainable = self.pm.trainable_named_parameters()
        self.params = [p for _, p in self.named_trainable]
        # Autocast only where FSDP2's MixedPrecisionPolicy does not already cast (ZeRO-0/1).
        self.autocast = not self.pm.fsdp and self.dtype_name != "fp32"
        self.dp_group = self.mesh["dp"].get_group()  # ranks with different samples (the token count's)
        # ranks with the same parameters and different tokens (dp x cp): gradients are summed over them
        self.data_group = dims.data_mesh.get_group()
        self.pp_group = self.mesh["pp"].get_group() if dims.pp_enabled else None
        self.cp = self.pm.cp  # context parallel: this rank's sequence chunk (None without)
        stage = cfg.zero.stage
        allow_empty = self._trainable_elsewhere()
        if stage == 1 and dims.data_size > 1:
            self.optimizer = ZeroOneOptimizer(self.named_trainable, lambda nps: build_optimizer(nps, cfg.train),
                                              self.data_group, dims.data_size)
        else:
            self.optimizer = build_optimizer(self.named_trainable, cfg.train, allow_empty=allow_empty)
        self.grad_sync = None if self.pm.fsdp else ReplicatedGradSync(self.params, self.data_group, dims.data_size)
        self.scaler = DynamicLossScaler.from_config(cfg.precision)
        self.adalora = build_adalora(cfg, self.pm.spec, self.module, dims.tp, dims.pp)  # None unless adalora
        coord = dims.coordinate()
        self._counts_loss = coord["tp"] == 0 and (self.pm.pipeline is None or self.pm.pipeline.is_last)
        self._replica_coord = {a: i for a, i in coord.items() if a != "pp"}  # grad-norm ownership

    # ---- helpers -------------------------------------------------------------------------------
    def _trainable_elsewhere(self) -> bool:
        """A pipeline stage without trainable parameters is fine if another stage has some (every stage
        of the pp group takes part in the count)."""
        if self.pm.pipeline is None:
            return False
        n = torch.tensor([len(self.params)], dtype=torch.int64, device=self.ctx.device)
        dist.all_reduce(n, group=self.pp_group)
        return int(n.item()) > 0

    def _global_tokens(self, micro_batches: list[Batch]) -> int:
        return global_token_count(micro_batches, self.dp_group)

    def _model_inputs(self, b: Batch) -> dict:
        """The HF forward's kwargs: input_ids, and for packed/padded batches the block-causal mask and positions
        (context parallel: this rank's chunk of ids and positions, the whole sequence's mask)."""
        if self.cp is not None:
            return cp_model_inputs(b.input_ids, segment_ids=b.segment_ids, position_ids=b.position_ids,
                                   attention_mask=b.attention_mask, dtype=compute_dtype(self.dtype_name),
                                   device=self.ctx.device, cp=self.cp)
        return model_inputs(b.input_ids, segment_ids=b.segment_ids, position_ids=b.position_ids,
                            attention_mask=b.attention_mask, dtype=compute_dtype(self.dtype_name),
                            device=self.ctx.device, prompt=self.pm.prompt)

    def _chunk(self, b: Batch) -> Batch:
        """The part of `b` this rank computes the loss of: under context parallel its sequence chunk (labels,
        ids and every [b, s] tensor, extras included); otherwise `b`. A user's loss function sees this."""
        if self.cp is None:
            return b
        s = b.input_ids.shape[1]
        return map_tensors(b, lambda v: self.cp.chunk(v) if v.dim() >= 2 and v.shape[1] == s else v)

    def _stage_layout(self, micro_batches: list[Batch]) -> tuple:
        """() or the (segment_ids, position_ids) the pipeline stages carry along with the activations (context
        parallel: always, covering the whole sequence; the stages cut their positions' chunk)."""
        layouts = [stage_layout(b.input_ids, b.segment_ids, b.position_ids, b.attention_mask) for b in micro_batches]
        if all(x is None for x in layouts) and self.cp is None:
            return ()
        layouts = [x or stage_layout(b.input_ids, torch.ones_like(b.input_ids), None, None)
                   for x, b in zip(layouts, micro_batches)]
        return tuple(torch.cat(parts).to(self.ctx.device) for parts in zip(*layouts))

    def _pipeline_loss(self, logits, labels):
        if self._loss_fn is None:
            loss_sum, _ = causal_lm_loss_sum(logits, labels)
        else:  # a user's loss also reads the micro-batch's extras: the feed hands it the schedule's micro-batch
            loss_sum = micro_loss_sum(self._loss_fn, logits, self._feed.take(labels))
        return loss_sum * (self._scale / self._norm)

    def _loss_parallel(self, loss_fn: LossFn | None) -> bool:
        """Run the loss inside torch's loss_parallel: tp logits read sharded (engine/loss.py)."""
        return self.pm.loss_parallel and takes_sharded_logits(loss_fn)

    def _forward_backward(self, micro_batches: list[Batch], loss_fn: LossFn | None):
        """This rank's part of the step's mean loss (a device tensor, or a float from the pipeline)."""
        dev = self.ctx.device
        lp = self._loss_parallel(loss_fn)
        if self.pm.pipeline is not None:
            chunks = [self._chunk(b) for b in micro_batches]
            ids = torch.cat([b.input_ids for b in chunks]).to(dev)
            labels = torch.cat([b.labels for b in chunks]).to(dev)
            self._loss_fn = loss_fn
            self._feed = PipelineFeed(chunks, dev, self.pm.pipeline.first_run(train=True))
            with autocast_context(dev.type, self.dtype_name if self.autocast else "fp32"), \
                    loss_parallel_context(lp):
                out = self.pm.pipeline.train_step(ids, labels, self._stage_layout(micro_batches))
            return float(out) / self._scale if out is not None else 0.0
        total = torch.zeros((), dtype=torch.float64, device=dev)
        n = len(micro_batches)
        for i, b in enumerate(micro_batches):
            last = i == n - 1
            if self.pm.fsdp:
                self.module.set_requires_gradient_sync(last)
            elif last and self.grad_sync is not None and self.adalora is None:
                # the dp all-reduce of each bucket starts as its gradients complete (AdaLoRA: after its
                # regulariser's own backward, which adds to the adapters' gradients once more)
                self.grad_sync.arm()
            b = on_device(b, dev)  # once: the forward's inputs and the loss's labels / extras
            with loss_parallel_context(lp):
                with autocast_context(dev.type, self.dtype_name if self.autocast else "fp32"):
                    logits = self.module(**self._model_inputs(b)).logits
                loss = micro_loss_sum(loss_fn, logits, self._chunk(b)) / self._norm
                (loss * self._scale).backward()
            loss = loss.detach()
            total += (loss.full_tensor() if hasattr(loss, "full_tensor") else loss).double()  # no host sync
        return total

    # ---- the step ------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[Batch], lr: float, loss_fn: LossFn | None = None,
                   stop_signal=0) -> StepResult:
        # The normaliser: the sampler's global count (no collective) or, for a user's batches, one all-reduce.
        # The step's scalar reduction below confirms it; a loop that changed labels gets its gradients rescaled.
        self._norm = float(self._global_tokens(micro_batches))
        self._scale = self.scaler.scale if self.scaler is not None else 1.0
        local_loss = self._forward_backward(micro_batches, loss_fn)
        if self.adalora is not None:  # peft's orthogonal regulariser, once per step
            local_loss += self.adalora.backward_orth_reg(self._scale, self.dims.dp)  # (refused with cp)
        if self.grad_sync is not None:
            self.grad_sync.sync()
        if self.pm.pipeline is not None:
            self.pm.pipeline.sync_replicated_grads()
        # One all-reduce for the loss, the token count, the squared grad norm, the non-finite flag and the stop
        # signal (each (dp, last-stage, tp-rank-0) rank contributes its loss part and its counted tokens).
        sq = owned_grad_sq(self.params, self._replica_coord, exclude=self._duplicates())
        counts = self._counts_loss
        red = reduce_step_scalars(local_loss if counts else 0.0, self._counted(micro_batches) if counts else 0,
                                  sq if sq is not None else 0.0, stop_signal, self.ctx.device)
        # The normaliser used in the backward vs the confirmed count (they differ only if labels were changed
        # after the sampler counted them): rescale gradients and loss to the exact mean.
        fix = self._norm / red.tokens if red.tokens and red.tokens != self._norm else 1.0
        loss = red.loss * fix
        result = dict(loss=loss, tokens=red.tokens, stop_signal=red.stop_signal)

        if self.scaler is not None:
            found_inf = red.nonfinite  # agreed over the whole world
            self.scaler.update(found_inf)  # raises LossScaleUnderflow at the minimum scale
            if found_inf:
                return self._skip(result)
        elif red.nonfinite:
            # inf/nan in bf16/fp32: every rank saw the same flag: skip; no weight or optimizer state changes
            return self._skip(result)
        inv = fix / self._scale
        if inv != 1.0:
            with torch.no_grad():
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(inv)
        if sq is not None:
            norm = math.sqrt(max(red.grad_sq, 0.0)) * inv
        else:  # a gradient layout owned_grad_sq cannot split: the norm's own reductions
            norm = float(total_grad_norm(self.params, self.pp_group, exclude=self._duplicates()))
            if not math.isfinite(norm):
                return self._skip(result)
        clip_grads_(self.params, self.cfg.train.grad_clip, torch.tensor(norm))
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        if self.adalora is not None:  # after the step, grads still present (peft's documented order)
            self.adalora.update_and_allocate()
        self._note_grad_bytes()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=norm, skipped=False,
                          loss_scale=self.scaler.scale if self.scaler is not None else None, **result)

    def _skip(self, result: dict) -> StepResult:
        """A non-finite step: its gradients dropped on every rank; no weight or optimizer state changes."""
        self._note_grad_bytes()
        self.optimizer.zero_grad(set_to_none=True)
        if self.adalora is not None:
            self.adalora.step += 1  # the schedule follows the trainer's step count
        return StepResult(grad_norm=math.nan, skipped=True, nonfinite=True,
                          loss_scale=self.scaler.scale if self.scaler is not None else None, **result)

    def _counted(self, micro_batches: list[Batch]) -> int:
        """The targets this rank's loss part counted (its sequence chunks' under context parallel)."""
        return local_token_count([self._chunk(b) for b in micro_batches])

    def _duplicates(self) -> set[int]:
        pipe = self.pm.pipeline
        return set() if pipe is None else {id(p) for p in pipe.duplicate_params()}

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[Batch], loss_fn: LossFn | None = None) -> float:
        """The loss sums and counted tokens of every rank in one all-reduce: their ratio is the global mean."""
        self._norm = 1.0
        self._scale = 1.0
        dev = self.ctx.device
        lp = self._loss_parallel(loss_fn)
        if self.pm.pipeline is not None:
            # The schedule runs a fixed number of micro-batches (train.grad_accum): evaluate in rounds of that
            # size; the last round is filled with label-less micro-batches (ignored by the loss sum).
            n = self.pm.pipeline.n_microbatches
            mbs = list(micro_batches)
            # (the filler keeps the first micro-batch's extras, so a user's loss finds its keys; no label counts)
            filler = Batch(input_ids=torch.zeros_like(mbs[0].input_ids), labels=torch.full_like(mbs[0].labels, IGNORE_INDEX),
                           extra=mbs[0].extra)
            mbs += [filler] * (-len(mbs) % n)
            total = 0.0
            for i in range(0, len(mbs), n):
                chunks = [self._chunk(b) for b in mbs[i:i + n]]
                ids = torch.cat([b.input_ids for b in chunks]).to(dev)
                labels = torch.cat([b.labels for b in chunks]).to(dev)
                self._loss_fn = loss_fn
                self._feed = PipelineFeed(chunks, dev, self.pm.pipeline.first_run(train=False))
                with loss_parallel_context(lp):
                    out = self.pm.pipeline.eval_step(ids, labels, self._stage_layout(mbs[i:i + n]))
                total += float(out) if out is not None else 0.0
        else:
            total = torch.zeros((), dtype=torch.float64, device=dev)
            for b in micro_batches:
                b = on_device(b, dev)
                with loss_parallel_context(lp), \
                        autocast_context(dev.type, self.dtype_name if self.autocast else "fp32"):
                    logits = self.module(**self._model_inputs(b)).logits
                    loss_sum = micro_loss_sum(loss_fn, logits, self._chunk(b))
                total += (loss_sum.full_tensor() if hasattr(loss_sum, "full_tensor") else loss_sum).double()
        counts = self._counts_loss
        red = reduce_step_scalars(total if counts else 0.0, self._counted(micro_batches) if counts else 0, 0.0,
                                  0, dev)
        return red.loss / red.tokens if red.tokens else math.nan

    # ---- introspection -------------------------------------------------------------------------
    def _note_grad_bytes(self) -> None:
        """Gradients are freed after every step (set_to_none): measure them while they are alive."""
        live = sum(_nbytes(p.grad) for p in self.params if p.grad is not None)
        self._grad_bytes = max(self._grad_bytes, live)

    def _master_copy_bytes(self) -> int:
        """fp32 master weights kept apart from the model: tensors the optimizer updates that are not this
        rank's parameters. The native optimizers update the fp32 parameters themselves (under autocast and
        FSDP2's MixedPrecisionPolicy the low-precision copies are transient), so this is 0 — the estimator's
        master_weights; a wrapper holding its own fp32 copies would show here. (The parameters as set up, not
        only `module.parameters()`: after a forward without backward FSDP2 ZeRO-2 leaves the unsharded
        parameters registered on the module, while the optimizer holds the sharded ones.)"""
        own = {local(p).untyped_storage().data_ptr() for p in (*self.params, *self.module.parameters())}
        return sum(_nbytes(p) for g in self.optimizer.param_groups for p in g["params"]
                   if local(p).untyped_storage().data_ptr() not in own)

    def memory_report(self) -> dict:
        params_by_dtype: dict[str, int] = {}
        for _, p in self.module.named_parameters():
            key = str(local(p).dtype).replace("torch.", "")
            params_by_dtype[key] = params_by_dtype.get(key, 0) + _nbytes(p)
        opt_state = 0
        for st in self.optimizer.state.values():
            for v in st.values():
                if torch.is_tensor(v) and v.numel() > 1:
                    opt_state += _nbytes(v)
        trainable = sum(_nbytes(p) for p in self.params)
        # Frozen (PEFT base) params by dtype: a 4-bit QLoRA base shows up as packed uint8.
        frozen_by_dtype: dict[str, int] = {}
        for _, p in self.module.named_parameters():
            if not p.requires_grad:
                key = str(local(p).dtype).replace("torch.", "")
                frozen_by_dtype[key] = frozen_by_dtype.get(key, 0) + _nbytes(p)
        return {
            "base_params": sum(frozen_by_dtype.values()),
            "base_params_by_dtype": frozen_by_dtype,
            "adapter_params": trainable if self.cfg.peft.method != "none" else 0,
            "params": sum(params_by_dtype.values()),
            "params_by_dtype": params_by_dtype,
            "trainable_params": trainable,
            "grads": self._grad_bytes,  # measured at the steps so far (0 before the first)
            "optimizer_states": opt_state,
            "master_weights": self._master_copy_bytes(),
        }

    # ---- checkpoint state (layout independent: FQN keys, DCP reshards on load) ----------------------
    def _optimizers(self) -> list[torch.optim.Optimizer]:
        inner = getattr(self.optimizer, "inner", self.optimizer)  # ZeRO-1: this rank's share
        # a pipeline stage without trainable parameters (prompt tuning's later stages) has no state
        return [inner] if inner is not None and any(g["params"] for g in inner.param_groups) else []

    def _state_options(self):
        # PEFT: only adapters are trainable state; the frozen base comes from model.path.
        # Loading is strict except for PEFT, whose checkpoints hold only the adapters by design.
        return StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True,
                                strict=self.cfg.peft.method == "none")

    def _current_state(self) -> dict:
        opts = self._optimizers()
        model_sd, optim_sd = get_state_dict(self.module, opts, options=self._state_options())
        if self.cfg.peft.method != "none":
            # Adapters only. A 4-bit base layer adds its quant-state buffers (absmax, quant_map, ...) to the
            # module state dict: frozen base state rebuilt from model.path on resume, so saved it is dead
            # weight, and its keys/shapes depend on tp (a 4-bit shard per rank), which would tie the
            # checkpoint to one layout.
            keep = {n for n, _ in self.named_trainable}
            missing = keep - set(model_sd)
            if missing:
                raise RuntimeError(f"trainable parameters missing from the state dict: {sorted(missing)[:3]}")
            model_sd = {k: v for k, v in model_sd.items() if k in keep}
        state = {"model": model_sd, "optim": optim_sd if opts else {}}
        if self.adalora is not None:
            state["adalora"] = self.adalora.state()
        return state

    def save(self, directory: Path) -> dict[str, tuple[str, int]]:
        """DCP save, one file per rank hashed while written: {file name in `directory`: (sha256, bytes)} of
        the files this rank wrote (checkpoint/storage.py)."""
        writer = TrellisWriter(str(directory))
        dcp.save(self._current_state(), storage_writer=writer)
        return writer.file_hashes

    verifies_while_reading = True  # load(expected=...) checks every file's sha256 from the bytes it reads

    def load(self, directory: Path, expected: dict[str, str] | None = None) -> int:
        """Load into a copy of the state, verifying `expected` ({file name: sha256}) from the bytes read; only
        a load that succeeded on every rank is applied (set_state_dict), so a damaged file changes nothing.
        Returns the bytes this rank read."""
        live = self._current_state()
        state = _empty_copy(live)
        reader = dcp_load(state, directory, expected)  # allow-listed metadata / non-tensor items
        set_state_dict(self.module, self._optimizers(), model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=self._state_options())
        if self.adalora is not None:  # its EMAs are read in place: copy them into the live tensors
            for k, v in state["adalora"].items():
                if isinstance(v, torch.Tensor) and isinstance(live["adalora"].get(k), torch.Tensor):
                    live["adalora"][k].copy_(v)
            self.adalora.load(state["adalora"])
        return reader.bytes_read


def _nbytes(t: torch.Tensor) -> int:
    t = local(t)
    return t.numel() * t.element_size()
