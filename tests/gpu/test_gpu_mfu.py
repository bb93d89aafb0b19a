"""One GPU: the compiled path equals eager, and the metrics carry TFLOP/s and MFU against the device's peak.

Skipped without CUDA. Run on a GPU machine with `pytest -m gpu tests/gpu/test_gpu_mfu.py`.
"""

from __future__ import annotations

import pytest
import torch

from ..distributed.harness import run_ranks
from ..distributed.workers import train_scenarios

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BASE = {"train.steps": 4, "train.micro_batch_size": 4, "train.lr": 3e-3, "train.schedule": "constant",
        "train.warmup_steps": 0, "data.seq_len": 128, "logging.progress": "none", "parallel.dp": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_mfu")
    sc = [{"overrides": {**BASE, "precision.dtype": dt, "train.compile": c,
                         "logging.metrics_file": str(d / f"{dt}-{c}.jsonl")}}
          for dt in ("fp32", "bf16") for c in (False, True)]
    return run_ranks(1, train_scenarios, sc, timeout=600)[0]


def test_compiled_equals_eager_on_gpu(runs):
    for eager, compiled, tol in ((runs[0], runs[1], 1e-4), (runs[2], runs[3], 2e-2)):  # fp32, bf16 autocast
        le = [r["loss"] for r in eager["records"]]
        lc = [r["loss"] for r in compiled["records"]]
        assert len(lc) == 4 and max(abs(a - b) for a, b in zip(le, lc)) <= tol, (le, lc)


def test_mfu_metric_on_gpu(runs):
    from trellis.parallel.flops import gpu_peak_flops

    peak = gpu_peak_flops(torch.cuda.get_device_name(0), "bf16")
    for r in runs[2]["records"] + runs[3]["records"]:
        assert r["tflops"] > 0
        if peak is None:
            assert r["mfu"] is None
        else:  # tflops per device over the table's peak (the record's own two figures agree)
            assert r["mfu"] == pytest.approx(r["tflops"] * 1e12 / peak) and 0 < r["mfu"] < 1
