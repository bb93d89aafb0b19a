"""The Slurm job script trellis submits: sbatch options, templates, signal/time parsing (no Slurm needed)."""

from __future__ import annotations

import pytest

from trellis.cli import main
from trellis.errors import UserError
from trellis.slurm.submit import SubmitSpec, parse_signal, render_sbatch, sbatch_options, time_minutes


def spec(**kw) -> SubmitSpec:
    base = dict(config="c.toml", overrides=["--train.steps=3"], log_dir="/logs", workdir="/w", python="py")
    return SubmitSpec(**{**base, **kw})


def test_cpu_job_options():
    assert sbatch_options(spec(nodes=2)) == [
        "--job-name=trellis", "--nodes=2", "--ntasks-per-node=1", "--output=/logs/%x-%j.out", "--open-mode=append",
        "--requeue", "--signal=B:USR1@90"]


def test_gpu_job_options_with_every_flag():
    opts = sbatch_options(spec(nodes=4, gpus_per_node=8, partition="gpu", time="2:00:00", account="proj",
                               qos="high", constraint="a100", exclusive=True, signal="USR1@120"))
    assert opts == ["--job-name=trellis", "--nodes=4", "--ntasks-per-node=8", "--output=/logs/%x-%j.out",
                    "--open-mode=append", "--requeue", "--signal=B:USR1@120", "--gpus-per-node=8",
                    "--partition=gpu", "--time=2:00:00", "--account=proj", "--qos=high", "--constraint=a100",
                    "--exclusive"]


def test_per_node_runs_one_task_per_node():
    opts = sbatch_options(spec(nodes=2, gpus_per_node=4, mode="per-node"))
    assert "--ntasks-per-node=1" in opts and "--cpus-per-task=4" in opts


def test_per_task_script():
    text = render_sbatch(spec(nodes=2, ntasks_per_node=2))
    assert text.startswith("#!/bin/bash\n")
    assert "{{" not in text and "}}" not in text
    assert "#SBATCH --ntasks-per-node=2" in text
    assert "srun --kill-on-bad-exit=1 --mpi=none --ntasks-per-node=2 \\\n  py -m trellis train c.toml --train.steps=3 \"${RESUME[@]}\" &" in text
    assert "trap 'on_warning USR1' USR1" in text and "trap on_term TERM" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "RESUME=(--checkpoint.resume=auto)" in text and "SLURM_RESTART_COUNT" in text
    assert "NodeAddr" in text  # rendezvous at the node's address, not its name
    assert "cd /w" in text


def test_per_node_script_wraps_torchrun():
    text = render_sbatch(spec(nodes=2, gpus_per_node=4, mode="per-node", signal="USR2@60"))
    assert "{{" not in text
    assert "export TRELLIS_PYTHON=py" in text and "--rdzv-backend c10d" in text
    assert '"$TRELLIS_PYTHON" -m torch.distributed.run --nnodes' in text
    assert "TRELLIS_NPROC_PER_NODE=4" in text
    assert 'pkill -USR2 -P $AGENT' in text and "--signal=B:USR2@60" in text


def test_overrides_are_shell_quoted():
    text = render_sbatch(spec(overrides=["--logging.metrics_file=a b.jsonl"]))
    assert "c.toml '--logging.metrics_file=a b.jsonl'" in text


def test_exports():
    text = render_sbatch(spec(exports={"PYTHONPATH": "/x y"}))
    assert "export PYTHONPATH='/x y'" in text


@pytest.mark.parametrize("value,expected", [("USR1@90", ("USR1", 90)), ("SIGUSR1@5", ("USR1", 5)),
                                            ("B:USR2@30", ("USR2", 30)), ("term@10", ("TERM", 10))])
def test_parse_signal(value, expected):
    assert parse_signal(value) == expected


@pytest.mark.parametrize("value", ["USR1", "90", "FOO@3", "KILL@3", "USR1@x"])
def test_bad_signal(value):
    with pytest.raises(UserError):
        parse_signal(value)


@pytest.mark.parametrize("value,minutes", [("30", 30), ("2:00:00", 120), ("1-12:00:00", 2160), ("1-2", 1560),
                                           ("10:30", 11), ("0:0:1", 1)])
def test_time_minutes(value, minutes):
    assert time_minutes(value) == minutes


def test_validation_collects_every_error():
    with pytest.raises(UserError) as e:
        render_sbatch(spec(nodes=0, gpus_per_node=-1, time="soon"))
    assert len(e.value.messages) == 3
    assert any("--nodes=0" in m for m in e.value.messages) and any("--time='soon'" in m for m in e.value.messages)


def test_cli_dry_run_prints_script(capsys, repo, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["submit", "configs/tiny-llama.toml", "--nodes", "2", "--gpus-per-node", "0", "--dry-run",
                 "--train.steps=2"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "configs/tiny-llama.toml --train.steps=2" in out


def test_cli_config_error_before_submitting(capsys, repo, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["submit", "configs/tiny-llama.toml", "--dry-run", "--train.nonexistent_key=1"]) == 2
    assert "nonexistent_key" in capsys.readouterr().err


def test_cli_missing_sbatch(capsys, repo, monkeypatch):
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["submit", "configs/tiny-llama.toml", "--log-dir", "/tmp/trellis-unit-submit"]) == 2
    err = capsys.readouterr().err
    assert "sbatch" in err and "--dry-run" in err
