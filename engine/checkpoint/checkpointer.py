"""Checkpointer: sharded, atomic, resumable on the same or another layout.

It is given the backend (whose `save(dir)` / `load(dir)` write and read model and optimizer state), the data
sampler and the config; the Trainer passes its step and token count to `save` and takes them back from
`maybe_resume` / `load`. Native backend: model and optimizer state go through torch.distributed.checkpoint
(DCP) in the fully-qualified-name form of `torch.distributed.checkpoint.state_dict` (flattened optimizer
state), so a checkpoint written under one (dp, tp, pp, ZeRO stage) loads under another: DCP reads each
rank's slice of every tensor. Trainer state (step, tokens, data position, loss scaler) is JSON; per-rank RNG
states are safetensors. PEFT runs save trainable (adapter) state only. Nothing is pickled by us.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from safetensors.torch import load_file, save_file

from trellis import __version__
from trellis.configs import to_dict, to_toml
from trellis.errors import CheckpointError
from trellis.parallel.models.dims import dims_from_hf_config

from ..distributed import broadcast_object as _broadcast
from . import io
from .lease import hold_checkpoint_dir

TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.toml"
STATE_DIR = "state"


@dataclass(frozen=True)
class TrainerState:
    """What a checkpoint gives back to the Trainer."""
    step: int
    tokens_seen: int


class Checkpointer:
    def __init__(self, cfg, backend, sampler, *, dims, hf_config, rank: int):
        """`backend`: engine/backends/base.py's Backend; `sampler`: the GlobalBatchSampler (its position is
        saved and restored); `dims`: the resolved ParallelDims; `hf_config`: the model's (for its signature)."""
        self.cfg = cfg
        self.backend = backend
        self.sampler = sampler
        self.dims = dims
        self.hf_config = hf_config
        self.rank = rank
        self.root = Path(cfg.checkpoint.dir)
        self.last_saved: Path | None = None
        self.last_saved_step = -1
        self._t_last = time.monotonic()
        self.lease = hold_checkpoint_dir(cfg, rank)  # refuses while another run holds the directory

    # ---- saving ----------------------------------------------------------------------------------
    def after_step(self, step: int, tokens_seen: int) -> None:
        c = self.cfg.checkpoint
        due = bool(c.interval and step % c.interval == 0)
        if c.interval_seconds:
            # Clocks differ per rank: rank 0 decides for everyone.
            due = _broadcast(due or time.monotonic() - self._t_last >= c.interval_seconds)
        if due:
            self.save(step, tokens_seen)

    def save(self, step: int, tokens_seen: int) -> Path:
        if step == self.last_saved_step:
            return self.last_saved
        t0 = time.perf_counter()
        tmp, final_dir = io.tmp_dir(self.root, step), io.step_dir(self.root, step)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a run killed mid-save
            (tmp / "rng").mkdir(parents=True)
        dist.barrier()
        self.backend.save(tmp / STATE_DIR)
        _save_rng(tmp / "rng" / f"rank{self.rank}.safetensors")
        if self.rank == 0:
            (tmp / TRAINER_STATE).write_text(json.dumps(self._trainer_state(step, tokens_seen), indent=1))
            (tmp / CONFIG_FILE).write_text(to_toml(self.cfg))
        dist.barrier()  # every rank's files are in tmp
        if self.rank == 0:
            # write_s: every rank's shards written (the part that scales with model size / ranks).
            meta = {**self._metadata(step, tokens_seen), "write_s": round(time.perf_counter() - t0, 4)}
            io.write_metadata_and_publish(tmp, final_dir, meta)
            io.prune(self.root, self.cfg.checkpoint.keep_last_k)
        dist.barrier()  # nobody goes on (or exits) before the checkpoint is published
        self.last_saved, self.last_saved_step = final_dir, step
        self._t_last = time.monotonic()
        return final_dir

    def _trainer_state(self, step: int, tokens_seen: int) -> dict:
        scaler = self.backend.loss_scaler
        return {"step": step, "tokens_seen": tokens_seen, "sampler": self.sampler.state_dict(),
                "loss_scaler": scaler.state_dict() if scaler is not None else None}

    def _metadata(self, step: int, tokens_seen: int) -> dict:
        return {"step": step, "tokens_seen": tokens_seen, "layout": self.dims.as_dict(),
                "zero": {"stage": self.cfg.zero.stage, "backend": self.backend.name},
                "precision": self.cfg.precision.dtype, "peft": self.cfg.peft.method,
                "model": model_signature(self.hf_config), "hf_config": self.hf_config.to_dict(),
                "global_batch_size": self.sampler.global_batch_size, "config": to_dict(self.cfg),
                "versions": _versions(), "time": time.time()}

    # ---- resuming --------------------------------------------------------------------------------
    def maybe_resume(self) -> tuple[Path, TrainerState] | None:
        r = self.cfg.checkpoint.resume
        if r == "none":
            return None
        path = io.latest_valid(self.root) if r == "auto" else Path(r)
        if path is None:
            return None  # auto with nothing saved yet: start fresh
        return path, self.load(path)

    def load(self, path: Path) -> TrainerState:
        t0 = time.perf_counter()
        err = None
        meta = None
        if self.rank == 0:
            try:
                meta = io.verify(path)
                check_compatible(meta, self.hf_config, self.cfg)
                self.backend.check_state(path / STATE_DIR)  # no pickle in it may run code (checkpoint/safe_load.py)
            except CheckpointError as e:
                err = e.messages
        err, meta = _broadcast((err, meta))
        if err:
            raise CheckpointError(err)
        self.backend.load(path / STATE_DIR)
        ts = json.loads((path / TRAINER_STATE).read_text())
        self.sampler.load_state_dict(ts["sampler"])
        scaler = self.backend.loss_scaler
        if scaler is not None and ts.get("loss_scaler"):
            scaler.load_state_dict(ts["loss_scaler"])
        rng = path / "rng" / f"rank{self.rank}.safetensors"
        if rng.is_file() and meta["layout"]["world_size"] == self.dims.world_size:
            states = load_file(str(rng))
            torch.set_rng_state(states["cpu"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state(states["cuda"])
        state = TrainerState(step=ts["step"], tokens_seen=ts["tokens_seen"])
        self.last_saved, self.last_saved_step = path, state.step
        if self.rank == 0:
            print(f"checkpoint: resumed from {path} (step {state.step}) in {time.perf_counter() - t0:.2f}s",
                  file=sys.stderr)
        return state


def _save_rng(path: Path) -> None:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    save_file(states, str(path))


def model_signature(hf_config) -> dict:
    return {"model_type": hf_config.model_type, **dims_from_hf_config(hf_config).signature()}


def check_compatible(meta: dict, hf_config, cfg) -> None:
    """CheckpointError listing every difference between the checkpoint's model / PEFT method and this run's."""
    want = model_signature(hf_config)
    have = meta.get("model", {})
    diffs = [f"{k}: checkpoint {have.get(k)!r} != this run {v!r}" for k, v in want.items() if have.get(k) != v]
    if meta.get("peft", "none") != cfg.peft.method:
        diffs.append(f"peft.method: checkpoint {meta.get('peft')!r} != this run {cfg.peft.method!r}")
    if diffs:
        raise CheckpointError(["the checkpoint is of another model or config; mismatches:", *diffs])


def _versions() -> dict:
    return {"trellis": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
