"""The memory estimator against the ENGINE's own training runs (issue 9, validation vs measurement).

tests/distributed/test_memory_validation.py checks the estimator against hand-built layouts; this file runs
the real trainer (`workers.train_scenarios`, config "tiny-llama", native backend) and compares, per rank:

- model states from `backend.memory_report()` (live tensors and the live optimizer): params, grads,
  optimizer_states within ±5 % — fp32 and bf16, ZeRO 0-3, dp 1 and 2, full fine-tuning and LoRA (22 layouts);
- activations saved for backward (unique storages seen by `torch.autograd.graph.saved_tensors_hooks`
  around the backend module's forward, parameters excluded) within ±10 % — fp32, no checkpointing, dp 1/2.

Master weights: on the native backend the fp32 trainable params ARE the master weights (engine/amp.py).
The estimator counts them once, under `params` (master_weights = 0); `memory_report()` additionally lists
them as `master_weights` when compute is bf16/fp16. The test checks exactly that relation instead of
double counting.

Every run prints measured vs estimated numbers (pytest -s to see them).
"""

from __future__ import annotations

import pytest

from .harness import run_ranks
from .workers import train_scenarios

pytestmark = pytest.mark.distributed

BATCH, SEQ = 2, 32
BASE = {"train.steps": 1, "train.micro_batch_size": BATCH, "train.grad_accum": 1, "data.seq_len": SEQ,
        "train.warmup_steps": 0, "logging.progress": "none", "logging.metrics_file": ""}
CASES = {f"{prec} zero{z}": {"precision.dtype": prec, "zero.stage": z} for prec in ("fp32", "bf16") for z in range(4)}
CASES.update({
    "fp32 lora zero0": {"precision.dtype": "fp32", "zero.stage": 0, "peft.method": "lora"},
    "bf16 lora zero0": {"precision.dtype": "bf16", "zero.stage": 0, "peft.method": "lora"},
    "fp32 lora zero3": {"precision.dtype": "fp32", "zero.stage": 3, "peft.method": "lora"},
    "fp32 qlora zero0": {"precision.dtype": "fp32", "zero.stage": 0, "peft.method": "qlora"},
    "bf16 qlora zero0": {"precision.dtype": "bf16", "zero.stage": 0, "peft.method": "qlora"},
})
# DeepSpeed backend, dp 2. Known disagreements between the classic accounting the estimator uses and what
# the engine reports (strict xfail: they flip to failures once the estimator or memory_report is fixed):
#  - bf16 ZeRO>=2: memory_report counts the grad partition as fp32 (4Ψ/dp), classic says 2Ψ/dp;
#  - bf16 ZeRO-0: memory_report finds no master tensors although Adam's states are fp32 (8Ψ), so DeepSpeed's
#    bf16 optimizer holds fp32 copies that `_master_partitions` does not see (estimator: 4Ψ).
DS_CASES = {f"ds {prec} zero{z}": {"zero.backend": "deepspeed", "precision.dtype": prec, "zero.stage": z}
            for prec in ("fp32", "bf16") for z in range(4)}
DS_KNOWN_GAPS = {"ds bf16 zero0": "master_weights",
                 "ds bf16 zero2": "grads", "ds bf16 zero3": "grads"}
ACT_CASES = ("fp32 zero0", "fp32 lora zero0")  # no FSDP gathers, no autocast copies: pure activations


def meter_activations(trainer, rank) -> None:
    """Scenario hook: meter what autograd saves during the module's forward; report it in memory_report()."""
    import functools

    from trellis.engine.memory_measure import SavedTensorMeter

    backend = trainer.backend
    module = backend.module
    peaks: list[int] = []
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        meter = SavedTensorMeter.for_model(module)
        with meter.track():
            out = inner(*args, **kwargs)
        peaks.append(meter.peak)
        return out

    module.forward = forward
    report = backend.memory_report

    def memory_report() -> dict:
        return {**report(), "activations": max(peaks) if peaks else 0}

    backend.memory_report = memory_report


def _setup(dp: int, ov: dict):
    from trellis.engine.memory import TrainingSetup

    peft = ov.get("peft.method", "none")
    quant = dict(peft="lora", quant="nf4", double_quant=True) if peft == "qlora" else dict(peft=peft)
    return TrainingSetup(backend=ov.get("zero.backend", "native"), dp=dp, zero=ov["zero.stage"],
                         precision=ov["precision.dtype"], lora_r=8, micro_batch=BATCH, seq_len=SEQ, **quant)


@pytest.fixture(scope="module", params=[1, 2], ids=["dp1", "dp2"])
def runs(request):
    dp = request.param
    scenarios = [{"overrides": {**BASE, "parallel.dp": dp, **ov}, "hook": meter_activations} for ov in CASES.values()]
    per_rank = run_ranks(dp, train_scenarios, scenarios, timeout=500)
    return dp, {name: [per_rank[r][i]["memory"] for r in range(dp)] for i, name in enumerate(CASES)}


def _rel(est: float, meas: float) -> float:
    return (est - meas) / meas if meas else (0.0 if est == 0 else float("inf"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(CASES))
def test_model_states_match_engine(runs, name):
    from trellis.engine.memory import estimate
    from trellis.engine.memory_models import resolve_model

    dp, by_name = runs
    ov = CASES[name]
    est = estimate(resolve_model("tiny-llama"), _setup(dp, ov)).ranks[0]
    bad = []
    for rank, mem in enumerate(by_name[name]):
        line = [f"dp{dp} {name:16s} rank{rank}"]
        for key in ("params", "grads", "optimizer_states"):
            e, m = getattr(est, key), mem[key]
            line.append(f"{key} est {e:.0f} meas {m} ({_rel(e, m):+.2%})")
            if abs(e - m) > 0.05 * m:
                bad.append(line[-1])
        print(" | ".join(line))
        # native: fp32 trainable params are the master weights, counted once (under params).
        assert est.master_weights == 0
        assert mem["master_weights"] == (mem["trainable_params"] if ov["precision.dtype"] != "fp32" else 0)
    assert not bad, f"dp{dp} {name}: " + "; ".join(bad)


@pytest.fixture(scope="module")
def ds_runs():
    scenarios = [{"overrides": {**BASE, "parallel.dp": 2, **ov}} for ov in DS_CASES.values()]
    per_rank = run_ranks(2, train_scenarios, scenarios, timeout=550)
    return {name: [per_rank[r][i]["memory"] for r in range(2)] for i, name in enumerate(DS_CASES)}


def _ds_params():
    for name in DS_CASES:
        for key in ("params", "grads", "optimizer_states", "master_weights"):
            marks = []
            if DS_KNOWN_GAPS.get(name) == key:
                marks = [pytest.mark.xfail(strict=True, reason="classic accounting vs DeepSpeed, see DS_KNOWN_GAPS")]
            yield pytest.param(name, key, marks=marks, id=f"{name}-{key}")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,key", list(_ds_params()))
def test_deepspeed_model_states_match_engine(ds_runs, name, key):
    from trellis.engine.memory import estimate
    from trellis.engine.memory_models import resolve_model

    est = estimate(resolve_model("tiny-llama"), _setup(2, DS_CASES[name])).ranks[0]
    e = getattr(est, key)
    for rank, mem in enumerate(ds_runs[name]):
        m = mem[key]
        print(f"dp2 {name:16s} rank{rank} {key} est {e:.0f} meas {m} ({_rel(e, m):+.2%})")
        assert abs(e - m) <= 0.05 * m if m else e == 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ACT_CASES)
def test_activations_match_saved_tensors(runs, name):
    from trellis.engine.memory import estimate
    from trellis.engine.memory_models import resolve_model

    dp, by_name = runs
    est = estimate(resolve_model("tiny-llama"), _setup(dp, CASES[name])).ranks[0]
    for rank, mem in enumerate(by_name[name]):
        m = mem["activations"]
        # the module forward excludes the loss: compare without the fp32 log-probs (`logits`)
        print(f"dp{dp} {name:16s} rank{rank} activations est {est.activations:.0f} meas {m} "
              f"({_rel(est.activations, m):+.2%})")
        assert m > 0 and abs(est.activations - m) <= 0.10 * m
