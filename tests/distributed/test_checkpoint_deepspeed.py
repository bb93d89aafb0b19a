"""DeepSpeed backend, ZeRO-3 on 2 ranks: 10 straight steps vs 5 steps + kill -9 of every rank + resume for 5
gives bit-identical fp32 losses and final (consolidated fp32) weights. DeepSpeed's own files live inside the
engine's atomic step-N directories."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trellis.engine.checkpoint import io

pytestmark = pytest.mark.distributed

ARGS = ["--data.seq_len=64", "--train.micro_batch_size=2", "--logging.progress=none", "--train.steps=10",
        "--train.warmup_steps=2", "--zero.backend=deepspeed", "--zero.stage=3", "--parallel.dp=2",
        "--train.grad_accum=2", "--checkpoint.interval=5"]


def _cmd(*extra):
    return [sys.executable, "-m", "trellis", "train", "tiny-llama", *ARGS, *extra]


def _losses(p: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, p.read_text().splitlines())}


def _weights(step_dir: Path) -> dict[str, torch.Tensor]:
    from trellis.engine.backends.deepspeed import DeepSpeedBackend

    return DeepSpeedBackend.consolidate_fp32(str(step_dir / "state"))


def test_zero3_exact_resume_after_kill9(repo, tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(repo / ".torch_extensions")}
    a = tmp_path / "straight"
    r = subprocess.run(_cmd(f"--checkpoint.dir={a}", f"--logging.metrics_file={tmp_path / 'a.jsonl'}"), cwd=repo,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    straight = _losses(tmp_path / "a.jsonl")

    b = tmp_path / "killed"
    p = subprocess.Popen(_cmd(f"--checkpoint.dir={b}", f"--logging.metrics_file={tmp_path / 'b.jsonl'}"), cwd=repo,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while io.latest_valid(b) is None:
        assert p.poll() in (None, 0) and time.monotonic() < deadline
        time.sleep(0.05)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=60)
    for step, path, _ in io.list_checkpoints(b):
        if step != 5:
            shutil.rmtree(path)
    r = subprocess.run(_cmd(f"--checkpoint.dir={b}", "--resume=auto", f"--logging.metrics_file={tmp_path / 'c.jsonl'}"),
                       cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _losses(tmp_path / "c.jsonl")
    assert sorted(resumed) == list(range(6, 11))
    assert all(resumed[s] == straight[s] for s in resumed), (resumed, straight)
    wa, wb = _weights(a / "step-10"), _weights(b / "step-10")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
