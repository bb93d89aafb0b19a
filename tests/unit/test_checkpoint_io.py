"""Checkpoint directories without processes: publish, validity, checksums, pruning, model mismatch."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import LlamaConfig

from trellis.engine.checkpoint import io
from trellis.engine.checkpoint.checkpointer import check_compatible, model_signature
from trellis.errors import CheckpointError


def _publish(root: Path, step: int, payload: bytes = b"x" * 1000) -> Path:
    tmp = io.tmp_dir(root, step)
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "__0_0.distcp").write_bytes(payload)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    io.write_metadata_and_publish(tmp, io.step_dir(root, step), {"step": step})
    return io.step_dir(root, step)


def test_publish_renames_and_records_every_file(tmp_path):
    p = _publish(tmp_path, 3)
    assert not io.tmp_dir(tmp_path, 3).exists() and p.is_dir()
    meta = io.verify(p)
    assert set(meta["files"]) == {"state/__0_0.distcp", "trainer_state.json"}
    assert meta["files"]["state/__0_0.distcp"]["bytes"] == 1000


def test_incomplete_directories_are_never_picked(tmp_path):
    _publish(tmp_path, 1)
    _publish(tmp_path, 2)
    # A save killed before rename, and a step dir whose metadata never got written (e.g. copied by hand).
    (io.tmp_dir(tmp_path, 3) / "state").mkdir(parents=True)
    (tmp_path / "step-4").mkdir()
    (tmp_path / "step-5").mkdir()
    (tmp_path / "step-5" / io.METADATA).write_text('{"step": 5, "fi')  # truncated JSON
    assert io.latest_valid(tmp_path) == tmp_path / "step-2"
    listed = {p.name: m is not None for _, p, m in io.list_checkpoints(tmp_path)}
    assert listed == {"step-1": True, "step-2": True, "step-4": False, "step-5": False}
    assert io.latest_valid(tmp_path / "missing") is None


def test_corrupted_byte_names_the_file(tmp_path):
    p = _publish(tmp_path, 7)
    shard = p / "state" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[500] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: checksum mismatch"):
        io.verify(p)


def test_truncated_and_missing_files_are_named(tmp_path):
    p = _publish(tmp_path, 7)
    (p / "state" / "__0_0.distcp").write_bytes(b"x" * 10)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: truncated"):
        io.verify(p)
    (p / "trainer_state.json").unlink()
    (p / "state" / "__0_0.distcp").write_bytes(b"x" * 1000)
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: missing"):
        io.verify(p)


def test_prune_keeps_newest_k_and_drops_stale_tmp(tmp_path):
    for s in (1, 2, 3, 4):
        _publish(tmp_path, s)
    (io.tmp_dir(tmp_path, 2)).mkdir()   # stale: older than the newest valid
    (io.tmp_dir(tmp_path, 9)).mkdir()   # may be a save in flight: kept
    io.prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-4", "step-9.tmp"]


def test_republish_of_same_step_replaces_it(tmp_path):
    _publish(tmp_path, 5, b"a" * 10)
    p = _publish(tmp_path, 5, b"b" * 20)
    assert io.verify(p)["files"]["state/__0_0.distcp"]["bytes"] == 20


def test_other_model_lists_every_mismatch():
    small = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=256)
    other = LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=256)
    cfg = SimpleNamespace(peft=SimpleNamespace(method="none"))
    check_compatible({"model": model_signature(small), "peft": "none"}, small, cfg)  # same model: fine
    with pytest.raises(CheckpointError) as e:
        check_compatible({"model": model_signature(other), "peft": "lora"}, small, cfg)
    text = str(e.value)
    assert "hidden_size: checkpoint 128 != this run 64" in text
    assert "num_layers: checkpoint 4 != this run 2" in text
    assert "peft.method: checkpoint 'lora' != this run 'none'" in text
