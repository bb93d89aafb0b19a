"""argv/env of every launcher, single- and multi-node (expectations written by hand), and the CLI around them."""

from __future__ import annotations

import pytest

from trellis.cli import main
from trellis.errors import UserError
from trellis.launchers.base import LaunchSpec, caller_env
from trellis.launchers.deepspeed import DeepSpeedLauncher
from trellis.launchers.mpirun import MpirunLauncher
from trellis.launchers.registry import get_launcher
from trellis.launchers.srun import SrunLauncher
from trellis.launchers.torchrun import TorchrunLauncher

RANK = ["-m", "trellis", "train", "c.toml", "--train.steps=3"]


def spec(**kw) -> LaunchSpec:
    return LaunchSpec(config="c.toml", overrides=["--train.steps=3"], **kw)


def test_torchrun_single_node_is_standalone():
    argv, env = TorchrunLauncher().build_command(spec(nproc_per_node=2))
    assert argv == ["torchrun", "--nnodes", "1", "--nproc-per-node", "2", "--standalone", *RANK]
    assert env == {}


def test_torchrun_multi_node_uses_c10d_at_the_address():
    argv, _ = TorchrunLauncher().build_command(spec(nnodes=2, nproc_per_node=4, master_addr="10.0.0.5", master_port=1234))
    assert argv == ["torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "10.0.0.5:1234", "--rdzv-id", "trellis", "--max-restarts", "0", *RANK]


def test_deepspeed_single_and_hostfile():
    argv, env = DeepSpeedLauncher().build_command(spec(nproc_per_node=2, env={"A": "1"}))
    assert argv == ["deepspeed", "--num_nodes", "1", "--num_gpus", "2", "--master_addr", "127.0.0.1",
                    "--master_port", "29500", "--no_local_rank", "--module", "trellis", "train", "c.toml",
                    "--train.steps=3"]
    assert env == {"A": "1"}
    argv, _ = DeepSpeedLauncher().build_command(spec(nnodes=2, nproc_per_node=8, hostfile="hosts",
                                                     master_addr="10.0.0.5", master_port=6000))
    assert argv[:12] == ["deepspeed", "--hostfile", "hosts", "--num_nodes", "2", "--num_gpus", "8",
                         "--master_addr", "10.0.0.5", "--master_port", "6000", "--no_local_rank"]


def test_deepspeed_include_exclude_replace_counts():
    argv, _ = DeepSpeedLauncher().build_command(spec(hostfile="h", include="w1:0,1@w2", exclude="w3"))
    assert argv[:9] == ["deepspeed", "--hostfile", "h", "--include", "w1:0,1@w2", "--exclude", "w3",
                        "--master_addr", "127.0.0.1"]
    assert "--num_gpus" not in argv and "--num_nodes" not in argv


def test_openmpi_as_root_and_not():
    argv, env = MpirunLauncher("openmpi", as_root=True).build_command(spec(nproc_per_node=2))
    assert argv == ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "2",
                    "-x", "PATH", "python", *RANK]
    assert env == {}  # no MASTER_ADDR: ranks share rank 0's address through mpi4py
    argv, env = MpirunLauncher("openmpi", as_root=False).build_command(
        spec(nnodes=2, nproc_per_node=4, hostfile="hf", master_addr="10.0.0.5", master_port=7000,
             env={"OMP_NUM_THREADS": "4"}))
    assert argv == ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "8", "--hostfile", "hf",
                    "--npernode", "4", "-x", "PATH", "-x", "OMP_NUM_THREADS=4", "-x", "MASTER_ADDR=10.0.0.5",
                    "-x", "MASTER_PORT=7000", "python", *RANK]
    assert env == {"OMP_NUM_THREADS": "4", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "7000"}


def test_mpich_uses_hydra_flags():
    argv, _ = MpirunLauncher("mpich").build_command(spec(nnodes=2, nproc_per_node=2, hostfile="hf",
                                                         env={"X": "y"}))
    assert argv == ["mpirun", "-n", "4", "-ppn", "2", "-f", "hf", "-genv", "X", "y", "python", *RANK]


def test_srun_inside_an_allocation():
    argv, env = SrunLauncher().build_command(spec(nnodes=2, nproc_per_node=2, master_port=4321))
    assert argv == ["srun", "--nodes", "2", "--ntasks", "4", "--ntasks-per-node", "2", "--kill-on-bad-exit=1",
                    "--mpi=none", "python", *RANK]
    assert env == {"MASTER_PORT": "4321"}


def test_build_command_is_pure():
    s = spec(nproc_per_node=2)
    for name in ("torchrun", "deepspeed", "srun"):
        launcher = get_launcher(name)
        assert launcher.build_command(s) == launcher.build_command(s)
    assert s.overrides == ["--train.steps=3"] and s.env == {}


def test_caller_env_keeps_only_rank_variables():
    assert caller_env({"PYTHONPATH": "p", "HOME": "/h", "OMP_NUM_THREADS": "2"}) == {"PYTHONPATH": "p",
                                                                                      "OMP_NUM_THREADS": "2"}


def test_missing_binary_says_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError) as e:
        MpirunLauncher("openmpi").check_available()
    assert "apt-get install openmpi-bin" in str(e.value) and "--dry-run" in str(e.value)


def test_cli_dry_run_prints_the_command(capsys, repo, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["launch", "--launcher", "torchrun", "configs/tiny-llama.toml", "--dry-run", "--train.steps=2"]) == 0
    out = capsys.readouterr().out.strip()
    # tiny-llama has parallel.dp=2: two ranks on one node.
    assert out == ("torchrun --nnodes 1 --nproc-per-node 2 --standalone -m trellis train configs/tiny-llama.toml "
                   "--train.steps=2")


def test_cli_missing_binary_exit_code_2(capsys, repo, monkeypatch):
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["launch", "--launcher", "srun", "configs/tiny-llama.toml"]) == 2
    assert "slurm-client" in capsys.readouterr().err


def test_cli_layout_that_does_not_split_over_nodes(capsys, repo, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["launch", "--launcher", "torchrun", "configs/tiny-llama.toml", "--nnodes", "3", "--dry-run"]) == 2
    assert "--nnodes=3" in capsys.readouterr().err


@pytest.mark.parametrize("name,first", [("deepspeed", "deepspeed"), ("srun", "srun"), ("auto", "torchrun"),
                                        ("standalone", "torchrun")])
def test_cli_default_launcher_is_the_config_launcher_name(capsys, repo, monkeypatch, name, first):
    """Without --launcher, `launcher.name` picks the launcher ('auto' / 'standalone': torchrun)."""
    monkeypatch.chdir(repo)
    assert main(["launch", "configs/tiny-llama.toml", "--dry-run", f"--launcher.name={name}"]) == 0
    assert capsys.readouterr().out.split()[0] == first


def test_cli_launcher_flag_wins_over_the_config(capsys, repo, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["launch", "--launcher", "torchrun", "configs/tiny-llama.toml", "--dry-run",
                 "--launcher.name=deepspeed"]) == 0
    assert capsys.readouterr().out.split()[0] == "torchrun"
