"""The process tree of a self-spawned `trellis train` (2 CPU ranks, tiny-llama, checkpoint.dir set): a signal to
the parent reaches the ranks, which save a final checkpoint; the parent exits with 75 (trellis/exit_codes.py)
only once every rank is gone; a SIGKILLed parent takes its ranks with it (parent-death signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from trellis import exit_codes
from trellis.engine.checkpoint import io as io

pytestmark = pytest.mark.integration


def _start(repo: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    m, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    p = subprocess.Popen([sys.executable, "-m", "trellis", "train", "configs/tiny-llama.toml", "--train.steps=100000",
                          f"--checkpoint.dir={ck}", f"--logging.metrics_file={m}", "--logging.progress=none", *extra],
                         cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return p, m, ck


def _wait_steps(p: subprocess.Popen, m: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m.exists() and len(m.read_text().splitlines()) >= n:
            return
        assert p.poll() is None, p.communicate()[0][-3000:]
        time.sleep(0.1)
    raise TimeoutError(f"{m} did not reach {n} lines")


def _ranks(p: subprocess.Popen) -> list[psutil.Process]:
    kids = psutil.Process(p.pid).children()
    assert len(kids) == 2, kids
    return kids


def _alive(procs: list[psutil.Process]) -> list[int]:
    out = []
    for q in procs:
        try:
            if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                out.append(q.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _cleanup(p: subprocess.Popen, ranks: list[psutil.Process]) -> None:
    for q in [psutil.Process(p.pid)] if p.poll() is None else []:
        q.kill()
    for q in ranks:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass


def _last_checkpoint_is_valid(ck: Path, at_least: int) -> int:
    latest = io.latest_valid(ck)
    assert latest is not None, list(ck.iterdir()) if ck.exists() else "no checkpoint dir"
    meta = io.verify(latest)  # every file there, checksums match
    assert meta["step"] >= at_least
    assert not list(ck.glob("*.tmp"))
    return meta["step"]


@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGTERM, True)],
                         ids=["TERM-parent", "HUP-parent", "TERM-group"])
def test_signal_to_parent_saves_then_exits_75_after_the_ranks(repo, tmp_path, sig, group):
    p, m, ck = _start(repo, tmp_path)
    ranks: list[psutil.Process] = []
    try:
        _wait_steps(p, m, 3)
        ranks = _ranks(p)
        if group:  # what systemd, containers, `timeout` or Slurm do: the whole group at once
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)  # the parent only: it must pass the signal on
        out, _ = p.communicate(timeout=120)
        alive_at_parent_exit = _alive(ranks)
    finally:
        _cleanup(p, ranks)
    assert p.returncode == exit_codes.STOPPED_SAVED, out[-3000:]
    assert alive_at_parent_exit == [], f"ranks still running when the parent exited: {alive_at_parent_exit}"
    assert f"{signal.Signals(sig).name}: the ranks stopped; exit code 75" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    steps = len(m.read_text().splitlines())
    assert _last_checkpoint_is_valid(ck, 3) == steps  # the final save is of the last step trained


def test_sigkill_of_the_parent_leaves_no_orphan(repo, tmp_path):
    p, m, ck = _start(repo, tmp_path)
    ranks: list[psutil.Process] = []
    try:
        _wait_steps(p, m, 3)
        ranks = _ranks(p)
        p.kill()
        p.wait(timeout=30)
        t0 = time.monotonic()
        while _alive(ranks) and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        left, took = _alive(ranks), time.monotonic() - t0
    finally:
        _cleanup(p, ranks)
    print(f"ranks gone {took:.1f} s after the parent's SIGKILL")
    assert left == [], f"orphaned ranks: {left}"
    assert took < 20
    # The parent-death signal is SIGTERM: the ranks took their normal stop path and saved.
    _last_checkpoint_is_valid(ck, 3)


def test_parent_gone_before_the_rank_starts(tmp_path):
    """The race adopt_parent_death() closes: a rank whose parent died before its prctl exits at once."""
    code = ("import os, sys; from trellis.engine.process_tree import adopt_parent_death; "
            "adopt_parent_death({'TRELLIS_PARENT_PID': '1' if os.getppid() != 1 else '2'}); print('survived')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == exit_codes.FAILURE and "survived" not in r.stdout and "parent process" in r.stderr
