"""The lease on checkpoint.dir (engine/checkpoint/lease.py): refusal naming the holder, takeover of stale / dead leases,
heartbeat, release. Other processes are real processes (a child that holds a lease, a dead pid)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from trellis.engine.checkpoint.lease import LEASE_FILE, Lease, _machine
from trellis.errors import CheckpointError


def _write_lease(root, **kw):
    root.mkdir(parents=True, exist_ok=True)
    now = time.time()
    rec = {**_machine(), "pid": 1, "pid_started": None, "job_id": None, "started": now - 5, "heartbeat": now,
           "interval_s": 30.0, "token": "other", **kw}
    (root / LEASE_FILE).write_text(json.dumps(rec))
    return rec


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_acquire_writes_and_release_removes(tmp_path):
    lease = Lease(tmp_path / "ck", interval_s=0.2)
    lease.acquire()
    rec = json.loads((tmp_path / "ck" / LEASE_FILE).read_text())
    assert rec["pid"] == os.getpid() and rec["host"] == _machine()["host"] and rec["heartbeat"] >= rec["started"]
    time.sleep(0.7)
    assert json.loads((tmp_path / "ck" / LEASE_FILE).read_text())["heartbeat"] > rec["heartbeat"]  # refreshed
    lease.release()
    assert not (tmp_path / "ck" / LEASE_FILE).exists()


def test_foreign_host_with_fresh_heartbeat_refuses(tmp_path):
    _write_lease(tmp_path, host="node-0042.cluster", boot_id="x", pid=4242, job_id="9001")
    with pytest.raises(CheckpointError) as e:
        Lease(tmp_path).acquire()
    msg = str(e.value)
    assert "pid 4242 on host node-0042.cluster" in msg and "Slurm job 9001" in msg and "heartbeat" in msg
    assert "another checkpoint.dir" in msg and "wait" in msg
    assert json.loads((tmp_path / LEASE_FILE).read_text())["pid"] == 4242  # left alone


def test_foreign_host_with_stale_heartbeat_is_taken_over(tmp_path, capsys):
    _write_lease(tmp_path, host="node-0042.cluster", boot_id="x", pid=4242, heartbeat=time.time() - 500,
                 interval_s=30.0)
    lease = Lease(tmp_path)
    lease.acquire()
    try:
        assert json.loads((tmp_path / LEASE_FILE).read_text())["pid"] == os.getpid()
        err = capsys.readouterr().err
        assert "taking over the lease of pid 4242 on host node-0042.cluster" in err and "heartbeat is 500 s old" in err
    finally:
        lease.release()


def test_timeout_follows_the_holders_interval(tmp_path):
    _write_lease(tmp_path, host="elsewhere", heartbeat=time.time() - 20, interval_s=1.0)  # 3 x 1 + 10 = 13 s
    lease = Lease(tmp_path)
    lease.acquire()
    lease.release()
    _write_lease(tmp_path, host="elsewhere", heartbeat=time.time() - 20, interval_s=30.0)  # 100 s: fresh
    with pytest.raises(CheckpointError):
        Lease(tmp_path).acquire()
    with pytest.raises(CheckpointError):
        Lease(tmp_path, timeout_s=60).acquire()
    lease = Lease(tmp_path, timeout_s=5)  # explicit checkpoint.lease_timeout_s
    lease.acquire()
    lease.release()


def test_dead_process_on_this_machine_is_taken_over(tmp_path, capsys):
    pid = _dead_pid()
    _write_lease(tmp_path, pid=pid)  # fresh heartbeat, but the process is gone
    lease = Lease(tmp_path)
    lease.acquire()
    lease.release()
    assert f"its process {pid} is gone" in capsys.readouterr().err


def test_reused_pid_is_not_the_holder(tmp_path):
    _write_lease(tmp_path, pid=os.getppid(), pid_started=12345.0)  # a live pid, but another process's start
    lease = Lease(tmp_path)
    lease.acquire()  # raises CheckpointError if the reused pid were taken for the holder
    held = json.loads((tmp_path / LEASE_FILE).read_text())
    assert held["pid"] == os.getpid() and held["token"] != "other"
    lease.release()


def test_live_process_on_this_machine_refuses_then_releases(tmp_path):
    root = tmp_path / "ck"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from trellis.engine.checkpoint.lease import Lease
        lease = Lease({str(root)!r}, interval_s=0.5)
        lease.acquire()
        print("held", flush=True)
        sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError) as e:
            Lease(root).acquire()
        assert f"pid {holder.pid} on host {_machine()['host']}" in str(e.value)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
    assert not (root / LEASE_FILE).exists()  # released at exit
    lease = Lease(root)
    lease.acquire()
    lease.release()


def test_same_process_again_is_not_refused(tmp_path):
    first = Lease(tmp_path, interval_s=0.2)
    first.acquire()
    second = Lease(tmp_path, interval_s=0.2)
    second.acquire()  # e.g. a second Trainer in one process (tests, notebooks)
    time.sleep(0.5)
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == second.token
    assert not second.lost
    second.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_taken_lease_is_noticed_and_not_removed(tmp_path, capsys):
    lease = Lease(tmp_path, interval_s=0.2)
    lease.acquire()
    _write_lease(tmp_path, host="elsewhere", pid=7)
    time.sleep(0.6)
    assert lease.lost and "now held by pid 7 on host elsewhere" in capsys.readouterr().err
    lease.release()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["pid"] == 7
