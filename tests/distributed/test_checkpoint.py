"""Checkpoints through the real CLI: exact resume after kill -9, re-sharded resume, kill during save, damage."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trellis.engine.checkpoint import io
from trellis.engine.checkpoint.convert import full_model_state

pytestmark = pytest.mark.distributed

BASE = ["--data.seq_len=64", "--train.micro_batch_size=2", "--logging.progress=none", "--train.steps=10",
        "--train.warmup_steps=2"]


def _train(repo, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trellis", "train", "tiny-llama", *BASE, *args], cwd=repo,
                          capture_output=True, text=True, timeout=timeout)


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def _start(repo, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trellis", "train", "tiny-llama", *BASE, *args], cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=30)


@pytest.fixture(scope="module")
def straight(repo, tmp_path_factory):
    """10 uninterrupted steps at dp=2 (grad_accum 2: global batch 8), final checkpoint at step 10."""
    d = tmp_path_factory.mktemp("straight")
    r = _train(repo, "--parallel.dp=2", "--train.grad_accum=2", f"--checkpoint.dir={d / 'ck'}",
               f"--logging.metrics_file={d / 'm.jsonl'}")
    assert r.returncode == 0, r.stderr[-3000:]
    return _losses(d / "m.jsonl"), full_model_state(d / "ck" / "step-10")


@pytest.fixture(scope="module")
def half(repo, tmp_path_factory):
    """5 steps at dp=2, checkpoint every 5, then the whole job is killed with SIGKILL."""
    d = tmp_path_factory.mktemp("half")
    ck = d / "ck"
    p = _start(repo, "--parallel.dp=2", "--train.grad_accum=2", f"--checkpoint.dir={ck}",
               "--checkpoint.interval=5", f"--logging.metrics_file={d / 'm.jsonl'}")
    deadline = time.monotonic() + 240
    while io.latest_valid(ck) is None:  # the run may also finish all 10 steps before the kill lands
        assert p.poll() in (None, 0) and time.monotonic() < deadline, p.stderr.read() if p.poll() else "timeout"
        time.sleep(0.05)
    _kill_group(p)
    step5 = ck / "step-5"
    assert io.latest_valid(ck) in (step5, ck / "step-10")
    # Keep only step-5, the checkpoint every resume below starts from.
    for s, path, _ in io.list_checkpoints(ck):
        if s != 5:
            import shutil

            shutil.rmtree(path)
    return step5


def test_exact_resume_after_kill9(repo, tmp_path, straight, half):
    losses, weights = straight
    ck = tmp_path / "ck"
    import shutil

    shutil.copytree(half, ck / "step-5")
    r = _train(repo, "--parallel.dp=2", "--train.grad_accum=2", f"--checkpoint.dir={ck}", "--resume=auto",
               f"--logging.metrics_file={tmp_path / 'm.jsonl'}")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _losses(tmp_path / "m.jsonl")
    assert sorted(resumed) == list(range(6, 11))
    assert all(resumed[s] == losses[s] for s in resumed), (resumed, losses)  # bit-identical fp32
    final = full_model_state(ck / "step-10")
    assert all(torch.equal(final[k], weights[k]) for k in weights)


@pytest.mark.parametrize("layout", [
    ["--parallel.dp=1", "--train.grad_accum=4"],                    # 1 process
    ["--parallel.dp=2", "--train.grad_accum=2", "--zero.stage=3"],  # FSDP2-sharded
    ["--parallel.dp=2", "--train.grad_accum=2", "--zero.stage=1"],  # sharded optimizer state
    ["--parallel.dp=4", "--train.grad_accum=1"],                    # more ranks
], ids=["dp1", "dp2-zero3", "dp2-zero1", "dp4"])
def test_resharded_resume_continues_the_loss(repo, tmp_path, straight, half, layout):
    import shutil

    losses, _ = straight
    ck = tmp_path / "ck"
    shutil.copytree(half, ck / "step-5")
    r = _train(repo, *layout, f"--checkpoint.dir={ck}", "--resume=auto", f"--logging.metrics_file={tmp_path / 'm.jsonl'}")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _losses(tmp_path / "m.jsonl")
    delta = max(abs(resumed[s] - losses[s]) for s in range(6, 11))
    print(f"resume dp2 -> {' '.join(layout)}: max |Δloss| steps 6-10 = {delta:.2e}")
    assert delta <= 1e-5


def test_corrupt_shard_is_named(repo, tmp_path, half):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(half, ck / "step-5")
    shard = next(p for p in (ck / "step-5" / "state").iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = _train(repo, "--parallel.dp=2", "--train.grad_accum=2", f"--checkpoint.dir={ck}", "--resume=auto",
               f"--logging.metrics_file={tmp_path / 'm.jsonl'}")
    assert r.returncode == 2
    assert shard.name in r.stderr and "checksum" in r.stderr and "Traceback" not in r.stderr


def test_wrong_model_is_refused_with_mismatches(repo, tmp_path, half):
    r = subprocess.run([sys.executable, "-m", "trellis", "train", "tiny-gpt2", *BASE, "--parallel.dp=2",
                        "--train.grad_accum=2", f"--checkpoint.resume={half}", f"--checkpoint.dir={tmp_path}",
                        f"--logging.metrics_file={tmp_path / 'm.jsonl'}"],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "model_type: checkpoint 'llama' != this run 'gpt2'" in r.stderr


def test_kill_during_save_never_leaves_a_partial_checkpoint(repo, tmp_path):
    """20 trials: one process saving every step is SIGKILLed at a random moment; each time the newest
    valid checkpoint passes its checksums and the next trial resumes from it, losing <= 1 step."""
    ck = tmp_path / "ck"
    rng = random.Random(0)
    resumed_ok = 0
    last_step = 0
    for trial in range(20):
        m = tmp_path / f"m{trial}.jsonl"
        p = _start(repo, "--parallel.dp=1", "--train.steps=100000", f"--checkpoint.dir={ck}",
                   "--checkpoint.interval=1", "--checkpoint.keep_last_k=2", "--resume=auto", f"--logging.metrics_file={m}")
        deadline = time.monotonic() + 120
        while not (m.exists() and m.read_text().count("\n") >= 1):
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()[-2000:] if p.poll() is not None else "timeout"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        _kill_group(p)
        logged = max(_losses(m)) if m.read_text().strip() else last_step
        latest = io.latest_valid(ck)
        assert latest is not None
        meta = io.verify(latest)  # raises on any partial or corrupted file
        assert meta["step"] >= logged - 1, (meta["step"], logged)
        assert meta["step"] >= last_step
        last_step = meta["step"]
        resumed_ok += 1
    print(f"{resumed_ok}/20 kill-during-save trials left a valid checkpoint; reached step {last_step}")
    assert resumed_ok == 20 and last_step > 20
