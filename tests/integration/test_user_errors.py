"""User errors that used to escape as per-rank tracebacks: one `error:` line per problem, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_deepspeed_json_rejected_by_deepspeeds_schema_is_one_line_per_field(repo, tmp_path):
    """DeepSpeed's own pydantic model refuses these fields inside deepspeed.initialize (it used to print a
    pydantic traceback per rank and exit 1)."""
    ds = tmp_path / "ds_config.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2,
                              "zero_optimization": {"stage": 2, "reduce_bucket_size": 0, "reduce_bucket_sizee": 5}}))
    r = subprocess.run([sys.executable, "-m", "trellis", "train", "tiny-llama", "--deepspeed", str(ds),
                        "--parallel.dp=1", "--data.seq_len=32", "--train.steps=1", "--logging.progress=none",
                        f"--logging.metrics_file={tmp_path / 'm.jsonl'}"], cwd=repo, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = sorted(line for line in r.stderr.splitlines() if line.startswith("error:"))
    assert errors == [
        f"error: --deepspeed {ds}: zero_optimization.reduce_bucket_size: Input should be greater than 0 (got 0); "
        "fix or remove it (DeepSpeed's config schema)",
        f"error: --deepspeed {ds}: zero_optimization.reduce_bucket_sizee: Extra inputs are not permitted (got 5); "
        "fix or remove it (DeepSpeed's config schema)"], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ValidationError" not in r.stderr


@pytest.mark.parametrize("name,expect", [("corpus.bin", "unsupported extension '.bin'"),
                                         ("missing.jsonl", "no such file or directory")])
def test_unreadable_data_path_is_refused_before_ranks_start(repo, tmp_path, name, expect):
    """Before this check a parquet file was trained on as raw bytes (exit 0), and other bad paths failed on every
    rank after start-up."""
    if name == "corpus.bin":
        (tmp_path / name).write_bytes(b"\x00\x01 not text")
    r = subprocess.run([sys.executable, "-m", "trellis", "train", "tiny-llama", f"--data.path={tmp_path / name}",
                        "--parallel.dp=2", "--logging.progress=none", f"--logging.metrics_file={tmp_path / 'm.jsonl'}"],
                       cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], r.stderr[-3000:]
    assert "rank" not in r.stderr  # the parent refused: no rank was started (a rank's refusal names its peers)


def _mask_libaio_prefix() -> list[str] | None:
    """A command prefix running its command where libaio does not exist: a private mount namespace (root only)
    with /dev/null bound over libaio's header and libraries. Only that process tree sees the change."""
    import glob
    import os
    import shutil

    files = glob.glob("/usr/include/libaio.h") + glob.glob("/usr/lib/*/libaio.*") + glob.glob("/usr/lib*/libaio.*")
    if os.geteuid() != 0 or not shutil.which("unshare") or not files:
        return None
    binds = " && ".join(f"mount --bind /dev/null {f}" for f in sorted(set(files)))
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{binds} && exec "$@"', "sh"]


def test_nvme_offload_without_libaio_says_what_to_install(repo, tmp_path):
    """DeepSpeed's async_io op links libaio; without it the ranks used to fail in the op build with a compiler
    traceback each. Here libaio is really absent for the run (masked in a private mount namespace)."""
    prefix = _mask_libaio_prefix()
    if prefix is None:
        pytest.skip("needs root, unshare and an installed libaio to hide (make sysdeps)")
    r = subprocess.run([*prefix, sys.executable, "-m", "trellis", "train", "tiny-llama", "--zero.backend=deepspeed",
                        "--zero.stage=3", "--zero.offload_optimizer=nvme", f"--zero.nvme_path={tmp_path / 'nvme'}",
                        "--parallel.dp=1", "--data.seq_len=32", "--train.steps=1", "--logging.progress=none",
                        f"--logging.metrics_file={tmp_path / 'm.jsonl'}"], cwd=repo, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "libaio-dev" in errors[0] and "zero.offload_" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
