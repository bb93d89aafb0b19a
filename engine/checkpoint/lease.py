"""An exclusive lease on checkpoint.dir: `<checkpoint.dir>/.trellis-lock`, so two runs never write (or resume
from) one directory at once.

Rank 0 writes the lease before training: JSON {host, pid, job_id, started, heartbeat, ...}, replaced
atomically (write a temporary file, rename). A daemon thread refreshes `heartbeat` every
checkpoint.lease_interval_s (30 s). A second run on the directory reads the lease and
- refuses (a CheckpointError naming the holder: host, pid, Slurm job, age; exit 2) while the holder is alive;
- takes it over, with a warning, when the holder's heartbeat is older than checkpoint.lease_timeout_s (default
  3 x the holder's interval + 10 s: a killed run, a node that died, a job requeued onto another node), or when
  the holder ran on this same machine (same host name, boot and PID namespace) and its process is gone (a pid
  that no longer exists, or that another process reuses: its start time differs).
The lease is removed when the run exits (any Python-level exit; a SIGKILLed run leaves it, and the next run
takes it over as above).

Same machine: the read-check-write is serialised with fcntl.flock on `.trellis-lock.guard` (a separate file:
the lease itself is replaced by rename, which a lock on it would not survive). Shared filesystems: on NFS,
flock is emulated with POSIX locks where the server supports them and may be advisory only / unavailable on
some mounts (Lustre without `flock`, some FUSE file systems), so two nodes starting in the same second could
both see no lease. The heartbeat protects everything else: a fresh heartbeat from any host refuses, and the
judgement of "stale" uses wall clocks, so hosts' clocks must agree to within the timeout (NTP).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from trellis.errors import CheckpointError

from ..distributed import broadcast_object

LEASE_FILE = ".trellis-lock"
GUARD_FILE = ".trellis-lock.guard"
DEFAULT_INTERVAL_S = 30.0
MARGIN_S = 10.0

_HELD: list["Lease"] = []


def _machine() -> dict:
    """What makes two pids comparable: same host name, same boot, same PID namespace."""
    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip() if not path.startswith("ns:") else os.readlink(path[3:])
        except OSError:
            return ""

    return {"host": socket.gethostname(), "boot_id": read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": read("ns:/proc/self/ns/pid")}


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _process_alive(pid: int, started: float | None) -> bool:
    """pid runs (not a zombie) and, when its start time was recorded, is still that same process."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(p.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s / 3600:.1f} h ago"


def describe_holder(holder: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    job = f", Slurm job {holder['job_id']}" if holder.get("job_id") else ""
    started = holder.get("started")
    start = (f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))} ({_ago(now - started)})"
             if isinstance(started, (int, float)) else "")
    hb = holder.get("heartbeat")
    beat = f", last heartbeat {_ago(now - hb)}" if isinstance(hb, (int, float)) else ""
    parent = f" (rank 0 of `trellis train` pid {holder['parent_pid']})" if holder.get("parent_pid") else ""
    return f"pid {holder.get('pid')}{parent} on host {holder.get('host')}{job}{start}{beat}"


class Lease:
    def __init__(self, root: Path, interval_s: float = DEFAULT_INTERVAL_S, timeout_s: float = 0.0):
        self.root = Path(root)
        self.path = self.root / LEASE_FILE
        self.interval_s = float(interval_s) or DEFAULT_INTERVAL_S
        self.timeout_s = float(timeout_s)
        self.token = uuid.uuid4().hex
        self.lost = False
        self._record: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- file access -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self):
        fd = os.open(self.root / GUARD_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
            except (ImportError, OSError):
                pass  # no flock here (see the module doc): the heartbeat still protects the directory
            yield
        finally:
            os.close(fd)  # releases the flock

    def read(self) -> dict | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(text)
        except ValueError:
            return {"corrupt": text[:200]}
        return rec if isinstance(rec, dict) else {"corrupt": text[:200]}

    def _write(self, rec: dict) -> None:
        tmp = self.root / f"{LEASE_FILE}.{os.getpid()}.{self.token[:8]}.tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # ---- judging a holder ------------------------------------------------------------------------------
    def stale_reason(self, holder: dict, now: float | None = None) -> str | None:
        """Why `holder` no longer holds the directory, or None when it does."""
        now = time.time() if now is None else now
        if "corrupt" in holder:
            return "the lease file is unreadable"
        me = _machine()
        same_machine = all(holder.get(k) == me[k] for k in ("host", "boot_id", "pid_ns"))
        if same_machine and isinstance(holder.get("pid"), int):
            if holder["pid"] == os.getpid() and holder.get("pid_started") == _process_start(os.getpid()):
                return "it is this process"
            if not _process_alive(holder["pid"], holder.get("pid_started")):
                return f"its process {holder['pid']} is gone"
        hb = holder.get("heartbeat")
        timeout = self.timeout_s or 3 * float(holder.get("interval_s") or DEFAULT_INTERVAL_S) + MARGIN_S
        if not isinstance(hb, (int, float)):
            return "it has no heartbeat time"
        if now - hb > timeout:
            return f"its heartbeat is {now - hb:.0f} s old (timeout {timeout:.0f} s)"
        return None

    # ---- holding ---------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease or raise CheckpointError naming the holder."""
        for old in [h for h in _HELD if h.root.resolve() == self.root.resolve()]:
            old.release()  # an earlier run of this same process (tests, notebooks)
        self.root.mkdir(parents=True, exist_ok=True)
        with self._guard():
            holder = self.read()
            now = time.time()
            if holder is not None:
                why = self.stale_reason(holder, now)
                if why is None:
                    raise CheckpointError(
                        f"checkpoint.dir={self.root} is in use by another run: {describe_holder(holder, now)} "
                        f"(lease {self.path}). Two runs on one directory overwrite each other's checkpoints. Use "
                        f"another checkpoint.dir, or wait for that run to end: its lease is removed when it exits, "
                        f"and taken over once its heartbeat is older than "
                        f"{self.timeout_s or 3 * float(holder.get('interval_s') or DEFAULT_INTERVAL_S) + MARGIN_S:.0f} s "
                        f"or (same machine) its process is gone.")
                if why != "it is this process":
                    print(f"warning: checkpoint.dir={self.root}: taking over the lease of "
                          f"{describe_holder(holder, now)}: {why}", file=sys.stderr, flush=True)
            me = _machine()
            self._record = {**me, "pid": os.getpid(), "pid_started": _process_start(os.getpid()),
                            "parent_pid": int(os.environ.get("TRELLIS_PARENT_PID") or 0) or None,
                            "job_id": os.environ.get("SLURM_JOB_ID") or None, "started": now, "heartbeat": now,
                            "interval_s": self.interval_s, "token": self.token, "argv": sys.argv[:8]}
            self._write(self._record)
        _HELD.append(self)
        self._thread = threading.Thread(target=self._beat, name="trellis-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self._guard():
                    if self._stop.is_set():
                        return
                    cur = self.read()
                    if not cur or cur.get("token") != self.token:
                        self.lost = True
                        who = describe_holder(cur) if cur and "corrupt" not in cur else "nobody (removed)"
                        print(f"warning: the lease on checkpoint.dir={self.root} is now held by {who}; this run no "
                              f"longer owns the directory", file=sys.stderr, flush=True)
                        return
                    self._record["heartbeat"] = time.time()
                    self._write(self._record)
            except OSError as e:  # a full or unreachable file system: keep trying, say so
                print(f"warning: could not refresh the lease {self.path}: {e}", file=sys.stderr, flush=True)

    def taken_by(self) -> str | None:
        """None while this run holds the lease; else who holds it now (the fence a save checks before it
        starts and before it publishes step-N: a run whose lease was taken over must not write)."""
        cur = self.read()
        if cur and cur.get("token") == self.token:
            return None
        self.lost = True
        if not cur:
            return "nobody (the lease file was removed)"
        return "an unreadable lease file" if "corrupt" in cur else describe_holder(cur)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self in _HELD:
            _HELD.remove(self)
        if self._record is None or self.lost:
            return
        try:
            with self._guard():
                cur = self.read()
                if cur and cur.get("token") == self.token:
                    self.path.unlink()
        except OSError:
            pass
        self._record = None


def release_all() -> None:
    for lease in list(_HELD):
        lease.release()


atexit.register(release_all)


def hold_checkpoint_dir(cfg, rank: int) -> Lease | None:
    """Collective: rank 0 takes the lease on cfg.checkpoint.dir; every rank raises its refusal."""
    c = cfg.checkpoint
    lease, err = None, None
    if rank == 0:
        lease = Lease(Path(c.dir), c.lease_interval_s, c.lease_timeout_s)
        try:
            lease.acquire()
        except CheckpointError as e:
            err, lease = e.messages, None
        except OSError as e:
            err, lease = [f"checkpoint.dir={c.dir}: cannot write its lease file ({e.strerror}: {e.filename})"], None
    err = broadcast_object(err)
    if err:
        raise CheckpointError(err)
    return lease
