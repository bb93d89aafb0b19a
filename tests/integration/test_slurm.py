"""`trellis submit` / `trellis launch --launcher srun` on a real single-host Slurm cluster (2 fake nodes x 1 task):
jobs complete with the torchrun run's losses, dry-run scripts pass `sbatch --test-only`, Slurm's own errors are
shown, and preemption (warning signal, or an external `scontrol requeue`) checkpoints, requeues and resumes to
the same per-step losses as an uninterrupted run."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import REPO, TRAIN_OVERRIDES, read_losses, run_trellis

pytestmark = pytest.mark.integration

# Long enough that the job is still training when the test signals it after 2 logged steps: at 6 steps a quiet
# machine finished the whole job first (ranks now exit without teardown), and scancel found no job.
PREEMPT_STEPS = 40


def _job_id(stdout: str) -> str:
    m = re.search(r"submitted job (\d+)", stdout)
    assert m, stdout
    return m.group(1)


def _state(job_id: str, env: dict) -> tuple[str, int | None]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    state = re.search(r"JobState=(\S+)", out).group(1)
    restarts = re.search(r"Restarts=(\d+)", out)
    return state, int(restarts.group(1)) if restarts else None


def _wait_done(job_id: str, env: dict, timeout: float) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, restarts = _state(job_id, env)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return state, restarts
        time.sleep(2)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    raise TimeoutError(f"job {job_id} not done after {timeout}s (cancelled)")


def _wait_lines(path: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{path} did not reach {n} lines in {timeout}s")


@pytest.mark.parametrize("mode", ["per-task", "per-node"])
def test_dry_run_is_a_valid_sbatch_script(slurm_env, mode, tmp_path):
    r = run_trellis(["submit", "configs/tiny-llama.toml", "--nodes", "2", "--gpus-per-node", "0", "--mode", mode,
                     "--partition", "debug", "--time", "10", "--dry-run", *TRAIN_OVERRIDES], 120, slurm_env)
    assert r.returncode == 0, r.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(r.stdout)
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    test = subprocess.run(["sbatch", "--test-only", str(script)], env=slurm_env, capture_output=True, text=True,
                          timeout=60)
    assert test.returncode == 0 and "to start at" in test.stderr, test.stderr


def test_slurm_errors_are_shown_as_they_are(slurm_env, tmp_path):
    r = run_trellis(["submit", "configs/tiny-llama.toml", "--partition", "nosuch", "--log-dir", str(tmp_path)],
                    120, slurm_env)
    assert r.returncode == 2
    assert "sbatch rejected the job" in r.stderr and "invalid partition" in r.stderr.lower(), r.stderr


def test_srun_launcher_matches_torchrun(slurm_env, torchrun_losses, tmp_path):
    m = tmp_path / "m.jsonl"
    r = run_trellis(["launch", "--launcher", "srun", "--nnodes", "2", "--nproc-per-node", "1", "--timeout", "400",
                     "configs/tiny-llama.toml", *TRAIN_OVERRIDES, f"--logging.metrics_file={m}"], 450, slurm_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert read_losses(m) == torchrun_losses


@pytest.mark.parametrize("via,mode", [("sbatch", "per-task"), ("sbatch", "per-node"), ("submitit", "per-task")])
def test_submit_wait_matches_torchrun(slurm_env, torchrun_losses, tmp_path, via, mode):
    if via == "submitit":
        pytest.importorskip("submitit")
    m = tmp_path / "m.jsonl"
    r = run_trellis(["submit", "configs/tiny-llama.toml", "--nodes", "2", "--gpus-per-node", "0", "--via", via,
                     "--mode", mode, "--time", "20", "--log-dir", str(tmp_path / "logs"), "--wait",
                     "--wait-timeout", "450", *TRAIN_OVERRIDES, f"--logging.metrics_file={m}"], 500, slurm_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"submitted job \d+", r.stdout) and "log: " in r.stdout
    assert "ended: COMPLETED, exit code 0" in r.stderr
    assert read_losses(m) == torchrun_losses


@pytest.fixture(scope="module")
def uninterrupted_losses(tmp_path_factory) -> dict[int, float]:
    m = tmp_path_factory.mktemp("ref") / "m.jsonl"
    r = run_trellis(["train", "configs/tiny-llama.toml", f"--train.steps={PREEMPT_STEPS}", "--logging.progress=none",
                     f"--logging.metrics_file={m}"], 450)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_losses(m)


def _submit_long(slurm_env, tmp_path, via: str) -> tuple[str, Path, Path]:
    m = tmp_path / "m.jsonl"
    logs = tmp_path / "logs"
    r = run_trellis(["submit", "configs/tiny-llama.toml", "--nodes", "2", "--via", via, "--time", "20",
                     "--log-dir", str(logs), f"--train.steps={PREEMPT_STEPS}", "--logging.progress=none",
                     f"--logging.metrics_file={m}", f"--checkpoint.dir={tmp_path / 'ckpt'}"], 120, slurm_env)
    assert r.returncode == 0, r.stderr
    return _job_id(r.stdout), m, logs


def _all_logs(logs: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(logs.rglob("*")) if p.is_file()
                     and p.suffix in (".out", ".err"))


@pytest.mark.parametrize("how", ["warning-signal", "scontrol-requeue"])
def test_preempted_job_resumes_to_the_same_losses(slurm_env, uninterrupted_losses, tmp_path, how):
    job, m, logs = _submit_long(slurm_env, tmp_path, "sbatch")
    _wait_lines(m, 2, 400)
    if how == "warning-signal":
        # What Slurm does at --signal=B:USR1@90: the signal goes to the batch shell only.
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env, check=True, timeout=30)
    else:
        subprocess.run(["scontrol", "requeue", job], env=slurm_env, check=True, timeout=30)
    state, restarts = _wait_done(job, slurm_env, 600)
    text = _all_logs(logs)
    assert state == "COMPLETED", text[-4000:]
    assert restarts >= 1, text[-4000:]
    assert "restart 1" in text and "checkpoint: resumed from" in text, text[-4000:]
    assert read_losses(m) == uninterrupted_losses


def test_submitit_warning_signal_requeues_and_resumes(slurm_env, uninterrupted_losses, tmp_path):
    pytest.importorskip("submitit")
    job, m, logs = _submit_long(slurm_env, tmp_path, "submitit")
    _wait_lines(m, 2, 400)
    # submitit jobs get --signal=USR1@90 without B:, so Slurm signals every task.
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm_env, check=True, timeout=30)
    state, restarts = _wait_done(job, slurm_env, 600)
    text = _all_logs(logs)
    assert state == "COMPLETED" and restarts >= 1, text[-4000:]
    assert "checkpoint: resumed from" in text, text[-4000:]
    assert read_losses(m) == uninterrupted_losses
