"""No user string can inject shell code or `#SBATCH` lines into the job script `trellis submit` generates:
values with newlines / control characters are refused naming the flag, and values with spaces, quotes, `#`,
`$(...)` reach Slurm and the ranks literally. The script is checked with `bash -n` and then executed with stub
`srun` / `scontrol` and a stand-in interpreter that records the argv it is given (no Slurm needed)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from trellis.cli import main
from trellis.errors import UserError
from trellis.slurm.submit import SubmitSpec, render_sbatch, sbatch_options

EVIL = "a b \"dq\" 'sq' $(touch PWNED) `touch PWNED` ; #not-a-comment $HOME"


def spec(**kw) -> SubmitSpec:
    base = dict(config="c.toml", overrides=["--train.steps=3"], log_dir="/logs", workdir="/w", python="py")
    return SubmitSpec(**{**base, **kw})


# ---- refused values ----------------------------------------------------------------------------------------
FLAG_FIELDS = [("--job-name", "job_name"), ("--partition", "partition"), ("--account", "account"),
               ("--qos", "qos"), ("--constraint", "constraint"), ("--log-dir", "log_dir"), ("--time", "time"),
               ("--signal", "signal")]


@pytest.mark.parametrize("flag,field", FLAG_FIELDS)
@pytest.mark.parametrize("bad", ["x\n#SBATCH --wrap=touch PWNED", "x\rtouch PWNED", "x\x00y", "x\ty", "x\u2028y"])
def test_control_characters_are_refused_naming_the_flag(flag, field, bad):
    with pytest.raises(UserError) as e:
        render_sbatch(spec(**{field: bad}))
    assert any(m.startswith(f"{flag}=") and "control character" in m for m in e.value.messages), e.value.messages


@pytest.mark.parametrize("kw,name", [(dict(workdir="/w\nrm -rf /"), "working directory"),
                                     (dict(python="py\nid"), "Python interpreter"),
                                     (dict(config="c.toml\nid"), "config path"),
                                     (dict(script="s.py\nid"), "script path"),
                                     (dict(script="s.py", script_args=["ok", "x\nid"]), "script argument 2"),
                                     (dict(overrides=["--logging.metrics_file=a\nid"]), "--logging.metrics_file"),
                                     (dict(exports={"PYTHONPATH": "x\nid"}), "PYTHONPATH"),
                                     (dict(exports={"A;id": "x"}), "A;id")])
def test_every_other_value_is_checked(kw, name):
    with pytest.raises(UserError) as e:
        render_sbatch(spec(**kw))
    assert any(name in m for m in e.value.messages), e.value.messages


@pytest.mark.parametrize("flag", [f for f, _ in FLAG_FIELDS])
def test_cli_refuses_with_exit_2_and_no_traceback(flag, repo, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    assert main(["submit", "configs/tiny-llama.toml", flag, "x\ny", "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert f"error: {flag}=" in captured.err and "Traceback" not in captured.err
    assert "#SBATCH" not in captured.out


def test_cli_process_exit_code(repo, tmp_path):
    r = subprocess.run([sys.executable, "-m", "trellis", "submit", "configs/tiny-llama.toml", "--partition",
                        "gpu\n#SBATCH --wrap=id", "--dry-run", "--logging.metrics_file=a\nb"], cwd=repo,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert "error: --partition=" in r.stderr and "--logging.metrics_file" in r.stderr, r.stderr


# ---- quoted values -----------------------------------------------------------------------------------------
def _sbatch_words(text: str) -> list[str]:
    """The option words sbatch reads: the `#SBATCH` lines before the first command, split with shell-like
    quoting (Slurm's parser: quotes group, unquoted whitespace separates, an unquoted # starts a comment)."""
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    words = []
    for line in lines[1:]:
        if line.startswith("#SBATCH "):
            words += shlex.split(line[len("#SBATCH "):], comments=True)
        elif line.strip() and not line.startswith("#"):
            break
    assert text.count("#SBATCH") == len([w for w in words if w.startswith("--")])  # none later, none hidden
    return words


@pytest.mark.parametrize("mode", ["per-task", "per-node"])
def test_sbatch_lines_carry_values_literally(mode):
    s = spec(mode=mode, job_name=EVIL, partition=EVIL, account=EVIL, qos=EVIL, constraint=EVIL,
             log_dir="/logs/" + EVIL.replace("/", ""), time="1-02:00:00")
    words = _sbatch_words(render_sbatch(s))
    assert words == sbatch_options_plain(s)


def sbatch_options_plain(s: SubmitSpec) -> list[str]:
    return [shlex.split(o)[0] for o in sbatch_options(s)]


def test_plain_values_stay_unquoted():
    assert sbatch_options(spec(partition="gpu", job_name="trellis"))[:1] == ["--job-name=trellis"]
    assert "--partition=gpu" in sbatch_options(spec(partition="gpu"))
    assert sbatch_options(spec(job_name="my job"))[0] == "--job-name='my job'"


STUB_SRUN = """#!/bin/bash
# srun stand-in: drop srun's own options, run the command (one task).
while [ $# -gt 0 ] && [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
STUB_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo node1 ;;
  "show node") echo "NodeName=node1 NodeAddr=127.0.0.1 State=IDLE" ;;
  *) echo "scontrol stub: $*" >&2 ;;
esac
"""
RECORDER = """#!{python}
import json, os, sys
with open(os.environ["RECORD_TO"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "evil_env": os.environ.get("TRELLIS_EVIL")}}, f)
"""


@pytest.mark.parametrize("target", ["config", "script"])
@pytest.mark.parametrize("mode", ["per-task", "per-node"])
@pytest.mark.parametrize("restart", [0, 1])
def test_generated_script_runs_the_literal_argv(mode, restart, target, tmp_path):
    """Every rank gets `-m trellis train CONFIG overrides` (+ the resume flag once requeued), or a user's
    `SCRIPT.py args` exactly as given (a script is never handed trellis' resume flag)."""
    weird = "d " + EVIL.replace("/", "")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    bindir = tmp_path / ("bin " + weird)
    bindir.mkdir()
    recorder = bindir / "python"
    recorder.write_text(RECORDER.format(python=sys.executable))
    recorder.chmod(0o755)
    workdir = tmp_path / ("work " + weird)
    workdir.mkdir()
    overrides = ["--train.steps=3", f"--logging.metrics_file={EVIL}.jsonl", "--data.path=it's here",
                 '--model.path="quoted"', "--x=$(touch PWNED)", "--y=`touch PWNED`", "--z=a;b&&c|d>e<f", "--w=*"]
    config = f"conf {EVIL}.toml"
    user_script = f"my {EVIL}.py"
    target_kw = (dict(config=config, overrides=overrides) if target == "config" else
                 dict(config="", overrides=[], script=user_script, script_args=[*overrides, "--nproc-per-node", "9"]))
    s = spec(mode=mode, **target_kw, workdir=str(workdir), python=str(recorder),
             job_name=EVIL, log_dir=str(tmp_path / "logs"), exports={"TRELLIS_EVIL": EVIL})
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(s))
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    record = tmp_path / "record.json"
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "HOME": str(tmp_path), "RECORD_TO": str(record),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURMD_NODENAME": "node1",
           "SLURM_RESTART_COUNT": str(restart)}
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(record.read_text())
    resume = ["--checkpoint.resume=auto"] if restart else []
    expected_tail = (["-m", "trellis", "train", config, *overrides, *resume] if target == "config" else
                     [user_script, *overrides, "--nproc-per-node", "9"])
    assert got["argv"][-len(expected_tail):] == expected_tail
    if mode == "per-node":
        assert got["argv"][:2] == ["-m", "torch.distributed.run"]
    else:
        assert got["argv"] == expected_tail
    assert got["cwd"] == str(workdir) and got["evil_env"] == EVIL
    assert not list(tmp_path.rglob("PWNED")), "a value was executed as shell code"
