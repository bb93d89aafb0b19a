"""Checkpoint directories on disk: naming, validity, metadata with checksums, atomic publish.

A checkpoint is `<dir>/step-<N>/`. It is written as `step-<N>.tmp/` by every rank; rank 0 writes
`metadata.json` LAST (with the sha256 of every other file), fsyncs, and renames the directory. So a
directory named `step-<N>` always has complete metadata, and anything else (a `.tmp`, a directory
without metadata) is ignored. Checksums are verified on load and name the damaged file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from trellis.errors import CheckpointError

METADATA = "metadata.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}.tmp"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def process_read_bytes() -> int | None:
    """Bytes this process has read through read(2) and friends (/proc/self/io `rchar`; None where absent)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_metadata_and_publish(tmp: Path, final: Path, meta: dict, known: dict | None = None,
                               before_rename=None) -> None:
    """Rank 0 only, after every rank has written its files into `tmp`. `known`: {relative path: (sha256,
    bytes)} hashed while they were written (not read again; a size that differs means the file changed
    since, and it is hashed from disk). `before_rename()` runs last, just before the rename (the lease fence:
    it raises when this run no longer owns the directory)."""
    known = known or {}
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != METADATA)
    entries = {}
    for p in files:
        rel, size = str(p.relative_to(tmp)), p.stat().st_size
        k = known.get(rel)
        entries[rel] = {"sha256": k[0] if k and k[1] == size else sha256(p), "bytes": size}
    meta = {**meta, "format_version": FORMAT_VERSION, "files": entries}
    fsync_tree(tmp)
    m = tmp / METADATA
    with open(m, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    if before_rename is not None:
        before_rename()
    if final.exists():  # a re-save of the same step (e.g. final save right after an interval save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_metadata(path: Path) -> dict | None:
    try:
        meta = json.loads((path / METADATA).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and "step" in meta and "files" in meta else None


def list_checkpoints(root: Path) -> list[tuple[int, Path, dict | None]]:
    """(step, path, metadata or None) for every `step-N` directory, oldest first."""
    out = []
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p, read_metadata(p)))
    return sorted(out, key=lambda t: t[0])


def latest_valid(root: Path) -> Path | None:
    for step, path, meta in reversed(list_checkpoints(root)):
        if meta is not None:
            return path
    return None


def newest_verified(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint whose every file matches its checksum, and the newer ones skipped with why."""
    skipped: list[tuple[Path, str]] = []
    for _, path, meta in reversed(list_checkpoints(root)):
        if meta is None:
            skipped.append((path, f"no readable {METADATA} (not completed)"))
            continue
        try:
            verify(path, meta)
            return path, skipped
        except CheckpointError as e:
            skipped.append((path, e.messages[0]))
    return None, skipped


def verify(path: Path, meta: dict | None = None) -> dict:
    """Check every file against its recorded checksum; raise CheckpointError naming the first bad one."""
    meta = meta or read_metadata(path)
    if meta is None:
        raise CheckpointError(f"{path}: not a valid checkpoint (no readable {METADATA}); it was not completed")
    check_files(path, meta)
    return meta


def check_files(path: Path, meta: dict, hash_unless=lambda rel: False) -> None:
    """Every file of `meta` present with its size; hashed (sha256 from disk) unless `hash_unless(rel)`:
    those are verified by whoever reads them (the DCP shards, by the load itself)."""
    for rel, info in meta["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{f}: truncated or changed ({f.stat().st_size} bytes, expected {info['bytes']})")
        if not hash_unless(rel) and sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: checksum mismatch (the file is corrupted)")


def prune(root: Path, keep_last_k: int) -> None:
    """Keep the newest `keep_last_k` valid checkpoints; drop stale .tmp directories of older steps."""
    valid = [(s, p) for s, p, m in list_checkpoints(root) if m is not None]
    for _, p in valid[:-keep_last_k]:
        shutil.rmtree(p, ignore_errors=True)
    newest = valid[-1][0] if valid else -1
    for p in root.glob("step-*.tmp"):
        m = re.match(r"^step-(\d+)\.tmp$", p.name)
        if m and int(m.group(1)) < newest:
            shutil.rmtree(p, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
