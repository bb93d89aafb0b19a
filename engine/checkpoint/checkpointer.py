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

import errno
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
import transformers
from safetensors.torch import load_file, save_file

from trellis import __version__
from trellis.configs import to_dict, to_toml
from trellis.configs.schema import TRAJECTORY_FIELDS
from trellis.errors import CheckpointError, CheckpointSaveError, LeaseLost
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
            self.save(step, tokens_seen, final=False)

    def save(self, step: int, tokens_seen: int, final: bool = True) -> Path | None:
        """Write `step-N` atomically (every rank its shards). A write that fails on any rank (disk full,
        permission, I/O error) removes the partial `step-N.tmp`, keeps every earlier checkpoint and raises
        CheckpointSaveError on every rank — or, for an interval save (`final=False`) with
        checkpoint.on_save_error = "continue", prints one line and returns None: the run goes on and the next
        interval tries again. A final save that fails always raises (the run's result is not on disk)."""
        if step == self.last_saved_step:
            return self.last_saved
        try:
            return self._save(step, tokens_seen)
        except CheckpointSaveError as e:
            if final or self.cfg.checkpoint.on_save_error == "stop":
                raise
            if self.rank == 0:
                print(f"warning: {e.messages[0]}; training goes on without it (checkpoint.on_save_error=continue)",
                      file=sys.stderr)
            return None

    def _save(self, step: int, tokens_seen: int) -> Path:
        t0 = time.perf_counter()
        tmp, final_dir = io.tmp_dir(self.root, step), io.step_dir(self.root, step)
        main = self.rank == 0

        hashes: dict = {}

        def fence():
            # A run whose lease was taken over (another run now owns checkpoint.dir) must not write there.
            who = self.lease.taken_by() if self.lease is not None else None
            if who is not None:
                raise _LeaseLostSignal(f"checkpoint {tmp.name} not saved: the lease on checkpoint.dir={self.root} "
                                       f"was taken over by {who}; this run stops without writing there")

        def start():
            fence()
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a run killed mid-save
            self._check_free_space(tmp)
            (tmp / "rng").mkdir(parents=True)

        def write():
            # collective: DCP raises on every rank when one fails. The native backend hashes while writing.
            written = self.backend.save(tmp / STATE_DIR)
            return {f"{STATE_DIR}/{k}": v for k, v in (written or {}).items()}

        def write_small():
            _save_rng(tmp / "rng" / f"rank{self.rank}.safetensors")
            if main:
                (tmp / TRAINER_STATE).write_text(json.dumps(self._trainer_state(step, tokens_seen), indent=1))
                (tmp / CONFIG_FILE).write_text(to_toml(self.cfg))

        def publish():
            # write_s: every rank's shards written (the part that scales with model size / ranks).
            meta = {**self._metadata(step, tokens_seen), "write_s": round(time.perf_counter() - t0, 4)}
            io.write_metadata_and_publish(tmp, final_dir, meta, known=hashes, before_rename=fence)
            self._last_bytes = io.dir_bytes(final_dir)
            io.prune(self.root, self.cfg.checkpoint.keep_last_k)

        # Each phase ends in an agreement over every rank (it is also the barrier between phases): a failure
        # on any rank stops every rank at the same point, with one message.
        self._agreed(start if main else None, tmp)
        for h in self._agreed(write, tmp):  # every rank's shards are in tmp, and their sha256 on rank 0
            hashes.update(h or {})
        self._agreed(write_small, tmp)
        self._agreed(publish if main else None, tmp)  # nobody goes on (or exits) before it is published
        self.last_saved, self.last_saved_step = final_dir, step
        self._t_last = time.monotonic()
        return final_dir

    def _agreed(self, fn, tmp: Path) -> list:
        """Run `fn` (None: nothing on this rank), then agree with every rank on whether anyone failed; on a
        failure rank 0 removes `tmp` and every rank raises CheckpointSaveError with the first rank's cause
        (LeaseLost when the lease was taken over: that one always stops the run). Returns every rank's
        result of `fn` (on every rank: the one gather is also the agreement)."""
        err, out = None, None
        if fn is not None:
            try:
                out = fn()
            except _LeaseLostSignal as e:
                err = ("lease", str(e))
            except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
                err = ("save", describe_save_error(e, tmp))
        got: list = [None] * dist.get_world_size()
        dist.all_gather_object(got, (err, out))
        first = next((e for e, _ in got if e), None)
        if first is None:
            return [o for _, o in got]
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()  # tmp is gone before anyone reports (a supervisor may retry at once)
        kind, msg = first
        raise LeaseLost(msg) if kind == "lease" else CheckpointSaveError(msg)

    def _check_free_space(self, tmp: Path) -> None:
        """Refuse before writing when the filesystem has less room than the last checkpoint took (+10 %)."""
        need = getattr(self, "_last_bytes", 0)
        if not need:
            return
        free = shutil.disk_usage(self.root).free
        if free < need * 1.1:
            raise OSError(errno.ENOSPC, f"No space left on device: the last checkpoint took {need / 2**20:.1f} MiB, "
                                        f"{free / 2**20:.1f} MiB free", str(self.root))

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
        if r != "auto":
            return Path(r), self.load(Path(r))
        if not self._verifies_while_reading():
            # auto: the newest checkpoint that verifies (every checksum), saying which newer ones were skipped
            found = io.newest_verified(self.root) if self.rank == 0 else None
            path, skipped = _broadcast(found)
            self._say_skipped(skipped)
            if path is None:
                return self._nothing_verifies(skipped)
            return path, self.load(path, verified=True)
        # auto, verifying while reading: newest first; one that fails its checksums during the load (nothing
        # of it applied) is skipped and the next older one is loaded. Each shard is read once.
        cands = [p for _, p, _ in reversed(io.list_checkpoints(self.root))] if self.rank == 0 else None
        cands = _broadcast(cands)
        skipped: list[tuple[Path, str]] = []
        for path in cands:
            try:
                state = self.load(path, fallback=True)
            except _Unverified as e:
                skipped.append((path, e.why))
                self._say_skipped(skipped[-1:])
                continue
            return path, state
        return self._nothing_verifies(skipped)

    def _verifies_while_reading(self) -> bool:
        return bool(getattr(self.backend, "verifies_while_reading", False))

    def _say_skipped(self, skipped) -> None:
        if self.rank == 0:
            for p, why in skipped:
                print(f"checkpoint: skipped {p.name}: {why}", file=sys.stderr)

    def _nothing_verifies(self, skipped):
        if skipped:
            raise CheckpointError([f"--resume auto: no checkpoint in {self.root} verifies (see above); remove the "
                                   "damaged ones to start fresh, or resume from a copy"])
        return None  # auto with nothing saved yet: start fresh

    def load(self, path: Path, verified: bool = False, fallback: bool = False) -> TrainerState:
        """Resume from `path`. A backend that verifies while reading (native) gets every shard's sha256 and
        checks it from the bytes DCP reads (one pass); rank 0 hashes the few small files first (metadata,
        trainer state, RNG). Otherwise every file is hashed before loading (unless `verified`). `fallback`
        (--resume auto): a checkpoint that does not verify raises _Unverified (try the next one)."""
        t0, read0 = time.perf_counter(), io.process_read_bytes()
        one_pass = self._verifies_while_reading()
        err, integrity, meta = None, False, None
        if self.rank == 0:
            try:
                try:
                    if one_pass:
                        meta = io.read_metadata(path)
                        if meta is None:
                            raise CheckpointError(f"{path}: not a valid checkpoint (no readable {io.METADATA}); "
                                                  "it was not completed")
                        io.check_files(path, meta, hash_unless=_is_shard)
                    else:
                        meta = io.read_metadata(path) if verified else io.verify(path)
                except CheckpointError:
                    integrity = True
                    raise
                check_compatible(meta, self.hf_config, self.cfg, self.sampler.global_batch_size)
                self.backend.check_state(path / STATE_DIR)  # no pickle in it may run code (checkpoint/safe_load.py)
            except CheckpointError as e:
                err = e.messages
        err, integrity, meta = _broadcast((err, integrity, meta))
        if err:
            if fallback and integrity:
                raise _Unverified(err[0])
            raise CheckpointError(err)
        if one_pass:
            expected = {rel[len(STATE_DIR) + 1:]: info["sha256"] for rel, info in meta["files"].items()
                        if rel.startswith(STATE_DIR + "/")}
            try:
                self.last_load_bytes = self.backend.load(path / STATE_DIR, expected=expected)
            except CheckpointError as e:  # the same line on every rank (DCP gathers the failures)
                if fallback:
                    raise _Unverified(e.messages[0]) from None
                raise
        else:
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
        self._last_bytes = sum(f["bytes"] for f in meta["files"].values())  # the free-space check's estimate
        if self.rank == 0:
            read1 = io.process_read_bytes()
            read = (f"; rank 0 read {read1 - read0} bytes, the checkpoint has {self._last_bytes}"
                    if read0 is not None and read1 is not None else "")
            print(f"checkpoint: resumed from {path} (step {state.step}) in {time.perf_counter() - t0:.2f}s{read}",
                  file=sys.stderr)
        return state


def _is_shard(rel: str) -> bool:
    return rel.startswith(STATE_DIR + "/") and rel.endswith(".distcp")


class _Unverified(Exception):
    """--resume auto: this checkpoint fails its checks (nothing of it was applied); try the next older one."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


class _LeaseLostSignal(Exception):
    """Raised inside a save phase on rank 0 when the lease was taken over; becomes LeaseLost on every rank."""


def _save_rng(path: Path) -> None:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    save_file(states, str(path))


def model_signature(hf_config) -> dict:
    return {"model_type": hf_config.model_type, **dims_from_hf_config(hf_config).signature()}


def _field(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def trajectory_changes(meta: dict, cfg, global_batch_size: int) -> list[str]:
    """'field: checkpoint X -> this run Y' for every trajectory field the resume would change."""
    old, new = meta.get("config") or {}, to_dict(cfg)
    changes = []
    for f in TRAJECTORY_FIELDS:
        if f == "train.global_batch_size":
            a, b = meta.get("global_batch_size", _MISSING), global_batch_size
        else:
            a, b = _field(old, f), _field(new, f)
        if a is not _MISSING and b is not _MISSING and a != b:
            changes.append((f, f"{f}: checkpoint {a!r} -> this run {b!r}"))
    allowed = set(cfg.checkpoint.resume_allow_change)
    return [msg for f, msg in changes if f not in allowed]


def check_compatible(meta: dict, hf_config, cfg, global_batch_size: int | None = None) -> None:
    """CheckpointError listing every difference between the checkpoint's model / PEFT method and this run's,
    and every trajectory field (TRAJECTORY_FIELDS) the resume would change."""
    want = model_signature(hf_config)
    have = meta.get("model", {})
    diffs = [f"{k}: checkpoint {have.get(k)!r} != this run {v!r}" for k, v in want.items() if have.get(k) != v]
    if meta.get("peft", "none") != cfg.peft.method:
        diffs.append(f"peft.method: checkpoint {meta.get('peft')!r} != this run {cfg.peft.method!r}")
    if diffs:
        raise CheckpointError(["the checkpoint is of another model or config; mismatches:", *diffs])
    if global_batch_size is not None:
        changed = trajectory_changes(meta, cfg, global_batch_size)
        if changed:
            names = ",".join(c.split(":")[0] for c in changed)
            raise CheckpointError([f"resume would change the run ({len(changed)} field(s)); pass "
                                   f"--resume-allow-change {names} to accept:", *changed])


def _versions() -> dict:
    return {"trellis": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def describe_save_error(e: BaseException, tmp: Path) -> str:
    """One line: which save failed, the OS cause ("No space left on device") and the path it names. DCP wraps
    every rank's failure in a CheckpointException (`failures`: rank -> (exception, stack)); look inside. torch's
    zip writer can hide the cause ("unexpected pos 704 vs 598" when a write came up short on a full disk): then
    a probe write next to the checkpoint asks the filesystem itself (before the partial files are removed)."""
    os_err = _find_os_error(e) or _probe_write(tmp if tmp.is_dir() else tmp.parent)
    if os_err is not None:
        return f"checkpoint {tmp.name} not saved: {os_err.strerror or os_err} ({os_err.filename or tmp})"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"checkpoint {tmp.name} not saved: {type(e).__name__}: {first}"


def _probe_write(directory: Path, nbytes: int = 1 << 20) -> OSError | None:
    probe = directory / f".trellis-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * nbytes)
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as err:
        return err
    finally:
        probe.unlink(missing_ok=True)


def _find_os_error(e: BaseException, seen: set | None = None) -> OSError | None:
    seen = seen if seen is not None else set()
    if e is None or id(e) in seen:
        return None
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno is not None:
        return e
    nested = [e.__cause__, e.__context__]
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        nested += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    for n in nested:
        found = _find_os_error(n, seen)
        if found is not None:
            return found
    return None
