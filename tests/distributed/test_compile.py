"""train.compile=true: per-block torch.compile (CPU inductor) equals eager for dp2, ZeRO-3 and LoRA, in one
2-rank launch (inductor builds are slow on small machines: few, tiny scenarios, 2 steps each). tp2 + compile fails
in DTensor's backward and is a ConfigError (tests/unit/test_compile_config.py)."""

from __future__ import annotations

import pytest

from .harness import run_ranks
from .workers import train_scenarios

pytestmark = pytest.mark.distributed

# SGD: the update is linear in the gradient, so Δw measures the compiled backward itself (Adam's first steps move
# a weight by ≈ lr·sign(g): a rounding-level gradient difference from inductor's reduction order can flip it)
BASE = {"train.steps": 2, "train.micro_batch_size": 2, "train.grad_accum": 1, "train.optimizer": "sgd",
        "train.lr": 0.5, "train.schedule": "constant", "train.warmup_steps": 0, "data.seq_len": 32,
        "logging.progress": "none"}
CASES = {
    "dp2": {"parallel.dp": 2, "parallel.tp": 1},
    "dp2_zero3": {"parallel.dp": 2, "parallel.tp": 1, "zero.stage": 3},
    "dp2_lora": {"parallel.dp": 2, "parallel.tp": 1, "peft.method": "lora", "peft.r": 4},
}


def assert_blocks_compiled(trainer, rank):
    """Runs in the rank before training: every decoder block's forward is the compiled one."""
    mods = [m for m in trainer.backend.module.modules() if getattr(m, "_trellis_compiled", False)]
    assert len(mods) == 4, f"{len(mods)} compiled blocks (tiny-llama has 4)"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("compile")
    scenarios = []
    for name, ov in CASES.items():
        for compiled in (False, True):
            scenarios.append({"overrides": {**BASE, **ov, "train.compile": compiled,
                                            "logging.metrics_file": str(d / f"{name}-{compiled}.jsonl")},
                              "hook": assert_blocks_compiled if compiled else None})
    out = run_ranks(2, train_scenarios, scenarios, timeout=900)[0]
    return {name: (out[2 * i], out[2 * i + 1]) for i, name in enumerate(CASES)}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_equals_eager(runs, name):
    eager, compiled = runs[name]
    le = [r["loss"] for r in eager["records"]]
    lc = [r["loss"] for r in compiled["records"]]
    dl = max(abs(a - b) for a, b in zip(le, lc))
    dw = max((compiled["state"][k] - v).abs().max().item() for k, v in eager["state"].items())
    print(f"{name}: max |Δloss| {dl:.2e}, max |Δw| {dw:.2e}")
    assert len(lc) == 2 and dl <= 1e-5 and dw <= 1e-5
    # the run's metrics carry the FLOP model's throughput (parallel/flops.py)
    assert all(r["tflops"] > 0 and r["mfu"] > 0 for r in compiled["records"])
