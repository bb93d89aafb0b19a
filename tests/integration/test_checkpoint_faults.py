"""Checkpoint faults through the real CLI on 2 gloo ranks: a disk that fills during a save (a real tmpfs of a
few MiB, mounted as root), a resume that would change the run, and a damaged newest checkpoint that
`--resume auto` must skip (and `checkpoint list` must call invalid)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trellis.engine.checkpoint import io

pytestmark = pytest.mark.integration

# tiny-llama at seq_len 32: one checkpoint (dp2, fp32, AdamW state) is about 3.4 MiB.
BASE = ["--data.seq_len=32", "--train.micro_batch_size=2", "--logging.progress=none", "--parallel.dp=2",
        "--train.schedule=constant"]


def _train(repo, *args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trellis", "train", "tiny-llama", *BASE, *args], cwd=repo,
                          capture_output=True, text=True, timeout=timeout)


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 5 MiB (tmpfs): room for one checkpoint, not two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5M", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount(8) for a small tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _resize(mnt: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


def test_disk_full_mid_write_stops_with_one_line_and_no_partial(repo, tmp_path, small_disk):
    """The first save finds 1 MiB free: DCP's shard write hits ENOSPC on a rank. Every rank stops at the same
    point, one line names the cause, the step-N.tmp is gone, exit 1."""
    _resize(small_disk, "1M")
    ck = small_disk / "ck"
    r = _train(repo, "--train.steps=3", f"--checkpoint.dir={ck}", "--checkpoint.interval=1",
               f"--logging.metrics_file={tmp_path / 'm.jsonl'}")
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "step-1.tmp" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert list(ck.glob("*.tmp")) == [] and io.list_checkpoints(ck) == []
    assert _steps(tmp_path / "m.jsonl") == [1]  # stopped at the failed save (checkpoint.on_save_error=stop)


def test_disk_full_continue_keeps_the_last_checkpoint_and_resumes_in_place(repo, tmp_path, small_disk):
    """step-1 fits; step-2 is refused by the free-space check (the last checkpoint's size) and training goes
    on (on_save_error=continue); the final save fails too -> exit 1, one line. step-1 still verifies, no .tmp
    is left, and once the disk has room an in-place `--resume auto` finishes the run."""
    ck = small_disk / "ck"
    m = tmp_path / "m.jsonl"
    r = _train(repo, "--train.steps=3", f"--checkpoint.dir={ck}", "--checkpoint.interval=1",
               "--checkpoint.on_save_error=continue", f"--logging.metrics_file={m}")
    assert r.returncode == 1, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: checkpoint step-2.tmp not saved")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "step-3.tmp" in errors[0] and "No space left" in errors[0], r.stderr[-3000:]
    assert _steps(m) == [1, 2, 3]  # training went on past the failed save
    assert list(ck.glob("*.tmp")) == []
    assert [s for s, _, _ in io.list_checkpoints(ck)] == [1]
    io.verify(ck / "step-1")
    _resize(small_disk, "16M")
    r = _train(repo, "--train.steps=3", f"--checkpoint.dir={ck}", "--checkpoint.interval=1", "--resume=auto",
               f"--logging.metrics_file={tmp_path / 'm2.jsonl'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(tmp_path / "m2.jsonl") == [2, 3]


@pytest.fixture(scope="module")
def two_checkpoints(repo, tmp_path_factory):
    d = tmp_path_factory.mktemp("ck2")
    r = _train(repo, "--train.steps=2", f"--checkpoint.dir={d / 'ck'}", "--checkpoint.interval=1",
               f"--logging.metrics_file={d / 'm.jsonl'}")
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "ck"


def test_resume_that_changes_the_run_is_refused_unless_allowed(repo, tmp_path, two_checkpoints):
    ck = tmp_path / "ck"
    shutil.copytree(two_checkpoints, ck)
    m = tmp_path / "m.jsonl"
    changed = ["--data.seq_len=16", "--train.seed=7", "--train.grad_accum=4"]
    r = _train(repo, "--train.steps=3", f"--checkpoint.dir={ck}", "--resume=auto", *changed,
               f"--logging.metrics_file={m}")
    assert r.returncode == 2, r.stderr[-3000:]
    for line in ("data.seq_len: checkpoint 32 -> this run 16", "train.seed: checkpoint 1234 -> this run 7",
                 "train.global_batch_size: checkpoint 8 -> this run 16",
                 "--resume-allow-change data.seq_len,train.global_batch_size,train.seed"):
        assert line in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and _steps(m) == []
    r = _train(repo, "--train.steps=3", f"--checkpoint.dir={ck}", "--resume=auto", *changed,
               "--resume-allow-change=data.seq_len,train.seed,train.global_batch_size", f"--logging.metrics_file={m}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(m) == [3]


def test_resume_auto_skips_a_damaged_newest_checkpoint_and_list_says_so(repo, tmp_path, two_checkpoints):
    ck = tmp_path / "ck"
    shutil.copytree(two_checkpoints, ck)
    shard = next((ck / "step-2" / "state").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    ls = subprocess.run([sys.executable, "-m", "trellis", "checkpoint", "list", str(ck)], cwd=repo,
                        capture_output=True, text=True, timeout=60)
    assert ls.returncode == 0, ls.stderr
    rows = dict(line.split(None, 1) for line in ls.stdout.splitlines())
    assert "INVALID" in rows["step-2"] and "checksum" in rows["step-2"], ls.stdout
    assert rows["step-1"].rstrip().endswith("valid  <- latest"), ls.stdout
    quick = subprocess.run([sys.executable, "-m", "trellis", "checkpoint", "list", "--no-verify", str(ck)],
                           cwd=repo, capture_output=True, text=True, timeout=60)
    assert "not verified  <- latest" in dict(line.split(None, 1) for line in quick.stdout.splitlines())["step-2"]
    m = tmp_path / "m.jsonl"
    r = _train(repo, "--train.steps=3", f"--checkpoint.dir={ck}", "--resume=auto", f"--logging.metrics_file={m}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint: skipped step-2:" in r.stderr and "checksum" in r.stderr, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step-1 (step 1)" in r.stderr
    assert _steps(m) == [2, 3]


def test_resume_reads_the_checkpoint_once_and_a_flipped_shard_byte_stops_it(repo, tmp_path, two_checkpoints):
    """Verify while reading: a resume reads every file about once (rank 0's read(2) bytes, /proc/self/io, not
    the reader's own count: a separate verify pass would double them), and a shard byte flipped where DCP
    itself would not notice is one line naming the file, exit 2, before training."""
    ck = tmp_path / "ck"
    shutil.copytree(two_checkpoints, ck)
    m = tmp_path / "m.jsonl"
    r = _train(repo, "--train.steps=3", f"--checkpoint.dir={ck}", f"--resume={ck / 'step-2'}",
               f"--logging.metrics_file={m}")
    assert r.returncode == 0, r.stderr[-3000:]
    read = re.search(r"resumed from .*step-2 \(step 2\) .*; rank 0 read (\d+) bytes, the checkpoint has (\d+)",
                     r.stderr)
    assert read, r.stderr[-3000:]
    got, total = int(read.group(1)), int(read.group(2))
    shards = sum(p.stat().st_size for p in (ck / "step-2" / "state").glob("*.distcp"))
    assert total >= shards and shards <= got < total + shards // 2, (got, total, shards)
    assert _steps(m) == [3]
    shard = next((ck / "step-2" / "state").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # the last bytes of a tensor: DCP would load the wrong value without complaint
    shard.write_bytes(bytes(data))
    r = _train(repo, "--train.steps=3", f"--checkpoint.dir={ck}", f"--resume={ck / 'step-2'}",
               f"--logging.metrics_file={tmp_path / 'm2.jsonl'}")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"error: {shard}: checksum mismatch (the file is corrupted)" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "m2.jsonl").exists()
