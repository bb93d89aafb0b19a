"""The checkpoint.dir lease with real `trellis train` runs: a second run on a directory in use exits 2 naming
the first; a lease left by a dead run is taken over; a fresh lease of another host refuses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from trellis import exit_codes
from trellis.engine.checkpoint.lease import LEASE_FILE, _machine

pytestmark = pytest.mark.integration

TRAIN = [sys.executable, "-m", "trellis", "train", "configs/tiny-llama.toml", "--logging.progress=none"]


def _run(repo, args, timeout=180):
    return subprocess.run([*TRAIN, *args], cwd=repo, capture_output=True, text=True, timeout=timeout)


def test_second_run_on_the_same_dir_refuses_naming_the_first(repo, tmp_path):
    ck, m = tmp_path / "ck", tmp_path / "m1.jsonl"
    first = subprocess.Popen([*TRAIN, "--train.steps=100000", f"--checkpoint.dir={ck}", f"--logging.metrics_file={m}",
                              "--checkpoint.lease_interval_s=1"], cwd=repo, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (m.exists() and m.read_text().count("\n") >= 2):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
            time.sleep(0.1)
        rank0 = json.loads((ck / LEASE_FILE).read_text())["pid"]
        assert rank0 in [c.pid for c in psutil.Process(first.pid).children()]
        second = _run(repo, ["--train.steps=2", "--parallel.dp=1", f"--checkpoint.dir={ck}",
                             f"--logging.metrics_file={tmp_path / 'm2.jsonl'}"])
        assert first.poll() is None  # the first run goes on
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            for c in psutil.Process(first.pid).children():
                c.kill()
            first.kill()
    assert second.returncode == exit_codes.USER_ERROR, second.stderr[-3000:]
    assert f"is in use by another run: pid {rank0} (rank 0 of `trellis train` pid {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr and not (tmp_path / "m2.jsonl").exists()
    assert first.returncode == exit_codes.STOPPED_SAVED, out[-3000:]
    assert not (ck / LEASE_FILE).exists()  # released at the first run's exit


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _lease(ck: Path, **kw) -> None:
    ck.mkdir(parents=True)
    now = time.time()
    (ck / LEASE_FILE).write_text(json.dumps({**_machine(), "pid_started": None, "job_id": "77", "started": now - 60,
                                             "heartbeat": now, "interval_s": 30.0, "token": "x", **kw}))


def test_stale_lease_is_taken_over_and_foreign_fresh_lease_refuses(repo, tmp_path):
    stale = tmp_path / "stale"
    pid = _dead_pid()
    _lease(stale, pid=pid)
    r = _run(repo, ["--train.steps=2", "--parallel.dp=1", f"--checkpoint.dir={stale}",
                    f"--logging.metrics_file={tmp_path / 'm.jsonl'}"])
    assert r.returncode == exit_codes.OK, r.stderr[-3000:]
    assert f"taking over the lease of pid {pid} on host" in r.stderr and f"its process {pid} is gone" in r.stderr
    assert (stale / "step-2").is_dir() and not (stale / LEASE_FILE).exists()

    foreign = tmp_path / "foreign"
    _lease(foreign, host="gpu-node-17", boot_id="b", pid_ns="p", pid=31337)
    r = _run(repo, ["--train.steps=2", "--parallel.dp=1", f"--checkpoint.dir={foreign}",
                    f"--logging.metrics_file={tmp_path / 'm2.jsonl'}"])
    assert r.returncode == exit_codes.USER_ERROR, r.stderr[-3000:]
    assert "in use by another run: pid 31337 on host gpu-node-17, Slurm job 77" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert json.loads((foreign / LEASE_FILE).read_text())["pid"] == 31337 and not list(foreign.glob("step-*"))


def test_a_run_whose_lease_was_taken_over_stops_without_writing(repo, tmp_path):
    """The fence: another run (a foreign host) took the lease over while this one trains; its next save checks
    the lease (before it starts and before step-N.tmp becomes step-N), stops with one line naming the new
    holder, exit 1, no step-N published after the takeover and no step-N.tmp left; the new lease stays."""
    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    p = subprocess.Popen([*TRAIN, "--train.steps=100000", "--parallel.dp=1", "--data.seq_len=32",
                          f"--checkpoint.dir={ck}", "--checkpoint.interval=2", f"--logging.metrics_file={m}"], cwd=repo,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (ck / "step-2").is_dir():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
            time.sleep(0.05)
        now = time.time()
        new = {"host": "gpu-node-17", "boot_id": "b", "pid_ns": "p", "pid": 31337, "pid_started": None,
               "job_id": "77", "started": now, "heartbeat": now, "interval_s": 30.0, "token": "theirs"}
        tmp = ck / "lease.new"
        tmp.write_text(json.dumps(new))
        tmp.rename(ck / LEASE_FILE)  # atomically, as the lease code itself replaces it
        taken = max(s for s in (int(d.name.split("-")[1]) for d in ck.glob("step-*") if d.name[5:].isdigit()))
        _, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            for c in psutil.Process(p.pid).children():
                c.kill()
            p.kill()
    assert p.returncode == exit_codes.FAILURE, err[-3000:]
    assert ("was taken over by pid 31337 on host gpu-node-17, Slurm job 77" in err
            and "this run stops without writing there" in err), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    steps = sorted(int(d.name.split("-")[1]) for d in ck.glob("step-*") if d.name[5:].isdigit())
    assert steps and steps[-1] <= taken + 2, (steps, taken)  # at most the save already past its fence
    assert not list(ck.glob("step-*.tmp"))
    assert json.loads((ck / LEASE_FILE).read_text())["token"] == "theirs"  # the new holder's lease is kept
