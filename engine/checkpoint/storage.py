"""DCP storage for trellis checkpoints: one file per rank written with large sequential writes and hashed as it
is written; read back with the sha256 of every file computed from the bytes DCP reads (one pass).

Layout and re-sharding are DCP's own: the save and load planners are torch's (per-FQN chunks, flattened
optimizer state), so a checkpoint written on dp2·tp2 loads on dp1 or pp2 exactly as before. What changes is
the bytes of one storage item:

- torch's FileSystemWriter `torch.save`s every item (a zip archive per tensor: headers, 64-byte alignment and
  a CRC-32 pass over the data; 585 of them on a 42 MB checkpoint). TrellisWriter writes each tensor chunk's
  raw bytes (C order, its dtype) into the rank's one file, marked with the transform descriptor
  RAW_DESCRIPTOR in DCP's `.metadata`; shape and dtype come from the metadata's chunk. Non-tensor items
  (BYTE_IO) are written as DCP writes them.
- While the bytes go to disk they are hashed (sha256; the hashing overlaps the write: hashlib and the write
  both release the GIL). `file_hashes` gives {file name: (sha256, bytes)} for metadata.json: no re-read.
- TrellisReader (SafeFileSystemReader: the allow-listed `.metadata` unpickler) reads both this format and
  torch's (checkpoints written before this change). Given the expected hashes (metadata.json), the
  coordinator's global plan makes one rank the owner of every file (the first that reads from it, else rank
  0); the owner reads its files once, start to end, hashing every byte and taking its items on the way;
  other ranks read only their items' bytes. A mismatch raises CheckpointError naming the file: DCP gathers
  it onto every rank before anything is applied (the caller loads into a copy of the state and applies it
  with set_state_dict only after the load succeeded).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from trellis.errors import CheckpointError

from .safe_load import RestrictedUnpickler, SafeFileSystemReader

RAW_DESCRIPTOR = "trellis.raw_bytes"
CHUNK = 8 << 20  # write/hash granularity
DCP_METADATA = ".metadata"


def _raw_view(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


class HashingFile:
    """A binary file written in large pieces: every byte is hashed (in this thread) while a second thread
    writes the previous piece; tell() counts what was handed over."""

    def __init__(self, path: str | os.PathLike):
        self.f = open(path, "wb", buffering=0)
        self.h = hashlib.sha256()
        self.pos = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="trellis-ckpt-write")
        self._pending: list = []

    def _write_all(self, mv: memoryview) -> None:
        while len(mv):
            n = self.f.write(mv)
            mv = mv[n:]

    def write(self, data, keep=None) -> int:
        """Hand `data` (bytes-like) to the writer thread; `keep` stays referenced until it is written."""
        mv = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        for i in range(0, len(mv), CHUNK):
            piece = mv[i:i + CHUNK]
            self._pending.append((self._pool.submit(self._write_all, piece), keep))
            self.h.update(piece)
            while len(self._pending) > 2:  # bounded: at most a few pieces in flight
                self._pending.pop(0)[0].result()
        self.pos += len(mv)
        return len(mv)

    def tell(self) -> int:
        return self.pos

    def close(self, fsync: bool = True) -> tuple[str, int]:
        try:
            for fut, _ in self._pending:
                fut.result()
            self._pending.clear()
            if fsync:
                os.fsync(self.f.fileno())
        finally:
            self._pool.shutdown(wait=True)
            self.f.close()
        return self.h.hexdigest(), self.pos


class TrellisWriter(FileSystemWriter):
    """FileSystemWriter writing each rank's items into one file of raw bytes, hashed while written."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self.file_hashes: dict[str, tuple[str, int]] = {}

    def write_data(self, plan, planner) -> Future:
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        out = HashingFile(self.fs.concat_path(self.path, name))
        results = []
        try:
            # Non-tensor items first (small), then tensors, largest first is not needed: one sequential file.
            for item in sorted(plan.items, key=lambda i: i.type != WriteItemType.BYTE_IO):
                data = planner.resolve_data(item)
                off = out.tell()
                if item.type == WriteItemType.BYTE_IO:
                    n = out.write(data.getbuffer())
                    info = _StorageInfo(name, off, n)
                else:
                    mv = _raw_view(data)
                    want = item.tensor_data.chunk.sizes
                    numel = 1
                    for s in want:
                        numel *= s
                    if numel * data.element_size() != len(mv):
                        raise RuntimeError(f"{item.index.fqn}: chunk of {tuple(want)} but {len(mv)} bytes to write")
                    n = out.write(mv, keep=data)
                    info = _StorageInfo(name, off, n, transform_descriptors=[RAW_DESCRIPTOR])
                results.append(WriteResult(index=item.index, size_in_bytes=n, storage_data=info))
        finally:
            sha, nbytes = out.close(fsync=self.sync_files)
        self.file_hashes[name] = (sha, nbytes)
        fut: Future = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)
        # .metadata is small (a pickle on the coordinator): hash it from the file just written.
        p = Path(self._get_metadata_path())
        data = p.read_bytes()
        self.file_hashes[DCP_METADATA] = (hashlib.sha256(data).hexdigest(), len(data))


class TrellisReader(SafeFileSystemReader):
    """Reads TrellisWriter's raw items and torch's torch.save items; with `expected` ({file name relative to
    the DCP directory: sha256}) verifies every file from the bytes it reads (see the module doc).
    `bytes_read` counts the bytes this rank read from the directory (the metadata included)."""

    def __init__(self, path: str | os.PathLike, expected: dict[str, str] | None = None):
        super().__init__(path)
        self.expected = expected
        self.bytes_read = 0
        self.verified: set[str] = set()
        self._md = None

    def _bad(self, rel: str, why: str) -> CheckpointError:
        return CheckpointError(f"{Path(self.path) / rel}: {why}")

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = Path(self._get_metadata_path(kwargs.get("rank")))
        data = path.read_bytes()
        self.bytes_read += len(data)
        if self.expected is not None and path.name in self.expected:
            if hashlib.sha256(data).hexdigest() != self.expected[path.name]:
                raise self._bad(path.name, "checksum mismatch (the file is corrupted)")
            self.verified.add(path.name)
        metadata = RestrictedUnpickler(io.BytesIO(data), str(path)).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata, is_coordinator, *args, **kwargs):
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._md = metadata

    def prepare_global_plan(self, plans):
        if self.expected is None:
            return plans
        owner: dict[str, int] = {}
        for r, p in enumerate(plans):
            for f in sorted({self.storage_data[i.storage_index].relative_path for i in p.items}):
                owner.setdefault(f, r)
        shards = {s.relative_path for s in self.storage_data.values()}
        shards |= {f for f in self.expected if f.endswith(DEFAULT_SUFFIX)}
        for f in shards - owner.keys():
            owner[f] = 0  # a file nobody needs is still checked
        return [dataclasses.replace(p, storage_data=sorted(f for f, o in owner.items() if o == r))
                for r, p in enumerate(plans)]

    # ---- reading ---------------------------------------------------------------------------------------
    def read_data(self, plan, planner) -> Future:
        per_file: dict[str, dict] = {}
        for req in plan.items:
            info: _StorageInfo = self.storage_data[req.storage_index]
            per_file.setdefault(info.relative_path, {}).setdefault((info.offset, info.length), []).append(req)
        own = set(plan.storage_data or ()) if self.expected is not None else set()
        for rel in sorted(set(per_file) | own):
            items = sorted(per_file.get(rel, {}).items())
            path = Path(self.path) / rel
            try:
                f = open(path, "rb", buffering=0)
            except FileNotFoundError:
                raise self._bad(rel, "missing from the checkpoint") from None
            with f:
                if rel in own:
                    self._read_whole(f, rel, items, planner)
                else:
                    for (off, length), reqs in items:
                        f.seek(off)
                        if not self._read_into_target(f, length, reqs, planner, None):
                            self._serve(self._read_exact(f, length, rel), reqs, planner)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _read_exact(self, f, n: int, rel: str, h=None) -> memoryview:
        buf = bytearray(n)
        mv = memoryview(buf)
        got = 0
        while got < n:
            k = f.readinto(mv[got:got + CHUNK])
            if not k:
                raise self._bad(rel, f"truncated (ends {n - got} bytes early)")
            if h is not None:
                h.update(mv[got:got + k])
            got += k
        self.bytes_read += n
        return mv

    def _skip(self, f, n: int, rel: str, h) -> None:
        while n > 0:
            self._read_exact(f, min(n, CHUNK), rel, h)
            n -= CHUNK

    def _read_whole(self, f, rel: str, items, planner) -> None:
        """Read the file once from start to end, hashing every byte, serving the items on the way."""
        h = hashlib.sha256()
        pos = 0
        for (off, length), reqs in items:
            if off > pos:
                self._skip(f, off - pos, rel, h)  # a gap: another rank's items
            if off < pos:  # overlapping items never occur in DCP files; read them again rather than fail
                f.seek(off)
                self._serve(self._read_exact(f, length, rel), reqs, planner)
                f.seek(pos)
                continue
            if not self._read_into_target(f, length, reqs, planner, h):
                self._serve(self._read_exact(f, length, rel, h), reqs, planner)
            pos = off + length
        while True:  # the rest of the file
            chunk = f.read(CHUNK)
            if not chunk:
                break
            h.update(chunk)
            self.bytes_read += len(chunk)
        want = self.expected.get(rel)
        if want is None:
            raise self._bad(rel, "not listed in the checkpoint's metadata.json (the checkpoint was altered)")
        if h.hexdigest() != want:
            raise self._bad(rel, "checksum mismatch (the file is corrupted)")
        self.verified.add(rel)

    def _read_into_target(self, f, length: int, reqs, planner, h) -> bool:
        """The common case, without a copy: one request for a whole raw chunk whose destination is a
        contiguous CPU tensor of its dtype: read the bytes straight into it. False: not that case."""
        if len(reqs) != 1 or reqs[0].type == LoadItemType.BYTE_IO:
            return False
        req = reqs[0]
        info: _StorageInfo = self.storage_data[req.storage_index]
        if RAW_DESCRIPTOR not in (info.transform_descriptors or ()) or any(req.storage_offsets):
            return False
        md = self._md.state_dict_metadata.get(req.storage_index.fqn)
        chunk = next((c for c in getattr(md, "chunks", ()) if tuple(c.offsets) == tuple(req.storage_index.offset)),
                     None)
        if chunk is None or tuple(req.lengths) != tuple(chunk.sizes):
            return False
        target = planner.resolve_tensor(req).detach()
        if (target.device.type != "cpu" or not target.is_contiguous() or target.dtype != md.properties.dtype
                or target.numel() * target.element_size() != length or length == 0):
            return False
        mv = memoryview(target.reshape(-1).view(torch.uint8).numpy())
        got = 0
        while got < length:
            k = f.readinto(mv[got:got + CHUNK])
            if not k:
                raise self._bad(info.relative_path, f"truncated (ends {length - got} bytes early)")
            if h is not None:
                h.update(mv[got:got + k])
            got += k
        self.bytes_read += length
        planner.commit_tensor(req, target)
        return True

    def _serve(self, buf: memoryview, reqs, planner) -> None:
        info: _StorageInfo = self.storage_data[reqs[0].storage_index]
        for req in reqs:
            if req.type == LoadItemType.BYTE_IO:
                planner.load_bytes(req, io.BytesIO(bytes(buf)))
                continue
            if RAW_DESCRIPTOR in (info.transform_descriptors or ()):
                tensor = self._raw_tensor(buf, req)
            else:  # torch.save'd by torch's FileSystemWriter (older trellis checkpoints)
                tensor = torch.load(io.BytesIO(bytes(buf)), map_location="cpu", weights_only=True)
            tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
            target = planner.resolve_tensor(req).detach()
            if target.size() != tensor.size():
                raise CheckpointError(f"{self.path}: item {req.storage_index.fqn}: size {tuple(tensor.size())} "
                                      f"in the checkpoint, {tuple(target.size())} expected")
            target.copy_(tensor)
            planner.commit_tensor(req, target)

    def _raw_tensor(self, buf: memoryview, req) -> torch.Tensor:
        idx = req.storage_index
        md = self._md.state_dict_metadata[idx.fqn]
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{self.path}: item {idx.fqn} is not a tensor in the DCP metadata")
        chunk = next((c for c in md.chunks if tuple(c.offsets) == tuple(idx.offset)), None)
        if chunk is None:
            raise CheckpointError(f"{self.path}: item {idx.fqn} at {tuple(idx.offset)} is not in the DCP metadata")
        dtype = md.properties.dtype
        numel = 1
        for s in chunk.sizes:
            numel *= s
        if numel * torch._utils._element_size(dtype) != len(buf):
            raise CheckpointError(f"{self.path}: item {idx.fqn}: {len(buf)} bytes for a {tuple(chunk.sizes)} "
                                  f"{dtype} chunk (the checkpoint is damaged)")
        if numel == 0:
            return torch.empty(tuple(chunk.sizes), dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(tuple(chunk.sizes))


def empty_copy(tree):
    """The same nesting with every tensor (DTensor included) replaced by an uninitialised one like it: the
    target of a load that is applied only once it succeeded."""
    if isinstance(tree, torch.Tensor):
        return torch.empty_like(tree)
    if isinstance(tree, dict):
        return {k: empty_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [empty_copy(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(empty_copy(v) for v in tree)
    return tree
