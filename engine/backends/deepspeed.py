"""The DeepSpeed backend: DeepSpeed's engine (ZeRO 0-3, CPU/NVMe offload, its fp16/bf16 optimizers) driven
by the common Trainer. This is the only module of trellis that imports `deepspeed`; it does so lazily, so
building a DeepSpeed config (a pure function, unit-tested) needs no DeepSpeed start-up.

Numerics match the native backend: the Trainer's loss is the token-summed cross-entropy divided by the
GLOBAL token count (all micro-batches, all dp ranks) and gradients are summed over dp. DeepSpeed instead
averages gradients over dp and divides the loss by the accumulation steps; we pass `scale_wrt_gas=False`
and multiply the loss by the dp size, so DeepSpeed's average of (dp × our loss) is our sum.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from trellis.configs.deepspeed_json import ALIASES as DS_ALIASES
from trellis.errors import ConfigError
from trellis.parallel.attention import model_inputs
from trellis.parallel.parallelize import parallelize

from ..amp import compute_dtype
from ..checkpoint.safe_load import check_state_dir, torch_load_weights_only
from ..data import Batch, global_token_count
from ..distributed import broadcast_object
from ..loss import LossFn, micro_loss_sum, on_device
from ..optim import param_groups
from . import ds_ops
from .base import Backend, StepResult, reduce_step_scalars

CHECKPOINT_TAG = "ds"  # one DeepSpeed tag per trellis step-N/state directory
UNIVERSAL_TAG = "ds_universal"
_FP16_HELP = ("use precision.dtype='bf16' (DeepSpeed bf16 works on this machine) or zero.backend='native' "
              "(trellis' own fp16 loss scaler runs on CPU)")


# ---- config ------------------------------------------------------------------------------------------
def _auto(v) -> bool:
    return v == "auto"


def _offload_section(device: str, cfg, kind: str) -> dict | None:
    if device == "none":
        return None
    sec = {"device": device, "pin_memory": bool(cfg.zero.pin_memory)}
    if device == "nvme":
        sec["nvme_path"] = str(Path(cfg.zero.nvme_path) / kind)
    return sec


def trellis_ds_config(cfg, dp: int) -> dict:
    """The DeepSpeed config that realises a trellis TrainConfig (no user JSON)."""
    z, pr, t = cfg.zero, cfg.precision, cfg.train
    zero: dict = {"stage": z.stage}
    offload_opt = _offload_section(z.offload_optimizer, cfg, "optimizer")
    offload_par = _offload_section(z.offload_param, cfg, "param")
    if offload_opt:
        zero["offload_optimizer"] = offload_opt
    if offload_par:
        zero["offload_param"] = offload_par
    if z.stage == 3:
        # Small models: keep every parameter partitioned (DeepSpeed would otherwise persist params
        # below 10^5 elements on every rank, hiding the ZeRO-3 memory saving in our tiny test models).
        zero["stage3_param_persistence_threshold"] = 0
    ds: dict = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
        "optimizer": _optimizer_section(cfg),
        "steps_per_print": 10 ** 9,  # the Trainer prints progress
        "wall_clock_breakdown": False,
    }
    if pr.dtype == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0 if pr.loss_scale == "dynamic" else float(pr.loss_scale),
                      "initial_scale_power": pr.initial_scale_power, "loss_scale_window": pr.loss_scale_window,
                      "hysteresis": pr.hysteresis, "min_loss_scale": pr.min_loss_scale}
    elif pr.dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    if "nvme" in (z.offload_optimizer, z.offload_param):
        ds["aio"] = {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1,
                     "single_submit": False, "overlap_events": True}
    return ds


def _optimizer_section(cfg) -> dict:
    t = cfg.train
    if t.optimizer == "sgd":
        return {"type": "SGD", "params": {"lr": t.lr}}
    params = {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps, "weight_decay": t.weight_decay,
              "adam_w_mode": True}
    if cfg.zero.offload_optimizer == "none":
        params["torch_adam"] = True  # torch's AdamW: no fused_adam JIT build, same math as the native backend
    # With offload DeepSpeed picks DeepSpeedCPUAdam (the cpu_adam op, see engine/backends/ds_ops.py).
    return {"type": "AdamW", "params": params}


def _fill_auto(user: dict, ours: dict) -> dict:
    """User JSON wins; "auto" or absent values come from the trellis-derived config (recursively)."""
    out = copy.deepcopy(user)
    for k, v in ours.items():
        if k not in out or _auto(out[k]):
            out[k] = copy.deepcopy(v)
        elif isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = _fill_auto(out[k], v)
    return out


def build_ds_config(cfg, dp: int) -> dict:
    """The DeepSpeed config for this run: the user's ds_config.json as the base when given (only its
    "auto"/absent fields filled from trellis), else derived from the trellis config."""
    ours = trellis_ds_config(cfg, dp)
    if not cfg.zero.deepspeed_config:
        return ours
    user = json.loads(Path(cfg.zero.deepspeed_config).read_text())
    user = {DS_ALIASES.get(k, k) if DS_ALIASES.get(k) not in user else k: v for k, v in user.items()}  # bfloat16
    # Batch fields: configs.load layered them TOML < JSON < CLI; the global batch is checked against the real dp.
    t = cfg.train
    user.update(train_micro_batch_size_per_gpu=t.micro_batch_size, gradient_accumulation_steps=t.grad_accum,
                train_batch_size=t.global_batch_size or t.micro_batch_size * t.grad_accum * dp)
    ds = _fill_auto(user, ours)
    # A user scheduler would fight the Trainer's LR schedule (set every step); configs/deepspeed_json.py
    # already mapped it onto train.schedule/warmup/lr, so it is honoured through the Trainer instead.
    ds.pop("scheduler", None)
    _check_consistent(ds, cfg, dp)
    return ds


def _check_consistent(ds: dict, cfg, dp: int) -> None:
    """Fields DeepSpeed would honour differently from what the Trainer does are errors, not surprises."""
    errors = []
    mb, ga = ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps")
    if mb != cfg.train.micro_batch_size:
        errors.append(f"ds_config train_micro_batch_size_per_gpu={mb} != train.micro_batch_size="
                      f"{cfg.train.micro_batch_size}; set one of them to 'auto'")
    if ga != cfg.train.grad_accum:
        errors.append(f"ds_config gradient_accumulation_steps={ga} != train.grad_accum={cfg.train.grad_accum}; "
                      "set one of them to 'auto'")
    tb = ds.get("train_batch_size")
    if tb is not None and tb != cfg.train.micro_batch_size * cfg.train.grad_accum * dp:
        errors.append(f"ds_config train_batch_size={tb} != micro batch × grad_accum × dp = "
                      f"{cfg.train.micro_batch_size * cfg.train.grad_accum * dp}; set it to 'auto'")
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage != cfg.zero.stage:
        errors.append(f"ds_config zero_optimization.stage={stage} != zero.stage={cfg.zero.stage} (a command-line "
                      "override?); make them agree or set the JSON's stage to 'auto'")
    dtype = "fp16" if (ds.get("fp16") or {}).get("enabled") is True else \
        "bf16" if (ds.get("bf16") or {}).get("enabled") is True else "fp32"
    if dtype != cfg.precision.dtype:
        errors.append(f"ds_config enables {dtype} but precision.dtype='{cfg.precision.dtype}'; make them agree "
                      "or set the JSON's 'enabled' to 'auto'")
    if errors:
        raise ConfigError(errors)


# ---- precision support (checked before any rank trains) ------------------------------------------------
def fp16_supported(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available()
    # What DeepSpeed's CPU accelerator asks (is_fp16_supported). A torch built without the mkldnn op raises
    # AttributeError (no such op) or RuntimeError (op not available for this build): that means "no fp16";
    # anything else is a real error and surfaces.
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision_supported(cfg, device_type: str | None = None) -> None:
    """Raise ConfigError when DeepSpeed will refuse the precision on this machine. Cheap, no deepspeed
    import: call it in the launching process, before ranks start (engine/backends: check_supported)."""
    if cfg.precision.dtype != "fp16":
        return
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if not fp16_supported(device_type):
        raise ConfigError(f"precision.dtype='fp16' with zero.backend='deepspeed': DeepSpeed refuses fp16 on this "
                          f"{device_type.upper()} (\"Type fp16 is not supported on your device\"); {_FP16_HELP}")


# ---- the backend -------------------------------------------------------------------------------------
class _DeepSpeedScale:
    """Read-only view of DeepSpeed's loss scaler for the Trainer summary; DeepSpeed checkpoints its own
    scaler state, so load_state_dict is deliberately a no-op."""

    def __init__(self, optimizer):
        self._opt = optimizer

    @property
    def scale(self) -> float:
        s = getattr(self._opt, "cur_scale", None)
        if s is None:
            s = getattr(self._opt, "loss_scale", 1.0)
        return float(s)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "owner": "deepspeed"}

    def load_state_dict(self, state: dict) -> None:
        pass


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    @classmethod
    def check_supported(cls, cfg) -> None:
        check_precision_supported(cfg)  # e.g. fp16 on a CPU without fp16 support
        from .deepspeed_config import preflight_ds_config  # DeepSpeed's own config model, before ranks start

        preflight_ds_config(cfg)

    def __init__(self, cfg, ctx, dims, model: torch.nn.Module, inject_peft=None):
        if dims.tp > 1 or dims.pp > 1:
            raise ConfigError(f"zero.backend='deepspeed' runs data parallel only (parallel.tp={dims.tp}, "
                              f"parallel.pp={dims.pp}); use zero.backend='native' for tensor/pipeline parallel")
        check_precision_supported(cfg, ctx.device.type)
        self.cfg, self.ctx, self.dims = cfg, ctx, dims
        self.dp = dims.dp
        # The model preparation every backend shares (layout checks, family surgery, PEFT, activation
        # checkpointing): parallelize() without its ZeRO wrap; DeepSpeed's engine shards over dp itself.
        self._prompt = parallelize(model, dims, cfg, compute_dtype=compute_dtype(cfg.precision.dtype),
                                   inject_peft=inject_peft, shard_data_parallel=False).prompt
        self.ds_config = build_ds_config(cfg, self.dp)
        # Before importing deepspeed: every DeepSpeed process group on CPU JIT-builds shm_comm, offload
        # needs cpu_adam/async_io; all of them come from the project-local cache (see ds_ops).
        ds_ops.use_project_extensions_dir()
        import deepspeed

        # DeepSpeed reads rank variables from the environment; a single process started without any
        # launcher has none (the Trainer's group is already up, these only describe it).
        for k, v in (("RANK", ctx.rank), ("WORLD_SIZE", ctx.world_size), ("LOCAL_RANK", ctx.local_rank)):
            os.environ.setdefault(k, str(v))
        # Reuse the Trainer's gloo/nccl process group: deepspeed.comm wraps an initialised torch group.
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError("no trainable parameters; check peft.target_modules")
        groups = param_groups([p for _, p in named], [n for n, _ in named], cfg.train.weight_decay)
        _check_async_io(self.ds_config)
        if _offload_param_device(self.ds_config) == "nvme":
            _partition_for_nvme(deepspeed, model, self.ds_config)
        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, model_parameters=groups, config=self.ds_config, dist_init_required=False)
        except ValueError as e:
            if hasattr(e, "errors") and hasattr(e, "title"):  # pydantic's ValidationError: DeepSpeed's config model
                raise ConfigError(ds_validation_messages(e, cfg.zero.deepspeed_config)) from None
            if "not supported on your device" in str(e):
                raise ConfigError(f"DeepSpeed: {e} ({_FP16_HELP})") from None
            raise
        self.module = self.engine.module
        self.named_trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.scaler = _DeepSpeedScale(self.optimizer) if self.engine.fp16_enabled() else None
        self._peft = cfg.peft.method != "none"

    # ---- helpers -------------------------------------------------------------------------------
    def _global_tokens(self, micro_batches: list[Batch]) -> int:
        return global_token_count(micro_batches)  # data parallel only: the world is the dp group

    def _loss_sum(self, b: Batch, loss_fn: LossFn | None) -> torch.Tensor:
        dev = self.engine.device
        b = on_device(b, dev)  # once: the forward's inputs and the loss's labels / extras
        kwargs = model_inputs(b.input_ids, segment_ids=b.segment_ids, position_ids=b.position_ids,
                              attention_mask=b.attention_mask, dtype=compute_dtype(self.cfg.precision.dtype),
                              device=dev, prompt=self._prompt)
        logits = self.engine(**kwargs).logits
        return micro_loss_sum(loss_fn, logits, b)

    # ---- the step ------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[Batch], lr: float, loss_fn: LossFn | None = None,
                   stop_signal=0) -> StepResult:
        if len(micro_batches) != self.engine.gradient_accumulation_steps():
            raise RuntimeError(f"{len(micro_batches)} micro-batches for DeepSpeed's gradient_accumulation_steps="
                               f"{self.engine.gradient_accumulation_steps()}")
        norm = float(self._global_tokens(micro_batches))
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        skipped_before = self.engine.skipped_steps
        total = None  # this rank's loss part, summed on the device: no host sync per micro-batch
        for b in micro_batches:
            loss = self._loss_sum(b, loss_fn) / norm
            # ×dp undoes DeepSpeed's dp average; scale_wrt_gas=False keeps our global-token normalisation.
            self.engine.backward(loss * self.dp, scale_wrt_gas=False)
            self.engine.step()  # an optimizer update only at DeepSpeed's accumulation boundary
            total = loss.detach() if total is None else total + loss.detach()
        skipped = self.engine.skipped_steps > skipped_before
        gn = self.engine.get_global_grad_norm()  # reduced over dp by DeepSpeed's clipping: none of ours
        gn = float(gn) if gn is not None and not skipped else math.nan
        # loss, non-finite flag and stop signal: the step's one scalar all-reduce (engine/backends/base.py)
        red = reduce_step_scalars(total if total is not None else 0.0, 0, 0.0, stop_signal, self.engine.device)
        return StepResult(loss=red.loss, grad_norm=gn, skipped=skipped, stop_signal=red.stop_signal,
                          nonfinite=red.nonfinite or (not skipped and not math.isfinite(gn)),
                          loss_scale=self.scaler.scale if self.scaler is not None else None, tokens=int(norm))

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[Batch], loss_fn: LossFn | None = None) -> float:
        norm = float(self._global_tokens(micro_batches))
        self.engine.eval()
        try:
            total = sum(self._loss_sum(b, loss_fn) for b in micro_batches) / norm
        finally:
            self.engine.train()
        return reduce_step_scalars(total, 0, 0.0, 0, self.engine.device).loss

    # ---- introspection -------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Bytes on this rank, read from the live engine: ZeRO-3 params count their local partition
        (`ds_tensor`); optimizer states and fp32 master partitions come from DeepSpeed's optimizer."""
        def local_param(p):
            return p.ds_tensor if hasattr(p, "ds_tensor") else p

        def nbytes(t):
            return t.numel() * t.element_size()

        params = sum(nbytes(local_param(p)) for p in self.module.parameters())
        trainable = sum(nbytes(local_param(p)) for _, p in self.named_trainable)
        master = sum(nbytes(t) for t in _master_partitions(self.optimizer))
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        states = 0
        for st in inner.state.values():
            for v in st.values():
                if torch.is_tensor(v) and v.numel() > 1:
                    states += nbytes(v)
        stage = self.engine.zero_optimization_stage()
        # Gradients: stage >= 2 keeps only this rank's partition (fp32 like the master), else full.
        grads = master if stage >= 2 and master else trainable
        return {"params": params, "trainable_params": trainable, "grads": grads, "optimizer_states": states,
                "master_weights": master, "zero_stage": stage}

    # ---- checkpoint state (the Checkpointer calls these inside its atomic step-N flow) ---------
    def save(self, directory: Path) -> None:
        """DeepSpeed writes its own (layout-bound) files; they still go through the tmp -> rename flow."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, exclude_frozen_parameters=self._peft)

    def check_state(self, directory: Path) -> None:
        check_state_dir(directory, deepspeed_safe_globals())

    def load(self, directory: Path) -> None:
        path = str(directory)
        saved_dp = saved_dp_size(Path(path) / CHECKPOINT_TAG)
        if saved_dp in (None, self.dp):
            self._load(path, CHECKPOINT_TAG)
            return
        # Another dp size: go through DeepSpeed's universal (per-parameter) checkpoint.
        tmp = broadcast_object(tempfile.mkdtemp(prefix="trellis-universal-") if self.ctx.rank == 0 else None)
        try:
            if self.ctx.rank == 0:
                self.to_universal(path, str(Path(tmp) / UNIVERSAL_TAG))
            dist.barrier()
            self._load(tmp, UNIVERSAL_TAG, universal=True)
        finally:
            dist.barrier()
            if self.ctx.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)

    def _load(self, path: str, tag: str, universal: bool = False) -> None:
        conf = self.engine._config
        before = conf.load_universal_checkpoint
        conf.load_universal_checkpoint = universal  # DeepSpeed reads this flag at load time only
        _safe_checkpoint_engine(self.engine)  # its TorchCheckpointEngine loads with weights_only=False
        try:
            load_path, _ = self.engine.load_checkpoint(path, tag=tag, load_module_strict=not self._peft,
                                                       load_optimizer_states=True, load_lr_scheduler_states=False)
        finally:
            conf.load_universal_checkpoint = before
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {path}/{tag}")

    @staticmethod
    def consolidate_fp32(path: str) -> dict[str, torch.Tensor]:
        """Full fp32 state dict (names as in the HF model) from a saved DeepSpeed checkpoint directory."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(path, tag=CHECKPOINT_TAG)

    @staticmethod
    def to_universal(path: str, out_dir: str) -> None:
        """Convert the DeepSpeed checkpoint saved under `path` into a universal checkpoint at `out_dir`
        (loadable on another dp size). Runs in this process; no worker pool."""
        from argparse import Namespace

        from deepspeed.checkpoint import ds_to_universal

        args = Namespace(input_folder=str(Path(path) / CHECKPOINT_TAG), output_folder=str(out_dir),
                         num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                         inject_missing_state=True)
        ds_to_universal.main(args)


# DeepSpeed's pydantic config models -> the ds_config.json section each validates
_DS_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedZeroOffloadOptimizerConfig":
                "zero_optimization.offload_optimizer", "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param",
                "DeepSpeedActivationCheckpointingConfig": "activation_checkpointing", "DeepSpeedFP16Config": "fp16",
                "DeepSpeedBF16Config": "bf16", "DeepSpeedAIOConfig": "aio"}


def ds_validation_messages(err, source: str) -> list[str]:
    """One line per field DeepSpeed's own config model rejected, named by its path in the JSON."""
    section = _DS_SECTIONS.get(err.title, err.title)
    where = f"--deepspeed {source}" if source else "the DeepSpeed config trellis built"
    out = []
    for e in err.errors():
        field = ".".join([section, *(str(x) for x in e.get("loc", ()))])
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        out.append(f"{where}: {field}: {e.get('msg', 'invalid')}{got}; fix or remove it (DeepSpeed's config schema)")
    return out


def _check_async_io(ds: dict) -> None:
    """NVMe offload needs DeepSpeed's async_io op, which links libaio: say what to install instead of a per-rank
    build traceback."""
    z = ds.get("zero_optimization", {})
    if "nvme" not in ((z.get("offload_optimizer") or {}).get("device"), (z.get("offload_param") or {}).get("device")):
        return
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible():
        raise ConfigError("zero.offload_*='nvme' needs DeepSpeed's async_io op, which cannot be built here: install "
                          "libaio with its headers (apt-get install libaio-dev; dnf install libaio-devel) or set "
                          "CFLAGS/LDFLAGS to where they are, or offload to 'cpu'")


def _offload_param_device(ds: dict) -> str:
    zero = ds.get("zero_optimization") or {}
    return str(((zero.get("offload_param") or {}).get("device")) or "none") if zero.get("stage") == 3 else "none"


def _partition_for_nvme(deepspeed, model: torch.nn.Module, ds: dict) -> None:
    """ZeRO-3 + offload_param=nvme: partition the model with `zero.Init(config=ds)` ourselves, before
    deepspeed.initialize. DeepSpeed's own conversion (DeepSpeedZeRoOffload._convert_to_zero_parameters)
    passes `dtype=` to zero.Init, whose _set_dtype then evaluates (0.19.8)
    `dtype or torch.float16 if is_fp16_supported() else torch.bfloat16 if ...`: on a CPU without fp16 that is
    bf16 whatever the model's dtype, so the NVMe param swapper gets bf16 buffers and every swapped fp32
    partition is rounded to bf16 (measured: losses 3.8e-3 off the no-offload run after 3 steps). Given the
    config and no dtype, zero.Init takes the dtype from it (fp32/bf16/fp16); initialize then finds the
    parameters already partitioned and keeps them."""
    deepspeed.zero.Init(module=model, config_dict_or_path=ds)


def _master_partitions(optimizer) -> list[torch.Tensor]:
    """The fp32 master tensors DeepSpeed's optimizer keeps on this rank: ZeRO-1/2, ZeRO-3, the bf16 wrapper,
    and at ZeRO-0 the 16-bit wrappers (FP16_Optimizer: flat groups; FP16_UnfusedOptimizer, which DeepSpeed
    also uses for bf16 without ZeRO: per-parameter fp32 copies)."""
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
                 "fp32_groups_flat", "fp32_groups"):
        ts = getattr(optimizer, attr, None)
        if ts:
            flat = [t for g in ts for t in (g if isinstance(g, (list, tuple)) else [g])]
            return [t for t in flat if torch.is_tensor(t)]
    return []  # ZeRO-0 fp32: the torch optimizer updates the model parameters themselves


def saved_dp_size(tag_dir: Path) -> int | None:
    """dp size a DeepSpeed checkpoint was written with (one optimizer-state file per dp rank), or None."""
    files = list(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return len(files) or None


# ---- safe loading of DeepSpeed's checkpoint files (engine/checkpoint/safe_load.py) -------------------------
# DeepSpeed 0.19.8 reads its *.pt files with torch.load(weights_only=False) in its TorchCheckpointEngine,
# zero/stage3.py, base_optimizer.py and the universal-checkpoint code. The Checkpointer first loads every one
# of them weights-only (check_state, with the few DeepSpeed classes they hold as safe globals), and the engine's
# checkpoint engine is swapped for one that loads weights-only. Residual risk: DeepSpeed's direct
# weights_only=False calls still unpickle fully, so a file replaced between the check and DeepSpeed's read (by
# someone who can write the checkpoint directory while the run resumes) is not caught.
def deepspeed_safe_globals() -> list:
    """The non-torch classes DeepSpeed 0.19 pickles into its checkpoint files (model/optimizer states)."""
    import argparse
    import collections
    import pathlib

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # argparse.Namespace: DeepSpeed stores its `args` (None for trellis) in the model states
    return [collections.OrderedDict, pathlib.PosixPath, argparse.Namespace, LossScaler, DynamicLossScaler,
            ZeroStageEnum, fragment_address]


def _safe_checkpoint_engine(engine) -> None:
    """Swap a DeepSpeed engine's TorchCheckpointEngine for one that loads with weights_only=True."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return torch_load_weights_only(path, map_location=map_location, safe_globals=deepspeed_safe_globals())

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine.__class__ = SafeTorchCheckpointEngine
