"""DeepSpeed's C++ ops (shm_comm, built by every DeepSpeed process group on CPU; cpu_adam for CPU offload;
async_io for NVMe offload): a project-local build cache and stale-lock cleanup.

DeepSpeed JIT-builds these ops with torch's cpp_extension on first use (shm_comm ≈ 1 min, cpu_adam ≈ 3 min,
async_io ≈ 5 min on an idle 2-core machine). The cache lives in `<repo>/.torch_extensions` so every test and run shares one
build. torch's FileBaton writes `<ext>/lock` during a build; a build killed midway leaves it behind and
the next build waits for it forever. We remove a lock whose builder is gone: no process of ours has it
open and it is older than `stale_after_s`, or (always) older than `max_age_s`.

    python -m trellis.engine.backends.ds_ops build      # pre-build shm_comm, cpu_adam and async_io
    python -m trellis.engine.backends.ds_ops clean-locks
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

OPS = ("shm_comm", "cpu_adam", "async_io")
# extension directory name per op (what torch writes under TORCH_EXTENSIONS_DIR)
EXT_NAMES = {"shm_comm": "deepspeed_shm_comm", "cpu_adam": "cpu_adam", "async_io": "async_io"}
LOCK_NAME = "lock"


def project_extensions_dir() -> Path:
    """`<repo>/.torch_extensions` (the package's parent directory in an editable checkout), else the
    user cache: a non-editable install has no repo to hold it."""
    repo = Path(__file__).resolve().parents[2]  # engine/backends/ds_ops.py -> the repository
    if (repo / "pyproject.toml").is_file():
        return repo / ".torch_extensions"
    return Path.home() / ".cache" / "trellis" / "torch_extensions"


def use_project_extensions_dir() -> Path:
    """Point TORCH_EXTENSIONS_DIR at the shared cache (unless the user chose one) and clear stale locks."""
    d = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or project_extensions_dir())
    os.environ["TORCH_EXTENSIONS_DIR"] = str(d)
    d.mkdir(parents=True, exist_ok=True)
    clean_stale_locks(d)
    return d


def _lock_holders(lock: Path) -> bool:
    """True when a live process on this host has the lock's build directory as its cwd or the lock
    open: torch builds run `ninja` with cwd = the extension directory."""
    build_dir = str(lock.parent.resolve())
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(pid_dir / "cwd") == build_dir:
                return True
        except OSError:
            continue
    return False


def clean_stale_locks(root: Path, stale_after_s: float = 60.0, max_age_s: float = 3600.0,
                      now: float | None = None) -> list[Path]:
    """Remove build locks left by dead builds; returns the removed paths.

    A lock older than `stale_after_s` with no live process building in its directory is stale; one older
    than `max_age_s` is stale regardless (no real build takes an hour; a hung one should not block forever).
    """
    now = time.time() if now is None else now
    removed = []
    for lock in Path(root).glob(f"*/{LOCK_NAME}"):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > max_age_s or (age > stale_after_s and not _lock_holders(lock)):
            try:
                lock.unlink()
                removed.append(lock)
                print(f"ds_ops: removed stale build lock {lock} (age {age:.0f} s)", file=sys.stderr)
            except FileNotFoundError:
                pass
    return removed


def build(ops=OPS) -> dict[str, float]:
    """JIT-build (or load from the cache) each op; returns seconds per op."""
    use_project_extensions_dir()
    from deepspeed.accelerator import get_accelerator

    builders = {"shm_comm": "ShareMemCommBuilder", "cpu_adam": "CPUAdamBuilder", "async_io": "AsyncIOBuilder"}
    times = {}
    for op in ops:
        b = get_accelerator().create_op_builder(builders[op])
        if op == "async_io" and not b.is_compatible(verbose=False):
            raise RuntimeError("async_io cannot be built: install libaio-dev (Debian: apt-get install libaio-dev)")
        t0 = time.perf_counter()
        b.load(verbose=False)
        times[op] = time.perf_counter() - t0
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trellis.engine.backends.ds_ops")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="pre-build DeepSpeed's shm_comm, cpu_adam and async_io ops into the project cache")
    b.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    sub.add_parser("clean-locks", help="remove build locks left by killed builds")
    args = ap.parse_args(argv)
    if args.cmd == "clean-locks":
        removed = clean_stale_locks(use_project_extensions_dir())
        print(f"removed {len(removed)} stale lock(s)")
        return 0
    d = use_project_extensions_dir()
    for op, s in build([o for o in args.ops.split(",") if o]).items():
        print(f"{op}: ready in {d / EXT_NAMES[op]} ({s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
