"""The `trellis` CLI as a user runs it: self-spawned ranks, Ctrl-C, a dead rank, a non-editable install."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _wait_lines(path: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{path} did not reach {n} lines")


def test_ctrl_c_stops_every_rank_cleanly(repo, tmp_path, trellis_cmd):
    m = tmp_path / "m.jsonl"
    p = subprocess.Popen([*trellis_cmd, "train", "configs/tiny-llama.toml", "--train.steps=100000",
                          f"--logging.metrics_file={m}", "--logging.progress=plain"],
                         cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_lines(m, 3, 120)
        os.killpg(p.pid, signal.SIGINT)  # what a terminal does: every process of the group gets it
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert "stopped_by_signal" in out and "trellis run summary" in out, out[-2000:]
    steps = [json.loads(line)["step"] for line in m.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # no torn or missing records


def test_one_dead_rank_ends_the_job_quickly(repo, tmp_path, trellis_cmd):
    m = tmp_path / "m.jsonl"
    p = subprocess.Popen([*trellis_cmd, "train", "configs/tiny-llama.toml", "--train.steps=100000",
                          f"--logging.metrics_file={m}", "--logging.progress=none"],
                         cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_lines(m, 2, 120)
        ranks = subprocess.run(["pgrep", "-f", "-P", str(p.pid), "trellis"], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2, ranks
        t0 = time.monotonic()
        os.kill(int(ranks[1]), signal.SIGKILL)
        p.wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    print(f"job exited {p.returncode} {elapsed:.1f} s after a rank was killed")
    assert p.returncode != 0 and elapsed < 60


def test_non_editable_install_runs(repo, tmp_path):
    """`pip install .` (not editable) from a copy of the repo: the package imports and `trellis --help` runs."""
    src = tmp_path / "src"
    shutil.copytree(repo, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", ".torch_extensions", "__pycache__",
                                                            ".slurm-dev", "*.egg-info", "build"))
    env_dir = tmp_path / "venv"
    # Dependencies come from the project's environment; this checks our own packaging, not PyPI.
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project_deps.pth").write_text(deps + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                        "--target", site, str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (Path(site) / "bin" / "trellis").is_file()  # the console script is declared and installed
    run = subprocess.run([str(env_dir / "bin" / "python"), "-m", "trellis", "--help"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0 and "train" in run.stdout, run.stderr
    show = subprocess.run([str(py), "-m", "trellis", "config", "show", "tiny-llama"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert show.returncode == 0 and 'path = "tiny-llama"' in show.stdout, show.stderr
    where = subprocess.run([str(py), "-c", "import trellis.engine, trellis.configs; print(trellis.configs.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120).stdout
    assert str(src) not in where and site in where
