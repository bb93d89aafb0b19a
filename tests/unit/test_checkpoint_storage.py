"""checkpoint/storage.py on real DCP (one process, no process group): the sha256 recorded while writing is the
file's (an independent hashlib of the bytes on disk), a load reads every byte once and verifies it, a flipped
byte is one CheckpointError naming the file, checkpoints in torch's own per-item torch.save format still load."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from trellis.engine.checkpoint.safe_load import SafeLoadPlanner
from trellis.engine.checkpoint.storage import RAW_DESCRIPTOR, TrellisReader, TrellisWriter, empty_copy
from trellis.errors import CheckpointError


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(64, 33, generator=g), "b16": torch.randn(129, generator=g).bfloat16(),
                      "idx": torch.arange(7, dtype=torch.int64), "empty": torch.zeros(0, 4),
                      "scalar": torch.tensor(3.5)},
            "optim": {"state.w.exp_avg": torch.randn(64, 33, generator=g), "param_groups.w.lr": 0.01,
                      "param_groups.w.betas": (0.9, 0.95)}}


def _save(path: Path, writer=None) -> TrellisWriter:
    writer = writer or TrellisWriter(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_state(), storage_writer=writer, no_dist=True)
    return writer


def _load(path: Path, expected=None) -> tuple[dict, TrellisReader]:
    target = empty_copy(_state())
    target["optim"]["param_groups.w.lr"] = None
    reader = TrellisReader(str(path), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return target, reader


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def _equal(a: dict, b: dict) -> None:
    for part in ("model", "optim"):
        for k, v in a[part].items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == b[part][k].dtype and torch.equal(v, b[part][k]), k
            else:
                assert v == b[part][k], k


def test_hashes_recorded_while_writing_are_the_files_and_one_pass_load_is_exact(tmp_path):
    ck = tmp_path / "state"
    w = _save(ck)
    files = sorted(p.name for p in ck.iterdir())
    assert files == [".metadata", "__0_0.distcp"]  # one data file for the rank, not one per item
    assert set(w.file_hashes) == set(files)
    for name, (sha, n) in w.file_hashes.items():
        assert sha == _sha(ck / name) and n == (ck / name).stat().st_size, name
    md = TrellisReader(str(ck)).read_metadata()
    assert all(RAW_DESCRIPTOR in s.transform_descriptors for i, s in md.storage_data.items()
               if i.fqn.startswith("model."))  # raw bytes, not a torch.save zip per tensor
    expected = {k: v[0] for k, v in w.file_hashes.items()}
    before = _rchar()
    got, reader = _load(ck, expected)
    read = _rchar() - before
    _equal(_state(), got)
    total = sum((ck / f).stat().st_size for f in files)
    assert reader.bytes_read == total and reader.verified == set(files)
    # independent of the reader's own counter: the process read each byte once (+ slack for /proc itself)
    assert total <= read < total + 16384, (read, total)


def test_a_flipped_byte_is_one_error_naming_the_file(tmp_path):
    ck = tmp_path / "state"
    w = _save(ck)
    expected = {k: v[0] for k, v in w.file_hashes.items()}
    shard = ck / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) - 5] ^= 0x01  # inside the last tensor's bytes: the load itself would not notice
    shard.write_bytes(bytes(data))
    from torch.distributed.checkpoint.api import CheckpointException

    from trellis.engine.checkpoint.safe_load import _find_checkpoint_error

    with pytest.raises(CheckpointException) as e:
        _load(ck, expected)
    err = _find_checkpoint_error(e.value)
    assert err is not None and err.messages == [f"{shard}: checksum mismatch (the file is corrupted)"]
    _load(ck, None)  # without the expected hashes it loads (the damage is invisible to DCP)


def test_torch_save_format_checkpoints_still_load(tmp_path):
    ck = tmp_path / "state"
    _save(ck, FileSystemWriter(str(ck)))
    expected = {p.name: _sha(p) for p in ck.iterdir()}
    got, reader = _load(ck, expected)
    _equal(_state(), got)
    assert reader.verified == set(expected)
