"""Foundation proofs on real gloo ranks: dp numerics vs a 1-process reference, AMP, loss scaling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from trellis import configs

from .harness import run_ranks
from .reference import reference_run
from .workers import poison_grad_on_rank1, train_scenarios

pytestmark = pytest.mark.distributed

EXACT = {  # fp32, constant LR, no weight decay: comparable with the plain-torch reference
    "train.steps": 5, "train.micro_batch_size": 2, "train.grad_accum": 2, "train.lr": 3e-3,
    "train.schedule": "constant", "train.warmup_steps": 0, "train.weight_decay": 0.0, "train.grad_clip": 1.0,
    "data.seq_len": 64, "logging.progress": "none",
}


def test_dp2_accum2_equals_single_process_reference(tmp_path):
    ov = {**EXACT, "parallel.dp": 2, "logging.metrics_file": str(tmp_path / "m.jsonl")}
    [r0, _] = run_ranks(2, train_scenarios, [{"overrides": ov}])
    got = r0[0]
    ref_losses, ref_state = reference_run(configs.load("tiny-llama", ov), 5)
    losses = [rec["loss"] for rec in got["records"]]
    assert len(losses) == 5
    dl = max(abs(a - b) for a, b in zip(losses, ref_losses))
    dw = max((got["state"][k] - v).abs().max().item() for k, v in ref_state.items())
    print(f"dp2·accum2 vs reference: max |Δloss| = {dl:.2e}, max |Δw| = {dw:.2e}")
    assert dl <= 1e-6, (losses, ref_losses)
    assert dw <= 1e-6
    assert losses[-1] < losses[0]


def _inject_inf_on_rank1_step2(trainer, rank):  # module level: scenario hooks are pickled to the ranks
    poison_grad_on_rank1({2}, math.inf)(trainer, rank)


def test_fp16_overflow_on_one_rank_skips_step_everywhere(tmp_path):
    ov = {**EXACT, "parallel.dp": 2, "precision.dtype": "fp16", "precision.initial_scale_power": 8,
          "precision.hysteresis": 1, "precision.loss_scale_window": 2, "train.steps": 4,
          "logging.metrics_file": str(tmp_path / "m.jsonl")}
    res = run_ranks(2, train_scenarios, [{"overrides": ov, "hook": _inject_inf_on_rank1_step2}])
    recs = res[0][0]["records"]
    skipped = [r["skipped"] for r in recs]
    scales = [r["loss_scale"] for r in recs]
    print("fp16 steps: skipped", skipped, "scales", scales)
    assert skipped == [False, True, False, False]
    # step1 clean (1 of window 2), step2 overflow halves 256 -> 128 (hysteresis 1), then 2 clean -> 256
    assert scales == [256.0, 128.0, 128.0, 256.0]
    # weights identical on both ranks at the end (the skip happened everywhere)
    assert res[0][0]["summary"]["skipped_steps"] == 1 and res[1][0]["summary"]["skipped_steps"] == 1
    # master weights stay fp32
    assert set(res[0][0]["param_dtypes"].values()) == {"torch.float32"}


def test_bf16_and_fp16_train_and_keep_fp32_master(tmp_path):
    base = {"train.steps": 30, "data.seq_len": 64, "train.micro_batch_size": 4, "train.grad_accum": 1,
            "parallel.dp": 2, "logging.progress": "none", "train.lr": 3e-3, "train.warmup_steps": 3}
    scenarios = [{"overrides": {**base, "precision.dtype": d, "logging.metrics_file": str(tmp_path / f"{d}.jsonl")}}
                 for d in ("bf16", "fp16")]
    [r0, _] = run_ranks(2, train_scenarios, scenarios)
    for d, out in zip(("bf16", "fp16"), r0):
        losses = [r["loss"] for r in out["records"] if not r["skipped"]]
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        print(f"{d}: loss {first:.3f} -> {last:.3f}")
        assert last < first - 0.3, (d, first, last)
        assert set(out["param_dtypes"].values()) == {"torch.float32"}, d


def nonfinite_scenarios(rank: int, world: int, scenarios: list[dict]) -> list[dict]:
    """Each scenario: train with a nan gradient on rank 1 at some steps; report the records, the error (if the
    run stopped) and the checkpoints left."""
    from trellis import configs
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import Trainer
    from trellis.errors import TrainingDiverged

    ctx = init_distributed(120.0)
    out = []
    for sc in scenarios:
        cfg = configs.load("tiny-llama", dict(sc["overrides"]))
        trainer = Trainer(cfg, ctx)
        poison_grad_on_rank1(sc["nan_steps"], math.nan)(trainer, rank)
        err, summary = None, None
        try:
            summary = trainer.train()
        except TrainingDiverged as e:
            err = (e.exit_code, e.messages)
        torch.distributed.barrier()
        text = Path(cfg.logging.metrics_file).read_text() if rank == 0 else ""
        ck = sorted(p.name for p in Path(cfg.checkpoint.dir).glob("step-*")) if cfg.checkpoint.dir else []
        out.append({"lines": text.splitlines(), "error": err, "summary": summary, "checkpoints": ck})
    return out


def test_nonfinite_gradient_skips_the_step_everywhere_and_repeated_ones_stop_the_run(tmp_path):
    """fp32 (no loss scaler): a nan gradient on ONE rank makes the world-reduced grad norm nan, so every rank
    skips that step (no update); train.max_nonfinite_steps in a row stop the run with one error naming the step,
    exit code 1, and no checkpoint of a non-finite step. Metrics lines stay strict JSON."""
    base = {**EXACT, "parallel.dp": 2, "train.steps": 4, "checkpoint.interval": 1}
    scenarios = [
        {"overrides": {**base, "logging.metrics_file": str(tmp_path / "once.jsonl"),
                       "checkpoint.dir": str(tmp_path / "ck-once")}, "nan_steps": {2}},
        {"overrides": {**base, "train.max_nonfinite_steps": 2, "logging.metrics_file": str(tmp_path / "rep.jsonl"),
                       "checkpoint.dir": str(tmp_path / "ck-rep")}, "nan_steps": {2, 3, 4}},
    ]
    r0, r1 = run_ranks(2, nonfinite_scenarios, scenarios, timeout=400)
    once, rep = r0

    def strict(line):
        return json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    recs = [strict(x) for x in once["lines"]]
    print("one nan step:", [(r["step"], r["skipped"], r["grad_norm"]) for r in recs])
    assert [r["skipped"] for r in recs] == [False, True, False, False]
    assert recs[1]["grad_norm"] is None and "grad_norm" in recs[1]["nonfinite"]
    assert once["error"] is None and r1[0]["error"] is None
    assert once["summary"]["skipped_steps"] == 1 and r1[0]["summary"]["skipped_steps"] == 1
    assert once["checkpoints"] == ["step-1", "step-3", "step-4"]  # keep_last_k permitting; never step-2
    # repeated: steps 2 and 3 non-finite -> stop at step 3 on every rank, only step-1 saved
    print("repeated nan steps:", rep["error"], rep["checkpoints"])
    for res in (rep, r1[1]):
        assert res["error"] is not None and res["error"][0] == 1
        assert "step 3:" in res["error"][1][0] and "train.max_nonfinite_steps=2" in res["error"][1][0]
        assert res["checkpoints"] == ["step-1"]
    assert [strict(x)["skipped"] for x in rep["lines"]] == [False, True, True]
