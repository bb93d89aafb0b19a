"""Native ZeRO 0-3 over dp=2: numerics equal the 1-process reference; per-rank bytes are the expected share."""

from __future__ import annotations

import pytest

from trellis import configs

from .harness import run_ranks
from .reference import reference_run
from .workers import train_scenarios

pytestmark = pytest.mark.distributed

EXACT = {"train.steps": 3, "train.micro_batch_size": 2, "train.grad_accum": 2, "train.lr": 3e-3,
         "train.schedule": "constant", "train.warmup_steps": 0, "train.weight_decay": 0.0, "train.grad_clip": 1.0,
         "data.seq_len": 64, "logging.progress": "none", "parallel.dp": 2}
CASES = {
    "zero0": {"zero.stage": 0},
    "zero1": {"zero.stage": 1},
    "zero2": {"zero.stage": 2},
    "zero3": {"zero.stage": 3},
    "zero3+cpu_offload": {"zero.stage": 3, "zero.offload_optimizer": "cpu"},
    "zero3+full_ckpt": {"zero.stage": 3, "activation_checkpointing.mode": "full"},
    "zero1+selective_ckpt": {"zero.stage": 1, "activation_checkpointing.mode": "selective"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("zero")
    scenarios = [{"overrides": {**EXACT, **ov, "logging.metrics_file": str(d / f"{name}.jsonl")}}
                 for name, ov in CASES.items()]
    per_rank = run_ranks(2, train_scenarios, scenarios)
    ref_losses, ref_state = reference_run(configs.load("tiny-llama", EXACT), 3)
    n_params = sum(v.numel() for v in ref_state.values())
    return {name: [per_rank[0][i], per_rank[1][i]] for i, name in enumerate(CASES)}, ref_losses, ref_state, n_params


@pytest.mark.parametrize("name", list(CASES))
def test_numerics_equal_reference(runs, name):
    by_name, ref_losses, ref_state, _ = runs
    out = by_name[name][0]
    losses = [r["loss"] for r in out["records"]]
    dl = max(abs(a - b) for a, b in zip(losses, ref_losses))
    dw = max((out["state"][k] - v).abs().max().item() for k, v in ref_state.items())
    print(f"{name}: max |Δloss| {dl:.2e}, max |Δw| {dw:.2e}")
    assert len(losses) == 3 and dl <= 1e-5 and dw <= 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_per_rank_bytes_are_the_expected_share(runs, name):
    by_name, _, _, n = runs
    stage = {**EXACT, **CASES[name]}["zero.stage"] if "zero.stage" in CASES[name] else 0
    mem = [by_name[name][r]["memory"] for r in (0, 1)]
    params = [m["params"] for m in mem]
    opt = [m["optimizer_states"] for m in mem]
    if stage >= 2:
        # FSDP2 shards every parameter on dim 0 (padding at most one row per tensor on the last rank).
        assert sum(params) >= 4 * n and all(abs(p - 2 * n) <= 0.01 * 2 * n for p in params), params
        assert all(o == 2 * p for o, p in zip(opt, params)), (opt, params)  # Adam m + v of the local shard
    else:
        assert params == [4 * n, 4 * n]
        if stage == 1:
            assert sum(opt) == 8 * n  # each element's state lives on exactly one dp rank
            assert all(abs(o - 4 * n) <= 0.05 * 4 * n for o in opt), opt
        else:
            assert opt == [8 * n, 8 * n]
