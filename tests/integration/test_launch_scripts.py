"""`trellis launch [--launcher L] SCRIPT.py [args]` and `trellis submit ... SCRIPT.py [args]` run a user script on
every rank of a real torchrun / Open MPI / DeepSpeed-launcher / srun / sbatch job: each rank finds its rank and
world size through the launcher's environment, a gloo all-reduce over the job is right, and the script gets exactly
the arguments written after it (including ones that look like trellis' own options)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run_trellis

pytestmark = pytest.mark.integration

SCRIPT = "tests/integration/scripts/rank_report.py"
# Looks like `trellis launch` options and quoting traps: all of it belongs to the script.
ARGS = ["--nproc-per-node", "9", "--dry-run", "it's \"quoted\" $(x)"]


def _reports(out: Path, world: int) -> list[dict]:
    reports = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]
    for r, rep in enumerate(reports):
        assert rep["rank"] == r and rep["world"] == world, reports
        assert rep["sum"] == world * (world + 1) / 2, reports  # all-reduce of rank + 1 over every rank
        assert rep["argv"] == ["--out", str(out), *ARGS], reports
    return reports


@pytest.mark.parametrize("launcher,source", [("torchrun", "torchrun"), ("mpirun", "openmpi"),
                                             ("deepspeed", "torchrun")])
def test_launch_runs_the_script_on_every_rank(launcher, source, request, tmp_path):
    if launcher == "mpirun":
        request.getfixturevalue("openmpi")
    if launcher == "deepspeed":
        pytest.importorskip("deepspeed")
    r = run_trellis(["launch", "--launcher", launcher, "--nproc-per-node", "2", "--timeout", "150", SCRIPT,
                     "--out", str(tmp_path), *ARGS], timeout=200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert {rep["source"] for rep in _reports(tmp_path, 2)} == {source}


def test_submit_runs_the_script_on_every_rank(slurm_env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = run_trellis(["submit", "--nodes", "2", "--gpus-per-node", "0", "--time", "5", "--log-dir",
                     str(tmp_path / "logs"), "--wait", "--wait-timeout", "200", SCRIPT, "--out", str(out), *ARGS],
                    250, slurm_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ended: COMPLETED, exit code 0" in r.stderr
    assert {rep["source"] for rep in _reports(out, 2)} == {"slurm"}


def test_launch_srun_runs_the_script_on_every_rank(slurm_env, tmp_path):
    r = run_trellis(["launch", "--launcher", "srun", "--nnodes", "2", "--nproc-per-node", "1", "--timeout", "150",
                     SCRIPT, "--out", str(tmp_path), *ARGS], 200, slurm_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert {rep["source"] for rep in _reports(tmp_path, 2)} == {"slurm"}


# ---- an API training loop under the launchers gives the CLI's losses ------------------------------------------
LOOP = "examples/train_loop.py"
LOOP_ARGS = ["--train.steps=3", "--data.seq_len=32"]


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def cli_losses(tmp_path_factory):
    """`trellis train tiny-llama` on 2 ranks (dp2), the same overrides as the loop."""
    m = tmp_path_factory.mktemp("cli") / "m.jsonl"
    r = run_trellis(["train", "tiny-llama", "--parallel.dp=2", *LOOP_ARGS, "--logging.progress=none",
                     f"--logging.metrics_file={m}"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return _losses(m)


def test_api_loop_under_torchrun_gives_the_cli_losses(cli_losses, tmp_path):
    out = tmp_path / "loop.jsonl"
    r = run_trellis(["launch", "--launcher", "torchrun", "--nproc-per-node", "2", "--timeout", "250", LOOP,
                     "--losses", str(out), *LOOP_ARGS], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _losses(out) == cli_losses  # bit-identical: one code path (the CLI's Trainer runs the same Engine)


def test_api_loop_under_trellis_submit_gives_the_cli_losses(cli_losses, slurm_env, tmp_path):
    out = tmp_path / "loop.jsonl"
    r = run_trellis(["submit", "--nodes", "2", "--gpus-per-node", "0", "--time", "5", "--log-dir",
                     str(tmp_path / "logs"), "--wait", "--wait-timeout", "250", LOOP, "--losses", str(out),
                     *LOOP_ARGS], 300, slurm_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _losses(out) == cli_losses
