"""Config keys whose rule needs the world size or the machine, checked on real ranks (issue 14):
`train.global_batch_size` against the resolved `parallel.dp = -1`, `zero.pin_memory` without an
accelerator, and `checkpoint.save_on_signal` (a stop signal saves only when it is true)."""

from __future__ import annotations

import pytest
import torch

from .harness import run_ranks
from .workers import train_outcomes

pytestmark = pytest.mark.distributed

BASE = {"train.steps": 3, "train.micro_batch_size": 1, "train.grad_accum": 1, "data.seq_len": 32,
        "logging.progress": "none", "logging.metrics_file": ""}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    scenarios = [
        # dp = -1 resolves to 2 on 2 ranks: 1 x 1 x 2 = 2 sequences per step, not 7
        {"overrides": {**BASE, "parallel.dp": -1, "train.global_batch_size": 7}},
        {"overrides": {**BASE, "parallel.dp": -1, "train.global_batch_size": 2}},
        {"overrides": {**BASE, "parallel.dp": 2, "zero.stage": 3, "zero.offload_optimizer": "cpu",
                       "zero.pin_memory": True}},
        {"overrides": {**BASE, "parallel.dp": 2, "train.steps": 5, "checkpoint.dir": str(d / "no_save"),
                       "checkpoint.save_on_signal": False}, "signal_at_step": 2},
        {"overrides": {**BASE, "parallel.dp": 2, "train.steps": 5, "checkpoint.dir": str(d / "save"),
                       "checkpoint.save_on_signal": True}, "signal_at_step": 2},
    ]
    return run_ranks(2, train_outcomes, scenarios, timeout=400)


def test_global_batch_size_is_checked_after_dp_minus_one_is_resolved(outcomes):
    for rank in range(2):
        err = outcomes[rank][0].get("error")
        assert err and "train.global_batch_size=7" in err[0] and "parallel.dp (2)" in err[0], outcomes[rank][0]
        assert outcomes[rank][1]["summary"]["steps"] == 3  # the matching global batch trains


@pytest.mark.skipif(torch.accelerator.is_available(), reason="an accelerator can pin host memory")
def test_pin_memory_without_an_accelerator_is_a_clear_config_error(outcomes):
    err = outcomes[0][2].get("error")
    assert err and "zero.pin_memory" in err[0], outcomes[0][2]


def test_stop_signal_without_save_on_signal_stops_without_saving(outcomes):
    r = outcomes[0][3]
    assert r["summary"]["stopped_by_signal"] and r["summary"]["steps"] == 2
    assert r["saved"] == [] and r["summary"]["checkpoint"] is None


def test_stop_signal_with_save_on_signal_saves_the_step(outcomes):
    r = outcomes[0][4]
    assert r["summary"]["stopped_by_signal"] and r["summary"]["steps"] == 2
    assert r["saved"] == [2]
