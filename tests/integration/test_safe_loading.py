"""No pickle in a checkpoint directory can run code: a real trellis checkpoint whose DCP `.metadata` is replaced
by a malicious pickle (sha256 in metadata.json updated, so the checksums pass) is refused by `--resume` and by
`trellis checkpoint convert` with one error line, and the payload never runs. A clean checkpoint still
resumes and converts (the allow-list holds everything real DCP metadata needs)."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trellis import exit_codes
from trellis.cli import main
from trellis.engine.backends.deepspeed import deepspeed_safe_globals
from trellis.engine.checkpoint import safe_load as safe_pickle
from trellis.errors import CheckpointError

pytestmark = pytest.mark.integration

TRAIN = [sys.executable, "-m", "trellis", "train", "configs/tiny-llama.toml", "--logging.progress=none"]
# Resumes run on 1 process with the checkpoint's global batch (16 = 4 x 2 x dp2 = 4 x 4 x dp1): a changed global batch
# is refused (checkpoint.resume_allow_change).


class Payload:
    """Unpickling this creates `marker` (what an attacker's code would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class SystemPayload(Payload):
    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _plant(step_dir: Path, rel: str, data: bytes) -> None:
    (step_dir / rel).write_bytes(data)
    meta_path = step_dir / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    meta_path.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def checkpoint(repo, tmp_path_factory) -> Path:
    """A real 2-rank FSDP (ZeRO-3) checkpoint of tiny-llama after 2 steps."""
    d = tmp_path_factory.mktemp("ck")
    r = subprocess.run([*TRAIN, "--train.steps=2", "--zero.stage=3", f"--checkpoint.dir={d / 'ck'}",
                        f"--logging.metrics_file={d / 'm.jsonl'}"], cwd=repo, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "ck" / "step-2"


def test_clean_checkpoint_resumes_and_converts(repo, checkpoint, tmp_path, capsys):
    assert main(["checkpoint", "convert", str(checkpoint), "--to", "fp32", "--out", str(tmp_path / "fp32")]) == 0
    from safetensors.torch import load_file

    assert "model.embed_tokens.weight" in load_file(str(tmp_path / "fp32" / "model.safetensors"))
    r = subprocess.run([*TRAIN, "--train.steps=3", "--parallel.dp=1", "--train.grad_accum=4", f"--checkpoint.dir={tmp_path / 'ck'}",
                        f"--resume={checkpoint}", f"--logging.metrics_file={tmp_path / 'm.jsonl'}"], cwd=repo,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and (tmp_path / "ck" / "step-3").is_dir()


@pytest.mark.parametrize("payload", [Payload, SystemPayload])
def test_malicious_metadata_is_refused_by_resume_and_convert(repo, checkpoint, tmp_path, payload, capsys):
    bad = tmp_path / "step-2"
    shutil.copytree(checkpoint, bad)
    marker = tmp_path / "PWNED"
    _plant(bad, "state/.metadata", pickle.dumps(payload(marker)))
    from trellis.engine.checkpoint import io as io_

    io_.verify(bad)  # the checksums pass: only the allow-list stands in the way

    assert main(["checkpoint", "convert", str(bad), "--to", "fp32", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "refusing to load it" in err and "never contains" in err, err
    assert not marker.exists()

    r = subprocess.run([*TRAIN, "--train.steps=3", "--parallel.dp=1", "--train.grad_accum=4", f"--checkpoint.dir={tmp_path / 'ck'}",
                        f"--resume={bad}", f"--logging.metrics_file={tmp_path / 'm.jsonl'}"], cwd=repo,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == exit_codes.USER_ERROR, r.stderr[-3000:]
    assert "refusing to load it" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not marker.exists(), "the checkpoint's pickle ran code"


def test_safe_reader_refuses_directly(checkpoint, tmp_path):
    """The reader dcp.load uses (defence in depth behind the check before loading)."""
    bad = tmp_path / "state"
    shutil.copytree(checkpoint / "state", bad)
    marker = tmp_path / "PWNED"
    (bad / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(safe_pickle.UnsafePickle):
        safe_pickle.SafeFileSystemReader(str(bad)).read_metadata()
    with pytest.raises(CheckpointError):
        safe_pickle.dcp_full_state(bad)
    assert not marker.exists()
    md = safe_pickle.SafeFileSystemReader(str(checkpoint / "state")).read_metadata()
    assert any(k.startswith("model.") for k in md.state_dict_metadata)


def test_non_tensor_items_load_weights_only(tmp_path):
    """DCP's default planners torch.load(weights_only=False) the non-tensor items of a .distcp file."""
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    marker = tmp_path / "PWNED"
    evil, good = io.BytesIO(), io.BytesIO()
    torch.save({"x": Payload(marker)}, evil)
    torch.save({"lr": 3e-3, "betas": (0.9, 0.95), "params": ["a"]}, good)
    planner = safe_pickle.SafeLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}
    item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex("optim.pg"), dest_offsets=torch.Size([0]),
                    storage_index=MetadataIndex("optim.pg"), storage_offsets=torch.Size([0]), lengths=torch.Size([0]))
    for buf in (evil, good):
        buf.seek(0)
    with pytest.raises(safe_pickle.UnsafePickle):
        planner.load_bytes(item, evil)
    planner.load_bytes(item, good)
    assert planner.state_dict["optim.pg"]["betas"] == (0.9, 0.95)
    assert not marker.exists()


def test_deepspeed_files_are_checked_weights_only(tmp_path):
    """DeepSpeed loads its *.pt with weights_only=False: check_state_dir() loads each with weights_only=True
    (plus DeepSpeed's own classes) before any rank hands the directory to DeepSpeed."""
    marker = tmp_path / "PWNED"
    state = tmp_path / "state" / "global_step"
    state.mkdir(parents=True)
    classes = deepspeed_safe_globals()
    names = {c.__name__ for c in classes}
    good = {"module": {"w": torch.ones(2)}, "param_shapes": [__import__("collections").OrderedDict(w=torch.Size([2]))]}
    if "DynamicLossScaler" in names:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        good["optimizer_state_dict"] = {"loss_scaler": DynamicLossScaler(init_scale=2.0**8, scale_window=1000, min_scale=1, delayed_shift=1, consecutive_hysteresis=False), "zero_stage": ZeroStageEnum(2)}
    torch.save(good, state / "mp_rank_00_model_states.pt")
    safe_pickle.check_state_dir(tmp_path / "state", classes)
    torch.save({"module": Payload(marker)}, state / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(safe_pickle.UnsafePickle) as e:
        safe_pickle.check_state_dir(tmp_path / "state", classes)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in str(e.value)
    assert not marker.exists()


@pytest.mark.slow
def test_deepspeed_checkpoint_resumes_and_a_planted_pickle_is_refused(repo, tmp_path):
    pytest.importorskip("deepspeed")
    ds = ["--zero.backend=deepspeed", "--zero.stage=2"]
    r = subprocess.run([*TRAIN, "--train.steps=1", *ds, f"--checkpoint.dir={tmp_path / 'ck'}",
                        f"--logging.metrics_file={tmp_path / 'm.jsonl'}"], cwd=repo, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    step = tmp_path / "ck" / "step-1"
    resume = [*TRAIN, "--train.steps=2", *ds, f"--resume={step}", f"--logging.metrics_file={tmp_path / 'm2.jsonl'}"]
    r = subprocess.run([*resume, f"--checkpoint.dir={tmp_path / 'ck2'}"], cwd=repo, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]  # the safe engine loads it

    marker = tmp_path / "PWNED"
    optim = next(step.glob("state/*/zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    buf = io.BytesIO()
    torch.save({"optimizer_state_dict": Payload(marker)}, buf)
    _plant(step, str(optim.relative_to(step)), buf.getvalue())
    r = subprocess.run([*resume, f"--checkpoint.dir={tmp_path / 'ck3'}"], cwd=repo, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == exit_codes.USER_ERROR, r.stderr[-3000:]
    assert "refusing to load it" in r.stderr and "Unsupported global: GLOBAL exec" in r.stderr, r.stderr[-3000:]
    assert not marker.exists()
