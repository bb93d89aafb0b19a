"""argv/env of every launcher, single- and multi-node (expectations written by hand), and the CLI around them."""

from __future__ import annotations

import shlex

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


# ---- `trellis launch [opts] SCRIPT.py [args]`: a user script on every rank ----------------------------------
SCRIPT_ARGS = ["--lr", "3", "--nproc-per-node", "9", "it's a \"b\" $(x)"]


def script_spec(**kw) -> LaunchSpec:
    return LaunchSpec(script="train.py", script_args=list(SCRIPT_ARGS), **kw)


def test_every_launcher_runs_the_script_with_its_arguments():
    argv, _ = TorchrunLauncher().build_command(script_spec(nproc_per_node=2))
    assert argv == ["torchrun", "--nnodes", "1", "--nproc-per-node", "2", "--standalone", "train.py", *SCRIPT_ARGS]
    argv, _ = DeepSpeedLauncher().build_command(script_spec(nproc_per_node=2))
    assert argv == ["deepspeed", "--num_nodes", "1", "--num_gpus", "2", "--master_addr", "127.0.0.1",
                    "--master_port", "29500", "--no_local_rank", "train.py", *SCRIPT_ARGS]
    argv, _ = MpirunLauncher("openmpi", as_root=False).build_command(script_spec(nproc_per_node=2))
    assert argv == ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "2", "-x", "PATH", "python",
                    "train.py", *SCRIPT_ARGS]
    argv, _ = MpirunLauncher("mpich").build_command(script_spec(nproc_per_node=2))
    assert argv == ["mpirun", "-n", "2", "-ppn", "2", "python", "train.py", *SCRIPT_ARGS]
    argv, _ = SrunLauncher().build_command(script_spec(nnodes=2, nproc_per_node=1))
    assert argv == ["srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
                    "--mpi=none", "python", "train.py", *SCRIPT_ARGS]


@pytest.fixture
def user_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my train.py").write_text("print('hi')\n")
    return "my train.py"


def test_everything_after_the_script_is_the_scripts(capsys, user_script):
    """torchrun's rule: `--nproc-per-node 9` and `--dry-run` after the script are its arguments, not ours."""
    assert main(["launch", "--dry-run", "--nproc-per-node", "2", user_script, *SCRIPT_ARGS, "--dry-run"]) == 0
    out = capsys.readouterr().out.strip()
    # The printed command is copyable: the shell gives back exactly the argv, quotes and all.
    assert shlex.split(out) == ["torchrun", "--nnodes", "1", "--nproc-per-node", "2", "--standalone", user_script,
                                *SCRIPT_ARGS, "--dry-run"]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "mpirun", "srun"])
def test_script_defaults_one_rank_and_option_values_are_not_scripts(capsys, user_script, launcher):
    """`--hostfile hosts.py` is an option's value, not the script; without --nproc-per-node a script gets 1 rank."""
    assert main(["launch", "--launcher", launcher, "--mpi-flavour", "openmpi", "--dry-run", "--hostfile", "hosts.py",
                 user_script, "x"]) == 0
    argv = shlex.split(capsys.readouterr().out.strip().split("\n")[-1])
    assert argv[-2:] == [user_script, "x"]
    assert ("hosts.py" in argv) == (launcher in ("deepspeed", "mpirun"))  # torchrun / srun have no hostfile
    assert launcher != "torchrun" or argv[:5] == ["torchrun", "--nnodes", "1", "--nproc-per-node", "1"]


def test_script_default_launcher_is_torchrun(capsys, user_script):
    assert main(["launch", "--dry-run", user_script]) == 0
    assert capsys.readouterr().out.split()[0] == "torchrun"


def test_a_config_positional_keeps_overrides_and_options_after_it(capsys, repo, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["launch", "configs/tiny-llama.toml", "--launcher", "mpirun", "--mpi-flavour", "mpich",
                 "--train.steps=2", "--dry-run"]) == 0
    assert capsys.readouterr().out.split()[-5:] == ["-m", "trellis", "train", "configs/tiny-llama.toml",
                                                    "--train.steps=2"]


@pytest.mark.parametrize("argv,needle", [(["--train.steps=2", "my train.py"], "dotted overrides apply to a trellis"),
                                         (["missing.py"], "missing.py: no such script")])
def test_script_errors_exit_2(capsys, user_script, argv, needle):
    assert main(["launch", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_submit_runs_the_script_without_the_resume_flag(capsys, user_script):
    assert main(["submit", "--dry-run", "--nodes", "2", user_script, *SCRIPT_ARGS]) == 0
    out = capsys.readouterr().out
    srun = out[out.index("\nsrun "):].split("&\n")[0]
    assert shlex.split(srun.replace("\\\n", " "))[-len(SCRIPT_ARGS) - 1:] == [user_script, *SCRIPT_ARGS]
    assert "-m trellis train" not in srun and "RESUME" not in srun


def test_submit_script_via_submitit_is_refused(capsys, user_script):
    assert main(["submit", "--via", "submitit", "--time", "5", user_script]) == 2
    assert "--via sbatch" in capsys.readouterr().err
