"""Checkpointer: sharded, atomic, resumable on the same or another layout.

Native backend: model and optimizer state go through torch.distributed.checkpoint (DCP) in the
fully-qualified-name form of `torch.distributed.checkpoint.state_dict` (flattened optimizer state), so
a checkpoint written under one (dp, tp, pp, ZeRO stage) loads under another: DCP reads each rank's
slice of every tensor. Trainer state (step, tokens, data position, loss scaler) is JSON; per-rank RNG
states are safetensors. PEFT runs save trainable (adapter) state only. Nothing is pickled by us.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trellis import __version__
from trellis.errors import CheckpointError

from . import checkpoint_io as io
from .distributed import broadcast_object as _broadcast

TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.toml"
STATE_DIR = "state"


class Checkpointer:
    def __init__(self, cfg, trainer):
        self.cfg = cfg
        self.trainer = trainer
        self.root = Path(cfg.checkpoint.dir)
        self.rank = trainer.ctx.rank
        self.last_saved: Path | None = None
        self.last_saved_step = -1
        self._t_last = time.monotonic()
        from .lease import hold_checkpoint_dir

        self.lease = hold_checkpoint_dir(cfg, trainer.ctx)  # refuses while another run holds the directory

    # ---- saving ----------------------------------------------------------------------------------
    def after_step(self, step: int) -> None:
        c = self.cfg.checkpoint
        due = bool(c.interval and step % c.interval == 0)
        if c.interval_seconds:
            # Clocks differ per rank: rank 0 decides for everyone.
            due = _broadcast(due or time.monotonic() - self._t_last >= c.interval_seconds)
        if due:
            self.save(step)

    def save(self, step: int, final: bool = False) -> Path:
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
        self._backend_save(tmp / STATE_DIR)
        self._save_rng(tmp / "rng" / f"rank{self.rank}.safetensors")
        if self.rank == 0:
            (tmp / TRAINER_STATE).write_text(json.dumps(self._trainer_state(), indent=1))
            from trellis.configs import to_toml

            (tmp / CONFIG_FILE).write_text(to_toml(self.cfg))
        dist.barrier()  # every rank's files are in tmp
        if self.rank == 0:
            # write_s: every rank's shards written (the part that scales with model size / ranks).
            meta = {**self._metadata(step), "write_s": round(time.perf_counter() - t0, 4)}
            io.write_metadata_and_publish(tmp, final_dir, meta)
            io.prune(self.root, self.cfg.checkpoint.keep_last_k)
        dist.barrier()  # nobody goes on (or exits) before the checkpoint is published
        self.last_saved, self.last_saved_step = final_dir, step
        self._t_last = time.monotonic()
        self.last_save_s = time.perf_counter() - t0
        return final_dir

    def _backend_save(self, path: Path) -> None:
        backend = self.trainer.backend
        if self.cfg.zero.backend == "deepspeed":
            # DeepSpeed writes its own (layout-bound) files; they still go through our tmp -> rename flow.
            path.mkdir(parents=True, exist_ok=True)
            backend.save_checkpoint(str(path))
        else:
            backend.save_state(path)

    def _backend_load(self, path: Path) -> None:
        backend = self.trainer.backend
        if self.cfg.zero.backend == "deepspeed":
            backend.load_checkpoint(str(path))
        else:
            backend.load_state(path)

    def _trainer_state(self) -> dict:
        t = self.trainer
        scaler = getattr(t.backend, "scaler", None)
        return {"step": t.step, "tokens_seen": t.tokens_seen, "sampler": t.sampler.state_dict(),
                "loss_scaler": scaler.state_dict() if scaler is not None else None}

    def _metadata(self, step: int) -> dict:
        t = self.trainer
        from trellis.configs import to_dict

        return {"step": step, "tokens_seen": t.tokens_seen, "layout": t.dims.as_dict(),
                "zero": {"stage": self.cfg.zero.stage, "backend": self.cfg.zero.backend},
                "precision": self.cfg.precision.dtype, "peft": self.cfg.peft.method,
                "model": model_signature(t.hf_config), "hf_config": t.hf_config.to_dict(),
                "global_batch_size": t.sampler.global_batch_size, "config": to_dict(self.cfg),
                "versions": _versions(), "time": time.time()}

    def _save_rng(self, path: Path) -> None:
        from safetensors.torch import save_file

        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state()
        save_file(states, str(path))

    # ---- resuming --------------------------------------------------------------------------------
    def maybe_resume(self) -> Path | None:
        r = self.cfg.checkpoint.resume
        if r == "none":
            return None
        path = io.latest_valid(self.root) if r == "auto" else Path(r)
        if path is None:
            return None  # auto with nothing saved yet: start fresh
        self.load(path)
        return path

    def load(self, path: Path) -> None:
        t0 = time.perf_counter()
        err = None
        meta = None
        if self.rank == 0:
            try:
                meta = io.verify(path)
                check_compatible(meta, self.trainer)
                from .safe_pickle import check_state_dir

                check_state_dir(path / STATE_DIR)  # no pickle in it may run code (engine/safe_pickle.py)
            except CheckpointError as e:
                err = e.messages
        err, meta = _broadcast((err, meta))
        if err:
            raise CheckpointError(err)
        self._backend_load(path / STATE_DIR)
        ts = json.loads((path / TRAINER_STATE).read_text())
        t = self.trainer
        t.step = ts["step"]
        t.tokens_seen = ts["tokens_seen"]
        t.sampler.load_state_dict(ts["sampler"])
        scaler = getattr(t.backend, "scaler", None)
        if scaler is not None and ts.get("loss_scaler"):
            scaler.load_state_dict(ts["loss_scaler"])
        rng = path / "rng" / f"rank{self.rank}.safetensors"
        if rng.is_file() and meta["layout"]["world_size"] == t.ctx.world_size:
            from safetensors.torch import load_file

            states = load_file(str(rng))
            torch.set_rng_state(states["cpu"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state(states["cuda"])
        self.last_saved, self.last_saved_step = path, t.step
        self.last_load_s = time.perf_counter() - t0
        if self.rank == 0:
            import sys

            print(f"checkpoint: resumed from {path} (step {t.step}) in {self.last_load_s:.2f}s", file=sys.stderr)


def model_signature(hf_config) -> dict:
    from .model import model_dims

    return {"model_type": hf_config.model_type, **model_dims(hf_config)}


def check_compatible(meta: dict, trainer) -> None:
    want = model_signature(trainer.hf_config)
    have = meta.get("model", {})
    diffs = [f"{k}: checkpoint {have.get(k)!r} != this run {v!r}" for k, v in want.items() if have.get(k) != v]
    if meta.get("peft", "none") != trainer.cfg.peft.method:
        diffs.append(f"peft.method: checkpoint {meta.get('peft')!r} != this run {trainer.cfg.peft.method!r}")
    if diffs:
        raise CheckpointError(["the checkpoint is of another model or config; mismatches:", *diffs])


def _versions() -> dict:
    import transformers

    return {"trellis": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
