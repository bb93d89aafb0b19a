"""`trellis submit`: render an sbatch script from slurm/templates/ (or go through submitit), submit it, follow it.

Two job shapes: per-task (one Slurm task per rank, rank env from SLURM_*) and per-node (one task per node
running torchrun). Each rank runs `trellis train CONFIG`, or a user's `SCRIPT.py args` (SubmitSpec.script).
Both trap the warning signal (default USR1, 90 s before the time limit), let the ranks save a
checkpoint, and requeue; a requeued job (SLURM_RESTART_COUNT > 0) resumes with --checkpoint.resume=auto (a script reads
SLURM_RESTART_COUNT itself: its arguments are never changed).
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from trellis.errors import UserError

TEMPLATES = Path(__file__).resolve().parent / "templates"
SBATCH_HINT = ("install the Slurm client (Debian/Ubuntu: apt-get install slurm-client), run on a login node, "
               "or add --dry-run to print the job script")


@dataclass(kw_only=True)
class SubmitSpec:
    config: str = ""
    # A user script run on every rank instead of `trellis train` (arguments passed through untouched).
    script: str = ""
    script_args: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0
    # Ranks per node; 0 = gpus_per_node, or 1 on CPU-only nodes.
    ntasks_per_node: int = 0
    partition: str = ""
    time: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclusive: bool = False
    signal: str = "USR1@90"
    mode: str = "per-task"  # per-task | per-node
    job_name: str = "trellis"
    log_dir: str = "runs/slurm"
    workdir: str = "."
    python: str = "python"
    exports: dict[str, str] = field(default_factory=dict)

    @property
    def ranks_per_node(self) -> int:
        return self.ntasks_per_node or self.gpus_per_node or 1


def parse_signal(value: str) -> tuple[str, int]:
    """'USR1@90' -> ('USR1', 90). Slurm's syntax; the name must be a real signal the ranks handle."""
    m = re.fullmatch(r"(?:B:)?(?:SIG)?([A-Z0-9]+)@(\d+)", value.strip().upper())
    if not m or not hasattr(signal, "SIG" + m.group(1)):
        raise UserError(f"--signal={value!r} is not SIG@SECONDS; use e.g. USR1@90 (USR1 90 s before the time limit)")
    if m.group(1) not in ("USR1", "USR2", "TERM"):
        raise UserError(f"--signal={value}: the ranks checkpoint on USR1 and TERM; use USR1@SECONDS")
    return m.group(1), int(m.group(2))


def _unsafe_char(value: str) -> str | None:
    """The first character that may not appear in a job script value: a newline or any other control
    character (Unicode Cc, plus the line/paragraph separators), which would end a `#SBATCH` line or a shell line."""
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return ch
    return None


def text_errors(spec: SubmitSpec) -> list[str]:
    """Every user string that lands in the job script, checked for newlines and control characters."""
    fields = [("--job-name", spec.job_name), ("--partition", spec.partition), ("--account", spec.account),
              ("--qos", spec.qos), ("--constraint", spec.constraint), ("--log-dir", spec.log_dir),
              ("--time", spec.time), ("--signal", spec.signal), ("the working directory", spec.workdir),
              ("the Python interpreter path", spec.python), ("the config path", spec.config),
              ("the script path", spec.script)]
    fields += [(f"the override {o.split('=', 1)[0][:60]!s}", o) for o in spec.overrides]
    fields += [(f"the script argument {i + 1}", a) for i, a in enumerate(spec.script_args)]
    errors = []
    for name, value in fields:
        ch = _unsafe_char(value)
        if ch is not None:
            errors.append(f"{name}={value!r} contains the control character {ch!r} (a newline would start a new "
                          f"line of the job script); remove it")
    for k, v in spec.exports.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            errors.append(f"environment variable name {k!r} is not a valid shell name")
        elif _unsafe_char(v) is not None:
            errors.append(f"environment variable {k}={v!r} contains the control character {_unsafe_char(v)!r}; "
                          f"unset it or remove the character before submitting")
    return errors


def validate(spec: SubmitSpec) -> None:
    errors = text_errors(spec)
    if errors:
        raise UserError(errors)
    if spec.nodes < 1:
        errors.append(f"--nodes={spec.nodes} must be at least 1")
    if spec.gpus_per_node < 0:
        errors.append(f"--gpus-per-node={spec.gpus_per_node} must be 0 (CPU) or more")
    if spec.mode not in ("per-task", "per-node"):
        errors.append(f"--mode={spec.mode}: use per-task (one task per rank) or per-node (torchrun per node)")
    if spec.time and not re.fullmatch(r"([0-9]+-)?[0-9]+(:[0-9]+){0,2}", spec.time):
        errors.append(f"--time={spec.time!r}: use Slurm's forms, e.g. 30, 2:00:00 or 1-12:00:00")
    if errors:
        raise UserError(errors)
    parse_signal(spec.signal)


def time_minutes(value: str) -> int:
    """Slurm time ('30', '2:00:00', '1-12:00:00', 'MM:SS') in whole minutes (for submitit)."""
    days = 0
    if "-" in value:
        d, value = value.split("-", 1)
        days = int(d)
    parts = [int(x) for x in value.split(":")]
    if len(parts) == 1:
        h, m, s = (parts[0], 0, 0) if days else (0, parts[0], 0)
    elif len(parts) == 2:
        h, m, s = (parts[0], parts[1], 0) if days else (0, parts[0], parts[1])
    else:
        h, m, s = parts
    return max(1, days * 1440 + h * 60 + m + (1 if s else 0))


def sbatch_options(spec: SubmitSpec) -> list[str]:
    """`--flag=value` words for the `#SBATCH` lines. Values are shell-quoted when needed: sbatch reads
    `#SBATCH` lines with shell-like quoting (quotes group, an unquoted space ends the word, an unquoted `#`
    starts a comment), so a quoted value reaches Slurm literally; newlines were refused by validate()."""
    name, secs = parse_signal(spec.signal)
    log = str(Path(spec.log_dir) / "%x-%j.out")
    q = shlex.quote
    opts = [f"--job-name={q(spec.job_name)}", f"--nodes={spec.nodes}",
            f"--ntasks-per-node={spec.ranks_per_node if spec.mode == 'per-task' else 1}",
            f"--output={q(log)}", "--open-mode=append", "--requeue", f"--signal=B:{name}@{secs}"]
    if spec.gpus_per_node:
        opts.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.mode == "per-node" and spec.ranks_per_node > 1:
        opts.append(f"--cpus-per-task={spec.ranks_per_node}")
    for flag, value in (("partition", spec.partition), ("time", spec.time), ("account", spec.account),
                        ("qos", spec.qos), ("constraint", spec.constraint)):
        if value:
            opts.append(f"--{flag}={q(value)}")
    if spec.exclusive:
        opts.append("--exclusive")
    return opts


def _fill(text: str, values: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"template placeholder {{{{{m.group(1)}}}}} has no value")
        return values[m.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", sub, text)


def rank_args(spec: SubmitSpec) -> str:
    """What every rank runs after the interpreter, as shell words: the user's script and its arguments, or
    `-m trellis train CONFIG overrides` plus the resume flag of a requeued job (the template's RESUME array)."""
    if spec.script:
        return shlex.join([spec.script, *spec.script_args])
    return shlex.join(["-m", "trellis", "train", spec.config, *spec.overrides]) + ' "${RESUME[@]}"'


def render_sbatch(spec: SubmitSpec) -> str:
    """The job script, as text. Pure (no Slurm needed), so --dry-run and unit tests see exactly what is sent."""
    validate(spec)
    sig, _ = parse_signal(spec.signal)
    values = {
        "sbatch_header": "\n".join(f"#SBATCH {o}" for o in sbatch_options(spec)),
        "workdir": shlex.quote(spec.workdir),
        "exports": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in spec.exports.items()),
        "python": shlex.quote(spec.python),
        "rank_args": rank_args(spec),
        "ntasks_per_node": str(spec.ranks_per_node),
        "nproc_per_node": str(spec.ranks_per_node),
        "signal_name": sig,
    }
    values["common"] = _fill((TEMPLATES / "common.sh").read_text(), values).rstrip("\n")
    values["tail"] = _fill((TEMPLATES / "tail.sh").read_text(), values).rstrip("\n")
    return _fill((TEMPLATES / f"{spec.mode}.sbatch").read_text(), values)


# ---- talking to Slurm --------------------------------------------------------------------------------------
def _slurm(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise UserError(f"`{argv[0]}` is not on PATH; {SBATCH_HINT}")
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def submit_sbatch(script: str, log_dir: Path, test_only: bool = False) -> str:
    """Write the script next to the logs and submit it; return the job id. Slurm's errors are shown as they are."""
    if shutil.which("sbatch") is None:
        raise UserError(f"`sbatch` is not on PATH; {SBATCH_HINT}")
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"job-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}.sbatch"
    path.write_text(script)
    out = _slurm(["sbatch", "--test-only" if test_only else "--parsable", str(path)])
    if out.returncode != 0:
        raise UserError(f"sbatch rejected the job: {out.stderr.strip() or out.stdout.strip()} (script: {path})")
    if test_only:
        return out.stderr.strip()  # "sbatch: Job N to start at ..."
    return out.stdout.strip().split(";")[0]


def job_state(job_id: str) -> tuple[str, int | None]:
    """(state, exit code or None while running) from scontrol, which keeps finished jobs for MinJobAge; sacct
    (needs accounting) when scontrol has forgotten the job."""
    out = _slurm(["scontrol", "show", "job", "-o", job_id], timeout=30)
    m = re.search(r"JobState=(\S+)", out.stdout)
    if m:
        code = re.search(r"\bExitCode=(\d+):(\d+)", out.stdout)
        state = m.group(1)
        done = state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                         "BOOT_FAIL", "DEADLINE")
        if not done:
            return state, None
        rc, sig = (int(code.group(1)), int(code.group(2))) if code else (1, 0)
        return state, rc if rc or not sig else 128 + sig
    acct = _slurm(["sacct", "-n", "-X", "-P", "-o", "State,ExitCode", "-j", job_id], timeout=30)
    line = acct.stdout.strip().splitlines()[:1]
    if acct.returncode == 0 and line:
        state, code = line[0].split("|")
        return state.split()[0], int(code.split(":")[0])
    return "UNKNOWN", None


def wait_job(job_id: str, log_path: Path, timeout_s: float | None = None, poll_s: float = 2.0,
             stream=sys.stdout) -> int:
    """Block until the job ends, copying its log to `stream` as it grows (requeues included); its exit code."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    offset = 0
    while True:
        state, code = job_state(job_id)
        if log_path.exists():
            with open(log_path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
                offset += len(chunk)
            if chunk:
                stream.write(chunk.decode(errors="replace"))
                stream.flush()
        if code is not None:
            print(f"trellis: job {job_id} ended: {state}, exit code {code}", file=sys.stderr)
            return code
        if deadline is not None and time.monotonic() > deadline:
            raise UserError(f"job {job_id} still {state} after {timeout_s:.0f}s; it keeps running (scancel {job_id})")
        time.sleep(poll_s)


# ---- submitit ----------------------------------------------------------------------------------------------
class TrainTask:
    """What submitit runs in every Slurm task: one `trellis train` rank as a child process. The warning signal
    reaches this process and the child (Slurm signals the whole step); on it the child checkpoints and exits,
    then task 0 requeues the job. Exiting with SystemExit keeps submitit from recording a result, so the
    requeued run (SLURM_RESTART_COUNT > 0, hence --checkpoint.resume=auto) is the one that reports."""

    def __init__(self, config: str, overrides: list[str], workdir: str, signal_name: str, exports: dict[str, str]):
        self.config, self.overrides, self.workdir = config, list(overrides), workdir
        self.signal_name, self.exports = signal_name, dict(exports)

    def __call__(self) -> int:
        import os

        env = {**os.environ, **self.exports}
        resume = ["--checkpoint.resume=auto"] if int(env.get("SLURM_RESTART_COUNT", "0") or 0) > 0 else []
        argv = [sys.executable, "-m", "trellis", "train", self.config, *self.overrides, *resume]
        proc = subprocess.Popen(argv, cwd=self.workdir, env=env)
        warned = []
        warning = getattr(signal, "SIG" + self.signal_name)

        def forward(signum, frame):
            if signum == warning:
                warned.append(signum)
            if proc.poll() is None:
                proc.send_signal(signum)

        for s in {warning, signal.SIGTERM}:
            signal.signal(s, forward)
        rc = proc.wait()
        if warned:
            if env.get("SLURM_PROCID", "0") == "0":
                print(f"trellis: checkpointed after SIG{self.signal_name}; requeueing job {env.get('SLURM_JOB_ID')}",
                      flush=True)
                subprocess.run(["scontrol", "requeue", env["SLURM_JOB_ID"]], timeout=60)
            raise SystemExit(0)
        if rc == 75:  # trellis.exit_codes.STOPPED_SAVED: stopped by SIGTERM after saving (scancel, requeue)
            raise SystemExit(rc)
        if rc != 0:
            raise RuntimeError(f"trellis train exited with code {rc}")
        return rc


def submit_submitit(spec: SubmitSpec):
    """Submit through submitit (per-task only); returns the submitit Job."""
    validate(spec)
    if spec.script:
        raise UserError(f"--via submitit runs `trellis train`; submit the script {spec.script} with --via sbatch")
    if spec.mode != "per-task":
        raise UserError("--via submitit runs one task per rank; use --mode per-task or --via sbatch")
    if not spec.time:
        raise UserError("--via submitit needs --time (submitit would otherwise impose its own 5-minute limit)")
    if shutil.which("sbatch") is None:
        raise UserError(f"`sbatch` is not on PATH; {SBATCH_HINT}")
    try:
        import submitit
        from submitit.slurm import slurm as submitit_slurm
    except ImportError as e:
        raise UserError("--via submitit needs submitit: pip install 'trellis-train[slurm]' (or use --via sbatch)") from e
    sig, secs = parse_signal(spec.signal)
    # A fresh folder per submission: a restarted cluster reuses job ids, and submitit keys its files by id.
    folder = Path(spec.log_dir) / f"submitit-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}"
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params = dict(name=spec.job_name, nodes=spec.nodes, tasks_per_node=spec.ranks_per_node,
                  timeout_min=time_minutes(spec.time), slurm_signal_delay_s=secs,
                  slurm_additional_parameters={"requeue": True})
    if spec.gpus_per_node:
        params["gpus_per_node"] = spec.gpus_per_node
    for key, value in (("slurm_partition", spec.partition), ("slurm_account", spec.account),
                       ("slurm_qos", spec.qos), ("slurm_constraint", spec.constraint)):
        if value:
            params[key] = value
    if spec.exclusive:
        params["slurm_exclusive"] = True
    executor.update_parameters(**params)
    previous = submitit_slurm.SlurmJobEnvironment.USR_SIG
    submitit_slurm.SlurmJobEnvironment.USR_SIG = sig  # the `#SBATCH --signal` submitit writes
    try:
        return executor.submit(TrainTask(spec.config, spec.overrides, spec.workdir, sig, spec.exports))
    except subprocess.CalledProcessError as e:
        raise UserError(f"sbatch rejected the job: {(e.stderr or e.output or b'').decode(errors='replace').strip()}") from e
    finally:
        submitit_slurm.SlurmJobEnvironment.USR_SIG = previous
