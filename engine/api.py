"""The public Python API: `trellis.load_config`, `trellis.initialize` and the `Engine` they give.

The Engine is the one code path of training: `trellis train` (engine/trainer.py) is load_config + initialize +
a loop of `engine.batches()` / `engine.train_step()` with metrics, checkpoints and signals around it, so a
user's own loop runs exactly what the CLI runs. The Engine owns what one optimizer step needs (the mesh, the
partitioned model in its backend, the LR schedule, the step counter, the data position) and the checkpoint
and export entry points; the loss is the backend's default causal-LM cross-entropy or the user's `loss_fn`
(contract: engine/loss.py, docs/API.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Iterator

import torch

from trellis.configs import TrainConfig, load, to_dict
from trellis.configs.loader import parse_overrides
from trellis.errors import CheckpointError, ConfigError, UserError
from trellis.parallel.dims import ParallelDims

from .backends import StepResult, build_backend, check_supported
from .checkpoint import io
from .checkpoint.checkpointer import Checkpointer
from .data import Batch, GlobalBatchSampler, PackedDataset, StepBatches, build_dataset
from .distributed import DistContext, broadcast_object, init_distributed
from .loss import LossFn
from .model import build_model, check_family_config, check_vocab
from .optim import lr_at
from .peft.inject import make_injector
from .tokenizer import find_tokenizer, load_tokenizer

__all__ = ["Batch", "Engine", "StepResult", "initialize", "load_config"]

_BATCH_FIELDS = ("input_ids", "labels", "segment_ids", "position_ids", "attention_mask")


def load_config(source: str | os.PathLike | dict | TrainConfig, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A validated TrainConfig from a TOML file or preset name, a {section: {key: value}} dict, or a TrainConfig,
    with `--section.key=value` overrides on top: the CLI's loading, with its ConfigErrors."""
    if isinstance(source, TrainConfig):
        source = to_dict(source)
    elif isinstance(source, os.PathLike):
        source = str(source)
    elif not isinstance(source, (str, dict)):
        raise ConfigError(f"load_config: expected a config path, preset name, dict or TrainConfig, got "
                          f"{type(source).__name__}")
    ov, errors = parse_overrides(list(overrides))
    if errors:
        raise ConfigError(errors)
    return load(source, ov)


def initialize(cfg: str | dict | TrainConfig, model=None) -> "Engine":
    """Join (or create) the process group from the launcher's rank environment (torchrun, deepspeed, mpirun,
    srun; none = one plain process, world size 1) and build the Engine for `cfg`. `model`: a Hugging Face
    PreTrainedModel on the CPU or the meta device (None = cfg.model)."""
    if not isinstance(cfg, TrainConfig):
        cfg = load_config(cfg)
    check_supported(cfg)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Engine(cfg, init_distributed(cfg.parallel.timeout_s), model=model)


class Engine:
    """This rank's part of a training run. Build it with `trellis.initialize`."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, model=None):
        self.config = self.cfg = cfg
        self.ctx = ctx
        self.dims = ParallelDims(cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.tp, ctx.world_size, cp=cfg.parallel.cp)
        check_global_batch(cfg, self.dims)
        self.dims.build_mesh(ctx.device.type)
        self.user_model = model is not None
        if model is None:
            model, model_dir = build_model(cfg.model, seed=cfg.train.seed, device=ctx.device)
        else:
            model, model_dir = prepare_user_model(model, seed=cfg.train.seed, device=ctx.device)
        self.model_dir = model_dir
        self.tokenizer = load_tokenizer(find_tokenizer(model_dir, cfg.model.tokenizer))
        check_vocab(model, self.tokenizer)
        max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if max_pos and cfg.data.seq_len > max_pos:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max positions {max_pos}")
        check_family_config(model.config, cfg.data.seq_len)
        self.model_type = model.config.model_type
        self.hf_config = model.config
        self.num_params = sum(p.numel() for p in model.parameters())
        self.dp_rank, self.dp_size = self.dims.coordinate()["dp"], self.dims.dp
        self._datasets: tuple[PackedDataset, PackedDataset | None] | None = None
        self.steps_per_epoch: int | None = None
        if cfg.train.epochs:  # the length comes from the data: known before the LR schedule / AdaLoRA read it
            self.datasets()
        inject = make_injector(cfg) if cfg.peft.method != "none" else None
        self.backend = build_backend(cfg, ctx, self.dims, model, inject_peft=inject)
        # Distinct data-independent randomness per rank (dropout), reproducible from the seed.
        torch.manual_seed(cfg.train.seed + 1000 + ctx.rank)
        self.step = 0
        self.tokens_seen = 0
        # A stop signal this rank received (set it from a signal handler): the next train_step agrees it over
        # the world in its scalar all-reduce and returns it as StepResult.stop_signal (engine/trainer.py).
        self.stop_requested = 0
        # The data position (steps taken) the checkpoints save; the data itself comes with batches().
        self.sampler = GlobalBatchSampler(None, micro_batch_size=cfg.train.micro_batch_size,
                                          grad_accum=cfg.train.grad_accum, dp_rank=self.dp_rank, dp_size=self.dp_size)
        self._data_sampler: GlobalBatchSampler | None = None
        self._checkpointers: dict[Path, Checkpointer] = {}
        self.checkpointer = self._checkpointer(Path(cfg.checkpoint.dir)) if cfg.checkpoint.dir else None

    # ---- who am I ---------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def model(self) -> torch.nn.Module:
        """This rank's partitioned model (its TP shards / pipeline stage / FSDP wrap)."""
        return self.backend.module

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the model as its frozen base: every injected PEFT layer of this rank's part (peft's
        BaseTunerLayer) passes its input through the base layer only. The flag is set directly rather than by
        peft's enable_adapters(), which also flips requires_grad on the (already partitioned) adapter
        parameters. The DPO reference with PEFT on (engine/dpo.py): no second model in memory."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self.cfg.peft.method == "none":
            raise ConfigError("engine.adapters_disabled(): this engine has no adapters (peft.method='none')")
        layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        if not layers:
            raise ConfigError(f"engine.adapters_disabled(): peft.method={self.cfg.peft.method!r} injects no "
                              "adapter layers to disable (prompt learning); use an adapter method such as 'lora'")
        before = [m._disable_adapters for m in layers]
        for m in layers:
            m._disable_adapters = True
        try:
            yield
        finally:
            for m, b in zip(layers, before):
                m._disable_adapters = b

    # ---- data -------------------------------------------------------------------------------------
    def datasets(self) -> tuple[PackedDataset, PackedDataset | None]:
        """(train, eval) from the config's data section, built once (engine/data: a prepared corpus, or one
        prepared into data.cache_dir by rank 0 while the others wait). The eval set is data.eval_path,
        data.eval_fraction of the records, or train.eval_batches global micro-batches held out of the corpus.
        With train.epochs the run's length is set here: train.steps = epochs x steps per epoch."""
        if self._datasets is None:
            t = self.cfg.train
            hold_out = t.eval_batches * t.micro_batch_size * self.dp_size
            self._datasets = build_dataset(self.cfg.data, self.tokenizer, t.seed, hold_out, rank=self.rank,
                                           log=lambda m: print(m, file=sys.stderr))
            self.steps_per_epoch = len(self._datasets[0]) // global_batch(self.cfg, self.dp_size)
            if t.epochs:  # resolved into the config: the LR schedule, PEFT and the exit code read train.steps
                t.steps = t.epochs * self.steps_per_epoch
        return self._datasets

    def batches(self, dataset: PackedDataset | None = None) -> Iterator[list[Batch]]:
        """This dp rank's train.grad_accum micro-batches of the step the engine is at, for every step until
        train.steps (GlobalBatchSampler's order: resumable, the same samples on any dp size). `dataset`: a
        PackedDataset (default: the config's data, `datasets()[0]`)."""
        ds = dataset if dataset is not None else self.datasets()[0]
        self._data_sampler = sampler = GlobalBatchSampler(ds, micro_batch_size=self.sampler.mb,
                                                          grad_accum=self.sampler.accum, dp_rank=self.dp_rank,
                                                          dp_size=self.dp_size)
        while self.step < self.cfg.train.steps:
            yield sampler.micro_batches(self.step)

    def input_tokens(self, first_step: int, num_steps: int = 1) -> int:
        """Non-padding input positions of the global batches of steps [first_step, first_step + num_steps) of
        the data `batches()` hands out (0 before it is called): what tokens/s and MFU count."""
        return self._data_sampler.input_tokens(first_step, num_steps) if self._data_sampler is not None else 0

    def eval_batches(self) -> list[Batch] | None:
        """This dp rank's micro-batches of the eval set (None without one)."""
        ev = self.datasets()[1]
        if ev is None or not self.cfg.train.eval_batches:
            return None
        return GlobalBatchSampler(ev, micro_batch_size=self.cfg.train.micro_batch_size,
                                  grad_accum=self.cfg.train.eval_batches, dp_rank=self.dp_rank,
                                  dp_size=self.dp_size, name="the eval set").micro_batches(0)

    # ---- steps ------------------------------------------------------------------------------------
    def train_step(self, micro_batches, loss_fn: LossFn | None = None) -> StepResult:
        """One optimizer step over this dp rank's train.grad_accum micro-batches (dicts of tensors or Batch).
        The LR is the config's schedule at `self.step`; the step counter advances."""
        batches = as_batches(micro_batches, "train_step", self.cfg.train.grad_accum)
        lr = lr_at(self.step, self.cfg.train)
        # read at the step's scalar reduction: a signal that arrives during this step's forward/backward counts
        res = self.backend.train_step(batches, lr, loss_fn=loss_fn, stop_signal=lambda: self.stop_requested)
        self.step += 1
        self.sampler.step = self.step
        self.tokens_seen += res.tokens
        return dataclasses.replace(res, lr=lr)

    def eval_loss(self, micro_batches, loss_fn: LossFn | None = None) -> float:
        """Mean loss over the global batch of these micro-batches (any number per rank, the same on every dp
        rank), no gradients."""
        return self.backend.eval_loss(as_batches(micro_batches, "eval_loss"), loss_fn=loss_fn)

    # ---- checkpoints and export ---------------------------------------------------------------------
    def _checkpointer(self, root: Path) -> Checkpointer:
        root = Path(root).resolve()
        if root not in self._checkpointers:
            cfg = self.cfg
            if not cfg.checkpoint.dir or Path(cfg.checkpoint.dir).resolve() != root:
                cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, dir=str(root)))
            self._checkpointers[root] = Checkpointer(cfg, self.backend, self.sampler, dims=self.dims,
                                                     hf_config=self.hf_config, rank=self.rank)
        return self._checkpointers[root]

    def save(self, directory: str | os.PathLike | None = None) -> Path:
        """Collective: a checkpoint of this step, `directory`/step-N (default checkpoint.dir), written
        atomically and loadable on any layout (the CLI's checkpoints)."""
        directory = directory or self.cfg.checkpoint.dir
        if not directory:
            raise ConfigError("engine.save(): give a directory or set checkpoint.dir")
        return self._checkpointer(Path(directory)).save(self.step, self.tokens_seen)

    def load(self, path: str | os.PathLike) -> Path:
        """Collective: resume from a step-N checkpoint, or from the latest valid one under a checkpoint
        directory; restores the step, the data position, the loss scale and (same world size) the RNG."""
        p = Path(path)
        step_dir = p if io.read_metadata(p) is not None else (io.latest_valid(p) if p.is_dir() else None)
        if step_dir is None:
            raise CheckpointError(f"engine.load({str(path)!r}): neither a checkpoint (step-N with metadata.json) "
                                  "nor a directory holding one")
        state = self._checkpointer(step_dir.parent).load(step_dir)
        self.step, self.tokens_seen = state.step, state.tokens_seen
        return step_dir

    def export_adapter(self, out_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Path:
        """Collective: the adapters as a peft adapter directory (PeftModel.from_pretrained). Saves a checkpoint
        of this step first (checkpoint.dir) unless `checkpoint` names one; `trellis export adapter`'s code."""
        return self._export("adapter", out_dir, checkpoint)

    def export_merged(self, out_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Path:
        """Collective: a Hugging Face model directory with the adapters merged (`trellis export merged`)."""
        return self._export("merged", out_dir, checkpoint)

    def _export(self, kind: str, out_dir, checkpoint) -> Path:
        if self.user_model:
            raise ConfigError(f"engine.export_{kind}(): the export rebuilds the base from model.path, but this "
                              "engine trains a model object given to initialize(); save it with "
                              "engine.save() and export with the model saved as model.path")
        ckpt = Path(checkpoint) if checkpoint else self.save()
        err = None
        out = Path(out_dir)
        if self.is_main:
            from .peft.export import export_adapter, export_merged

            try:
                out = (export_adapter if kind == "adapter" else export_merged)(ckpt, out)
            except UserError as e:
                err = e.messages
        err = broadcast_object(err)
        if err:
            raise UserError(err)
        return out


def global_batch(cfg, dp: int) -> int:
    """Rows per optimizer step over all dp ranks: micro batch x grad_accum x dp."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum * dp


def check_global_batch(cfg, dims: ParallelDims) -> None:
    """train.global_batch_size (0 = derived) against micro batch x grad_accum x dp once dp is resolved (a
    parallel.dp of -1 is known only with the world size)."""
    t = cfg.train
    derived = global_batch(cfg, dims.dp)
    if t.global_batch_size and t.global_batch_size != derived:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} != train.micro_batch_size ({t.micro_batch_size}) x "
            f"train.grad_accum ({t.grad_accum}) x parallel.dp ({dims.dp}) = {derived} on {dims.world_size} ranks; "
            "change one of them or set train.global_batch_size=0 to derive it")


def prepare_user_model(model, *, seed: int, device: torch.device):
    """A user's HF causal LM made what build_model gives: fp32, use_cache off, training mode, on `device`. A
    model on the meta device is materialised with build_model's random init (seeded from_config of its
    config), so every rank holds the same weights without a broadcast."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ConfigError(f"initialize(model=...): expected a Hugging Face PreTrainedModel, got "
                          f"{type(model).__name__}; or pass model=None to build cfg.model")
    devices = {p.device.type for p in model.parameters()}
    if not devices <= {"cpu", "meta"} or len(devices) > 1:
        raise ConfigError(f"initialize(model=...): the model's parameters are on {sorted(devices)}; pass it on "
                          "the CPU or the meta device (the engine places and shards it)")
    if devices == {"meta"}:
        torch.manual_seed(seed)
        model = type(model)._from_config(model.config, dtype=torch.float32)
    model = model.to(torch.float32)
    model.config.use_cache = False
    model.train()
    name = getattr(model.config, "_name_or_path", "") or ""
    model_dir = Path(name) if name and Path(name).is_dir() else None
    return model.to(device), model_dir


def as_batches(micro_batches, where: str, expected: int | None = None) -> list[Batch]:
    """A list of micro-batches as Batch objects, or a UserError naming what is wrong."""
    if isinstance(micro_batches, (dict, Batch)) or not hasattr(micro_batches, "__len__"):
        raise UserError(f"engine.{where}(): give a list of micro-batches (dicts of tensors or Batch), got "
                        f"{type(micro_batches).__name__}")
    if expected is not None and len(micro_batches) != expected:
        raise UserError(f"engine.{where}(): {len(micro_batches)} micro-batches, but train.grad_accum={expected}; "
                        "pass exactly train.grad_accum micro-batches of this dp rank per step")
    if not micro_batches:
        raise UserError(f"engine.{where}(): no micro-batches")
    out = StepBatches(as_batch(mb, f"engine.{where}(): micro-batch {i}") for i, mb in enumerate(micro_batches))
    out.global_tokens = getattr(micro_batches, "global_tokens", None)  # the sampler's count, confirmed in the step
    return out


def as_batch(mb, where: str) -> Batch:
    if isinstance(mb, Batch):
        fields = {f: getattr(mb, f) for f in _BATCH_FIELDS}
        extra = dict(mb.extra)
    elif isinstance(mb, dict):
        fields = {f: mb.get(f) for f in _BATCH_FIELDS}
        extra = {k: v for k, v in mb.items() if k not in _BATCH_FIELDS}
    else:
        raise UserError(f"{where}: expected a dict of tensors or a Batch, got {type(mb).__name__}")
    for key in ("input_ids", "labels"):
        v = fields[key]
        if not torch.is_tensor(v):
            raise UserError(f"{where}: missing {key!r} (a [batch, seq] integer tensor; labels are the next-token "
                            "targets, labels[:, t] = input_ids[:, t + 1], -100 where not counted)")
        if v.ndim != 2 or v.dtype.is_floating_point:
            raise UserError(f"{where}: {key!r} must be a [batch, seq] integer tensor, got {v.dtype} of shape "
                            f"{tuple(v.shape)}")
    if fields["labels"].shape != fields["input_ids"].shape:
        raise UserError(f"{where}: labels {tuple(fields['labels'].shape)} and input_ids "
                        f"{tuple(fields['input_ids'].shape)} differ in shape")
    return Batch(input_ids=fields["input_ids"].long(), labels=fields["labels"].long(),
                 segment_ids=fields["segment_ids"], position_ids=fields["position_ids"],
                 attention_mask=fields["attention_mask"], extra=extra)
