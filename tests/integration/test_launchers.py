"""Every launcher on this machine (2 CPU ranks, gloo, tiny Llama): the run completes and its losses equal the
torchrun run's; a rank killed mid-run ends the whole job non-zero within 60 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from .conftest import REPO, TRAIN_OVERRIDES, read_losses, run_trellis

pytestmark = pytest.mark.integration


def _launch(launcher: str, metrics, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(extra_env or {})}
    return run_trellis(["launch", "--launcher", launcher, "--timeout", "400", "configs/tiny-llama.toml",
                        *TRAIN_OVERRIDES, f"--logging.metrics_file={metrics}"], timeout=450, env=env)


def test_mpirun_open_mpi_matches_torchrun(openmpi, torchrun_losses, tmp_path):
    m = tmp_path / "m.jsonl"
    r = _launch("mpirun", m)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert read_losses(m) == torchrun_losses


def test_deepspeed_launcher_matches_torchrun(torchrun_losses, tmp_path):
    pytest.importorskip("deepspeed")
    m = tmp_path / "m.jsonl"
    r = _launch("deepspeed", m)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert read_losses(m) == torchrun_losses


def _wait_lines(path, n: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, f"launcher exited early with {proc.returncode}"
        time.sleep(0.2)
    raise TimeoutError(f"{path} did not reach {n} lines in {timeout}s")


def _rank_procs(launcher_pid: int) -> list[psutil.Process]:
    """Descendants of the launcher that are trellis ranks (`python -m trellis train`), not launcher agents.
    By process tree, not session: torchrun starts its workers in sessions of their own."""
    out = []
    for c in psutil.Process(launcher_pid).children(recursive=True):
        try:
            args = c.cmdline()
        except psutil.Error:
            continue
        joined = " ".join(args)
        if args and os.path.basename(args[0]).startswith("python") and "-m trellis train" in joined \
                and "torchrun" not in joined and "torch.distributed.run" not in joined:
            out.append(c)
    return out


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_killed_rank_ends_the_job_within_60s(launcher, request, tmp_path):
    if launcher == "mpirun":
        request.getfixturevalue("openmpi")
    m = tmp_path / "m.jsonl"
    # start_new_session: the test can find the ranks (same session id) and clean up the whole group.
    p = subprocess.Popen([sys.executable, "-m", "trellis", "launch", "--launcher", launcher, "configs/tiny-llama.toml",
                          "--train.steps=100000", "--logging.progress=none", f"--logging.metrics_file={m}"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ranks: list = []
    try:
        _wait_lines(m, 2, 300, p)
        ranks = _rank_procs(p.pid)
        assert len(ranks) == 2, ranks
        t0 = time.monotonic()
        ranks[-1].send_signal(signal.SIGKILL)
        rc = p.wait(timeout=90)
        elapsed = time.monotonic() - t0
        _, alive = psutil.wait_procs(ranks, timeout=30)
    finally:
        # Never leak ranks, whatever failed above (torchrun starts its workers in their own sessions).
        leftovers = list(ranks)
        try:
            leftovers += psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        for c in leftovers:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert rc != 0
    assert elapsed < 60, f"the job took {elapsed:.1f}s to end after a rank died"
    assert not alive, f"ranks left running: {alive}"
