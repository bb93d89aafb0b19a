"""Integration fixtures: a real single-host Slurm cluster (slurm/dev-cluster/start.sh, stopped afterwards) and
Open MPI (installed with apt-get when missing and we are root), plus the shared 2-rank reference run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A cluster of its own (state dir and ports) so a developer's running dev cluster is left alone.
TEST_SLURM_DIR = REPO / ".slurm-dev" / "pytest"
TEST_SLURM_PORT = "16917"
# Short, fp32, 2 ranks (tiny-llama has parallel.dp=2): every launcher's run is compared with torchrun's.
TRAIN_OVERRIDES = ["--train.steps=3", "--logging.progress=none"]


def _apt_install(*packages: str) -> bool:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
                ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        ok = subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode == 0
        if ok and cmd[1] == "install":
            return True
    return False


@pytest.fixture(scope="session")
def openmpi() -> str:
    if shutil.which("mpirun") is None and not _apt_install("openmpi-bin", "libopenmpi-dev"):
        pytest.skip("Open MPI is missing and could not be installed (apt-get install openmpi-bin)")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is missing (pip install mpi4py)")
    return shutil.which("mpirun")


@pytest.fixture(scope="session")
def slurm_env():
    """Start the test cluster (installs Slurm + munge when missing), yield the environment that talks to it."""
    env = {**os.environ, "TRELLIS_SLURM_DIR": str(TEST_SLURM_DIR), "TRELLIS_SLURM_PORT": TEST_SLURM_PORT}
    start = subprocess.run(["bash", str(REPO / "slurm/dev-cluster/start.sh")], env=env, capture_output=True,
                           text=True, timeout=600)
    if start.returncode == 3:
        pytest.skip(f"Slurm is not installed and could not be installed: {start.stderr.strip()}")
    assert start.returncode == 0, start.stdout + start.stderr
    env["SLURM_CONF"] = str(TEST_SLURM_DIR / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(REPO / "slurm/dev-cluster/stop.sh")], env=env, capture_output=True, timeout=120)


def read_losses(path: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (redone after a restart) keeps its last value."""
    out: dict[int, float] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def run_trellis(args: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trellis", *args], cwd=REPO, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def torchrun_losses(tmp_path_factory) -> dict[int, float]:
    """The reference: `trellis launch --launcher torchrun` with the shared overrides."""
    m = tmp_path_factory.mktemp("torchrun") / "metrics.jsonl"
    r = run_trellis(["launch", "--launcher", "torchrun", "--timeout", "400", "configs/tiny-llama.toml",
                     *TRAIN_OVERRIDES, f"--logging.metrics_file={m}"], timeout=450)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = read_losses(m)
    assert sorted(losses) == [1, 2, 3]
    return losses
