"""The planner's cluster profile and throughput model: the alpha-beta fit on synthetic timings, the cluster JSON's
errors through the real CLI, and rankings on synthetic clusters (a slow all-reduce puts tp last)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from trellis.cli import main
from trellis.engine.memory.cluster import (AlphaBeta, default_profile, fit_alpha_beta, load_profile,
                                           profile_from_dict)
from trellis.engine.memory.estimator import TrainingSetup
from trellis.engine.memory.models import resolve_model
from trellis.engine.memory.planner import plan
from trellis.engine.plan.validate import pick, spearman
from trellis.errors import ConfigError


def test_fit_recovers_alpha_beta_from_noisy_timings():
    alpha, beta = 35e-6, 1 / 20e9
    sizes = [2.0 ** k for k in range(10, 26, 3)]
    noise = [1.02, 0.98, 1.01, 0.99, 1.0, 1.01]
    fit = fit_alpha_beta(sizes, [(alpha + beta * s) * n for s, n in zip(sizes, noise)])
    assert fit.beta == pytest.approx(beta, rel=0.03)
    assert fit.alpha == pytest.approx(alpha, rel=0.3)
    assert fit.time(1e6, calls=2) == pytest.approx(2 * fit.alpha + 1e6 * fit.beta)


def test_fit_never_returns_negative_costs():
    flat = fit_alpha_beta([1e3, 1e4, 1e5], [3e-4, 2.9e-4, 2.8e-4])  # noise with a downward slope
    assert flat.beta == 0.0 and flat.alpha == pytest.approx(2.9e-4)
    through0 = fit_alpha_beta([1e6, 2e6, 4e6], [0.9e-3, 2.1e-3, 4.0e-3])  # negative intercept
    assert through0.alpha == 0.0 and through0.beta > 0


@pytest.mark.parametrize("sizes,times", [([1e3, 1e6], [1e-4, 1e-3]), ([1e3, 1e3, 1e3], [1e-4, 1e-4, 1e-4])])
def test_fit_rejects_too_few_points(sizes, times):
    with pytest.raises(ValueError, match="at least 3 timings over at least 2 message sizes"):
        fit_alpha_beta(sizes, times)


def test_profile_round_trips_and_scales_to_other_group_sizes(tmp_path):
    p = default_profile("cpu", ranks_per_node=4)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(p.as_dict()))
    q = load_profile(path)
    assert q == p
    two = {"all_reduce": {2: AlphaBeta(1e-4, 1e-9)}}
    r = replace(p, collectives=two)
    # n = 4 from the n = 2 fit: latency steps 3x, ring wire factor (2*3/4) / (2*1/2) = 1.5x
    assert r.comm("all_reduce", 4, 1e6) == pytest.approx(3e-4 + 1.5e-3)
    assert r.comm("all_reduce", 1, 1e6) == 0.0


def _write(tmp_path, raw) -> str:
    path = tmp_path / "cluster.json"
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return str(path)


GOOD = default_profile("cpu").as_dict()


@pytest.mark.parametrize("raw,needle", [
    ("{not json", "not JSON"),
    ({**GOOD, "version": 7}, "version = 7"),
    ({k: v for k, v in GOOD.items() if k != "collectives"}, "missing key 'collectives'"),
    ({**GOOD, "matmul_flops": {"fp32": -1}}, "matmul_flops.fp32 = -1"),
    ({**GOOD, "collectives": {"all_reduce": {"2": {"alpha_s": 1e-4}}}}, "collectives.all_reduce.2 must be"),
    ({**GOOD, "collectives": {"broadcast_everything": {"2": {"alpha_s": 0, "beta_s_per_byte": 0}}}},
     "collectives.broadcast_everything: unknown collective"),
    ({**GOOD, "overhead_s": {"layer": "fast"}}, "overhead_s.layer = 'fast'"),
    ({**GOOD, "typo": 1}, "unknown key 'typo'"),
])
def test_bad_cluster_file_is_one_config_error_naming_file_and_key(tmp_path, capsys, raw, needle):
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match="cluster.json"):
        load_profile(path)
    rc = main(["plan", "--model", "tiny-llama", "--gpus", "2", "--gpu-mem", "8GB", "--cluster", path])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "cluster.json" in err and "Traceback" not in err


def test_missing_cluster_file_and_unknown_device(tmp_path, capsys):
    base = ["plan", "--model", "tiny-llama", "--gpus", "2", "--gpu-mem", "8GB"]
    assert main(base + ["--cluster", str(tmp_path / "nope.json")]) == 2
    assert "trellis plan --calibrate --out" in capsys.readouterr().err
    assert main(base + ["--device", "TPUv9"]) == 2
    assert "--device='TPUv9'" in capsys.readouterr().err


def _ranking(allreduce: AlphaBeta) -> list:
    d = resolve_model("tiny-llama")
    p = default_profile("cpu", ranks_per_node=4)
    cluster = replace(p, collectives={**p.collectives, "all_reduce": {n: allreduce for n in (2, 4)}},
                      overhead_s={"layer": 1e-3, "tp_layer": 1e-3, "step": 1e-2})
    base = TrainingSetup(backend="native", precision="fp32", seq_len=128, gpu_mem=8e9, gpus_per_node=4)
    res = plan(d, base, gpus=4, global_batch=8, cluster=cluster)
    return res.feasible


def test_slow_all_reduce_ranks_tp_last_and_fast_one_does_not():
    slow = _ranking(AlphaBeta(20e-3, 1 / 1e8))
    tp = [i for i, c in enumerate(slow) if c.setup.tp > 1]
    assert tp and min(tp) > max(i for i, c in enumerate(slow) if c.setup.tp == 1)
    fast = _ranking(AlphaBeta(0.0, 1e-15))
    assert any(c.setup.tp > 1 for c in fast[: len(fast) // 2])


def test_cp_term_is_zero_at_cp1_and_prices_all_to_all():
    from trellis.engine.memory.throughput import step_collectives, step_time

    d = resolve_model("tiny-llama")  # 4 heads, 2 kv heads of 16
    s = TrainingSetup(backend="native", precision="fp32", seq_len=128, dp=2, grad_accum=2)
    cluster = default_profile("cpu")
    assert step_time(d, s, 2e5, cluster)[1]["cp_comm_s"] == 0.0
    cp2 = replace(s, dp=1, cp=2)
    a2a = [c for c in step_collectives(d, cp2, 2e5) if c.axis == "cp"]
    # per layer and micro-batch 8 all-to-alls; q, k, v and the output of b x s/cp tokens, forward and backward
    # (the figure tests/distributed/test_context_parallel.py counts on a real cp2 step)
    assert a2a and a2a[0].op == "all_to_all" and a2a[0].calls == 2 * 8 * d.layers
    assert a2a[0].bytes == 2 * d.layers * 2 * (1 * 64 * (2 * 4 + 2 * 2) * 16 * 4)
    assert step_time(d, cp2, 2e5, cluster)[1]["cp_comm_s"] > 0
    # gradients are reduced over dp x cp
    assert [c.group for c in step_collectives(d, cp2, 2e5) if c.axis == "dp"] == [2]


def test_planner_proposes_cp_for_long_sequences_and_where_nothing_else_fits():
    from trellis.engine.memory.planner import plan

    # 64k tokens of llama-2-7b LoRA on 8 x 80 GB: context parallel is enumerated (seq >= CP_MIN_SEQ) and wins
    base = TrainingSetup(backend="native", precision="bf16", seq_len=65536, micro_batch=1, gpu_mem=80e9, peft="lora")
    res = plan(resolve_model("llama-2-7b"), base, gpus=8, global_batch=8)
    assert res.feasible[0].setup.cp > 1 and "cp = " in res.feasible[0].snippet()
    assert any(c.setup.cp == 1 for c in res.feasible)  # ranked side by side
    assert all(c.setup.cp == 1 for c in plan(resolve_model("llama-2-7b"), replace(base, seq_len=2048), gpus=8,
                                             global_batch=8).feasible)
    # a 4096-token sequence that no cp=1 layout fits (tp limited to 1 rank per node): only cp layouts are proposed
    tiny = TrainingSetup(backend="native", precision="fp32", seq_len=4096, micro_batch=1, gpu_mem=30e6,
                         gpus_per_node=1)
    res = plan(resolve_model("tiny-llama"), tiny, gpus=4, global_batch=4)
    assert res.feasible and all(c.setup.cp > 1 for c in res.feasible)
    assert any("·cp" not in name for name, _ in res.rejected)  # the cp=1 layouts were tried and refused


def test_spearman_and_pick():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert spearman([1], [1]) is None

    class R:
        feasible = list(range(10))

    assert pick(R, 3) == [0, 1, 2, 8, 9]
    assert pick(R, 1) == [0, 9]


def test_calibrated_engine_overheads_enter_the_step_time():
    """The overheads `--calibrate` measures from real steps (activation elements, full checkpointing, FSDP2 calls)
    each add exactly their documented count to the predicted step."""
    from trellis.engine.memory.throughput import step_collectives, step_time

    d = resolve_model("tiny-llama")
    base = default_profile("cpu")
    s = TrainingSetup(backend="native", precision="fp32", seq_len=128, dp=4, grad_accum=2)

    def t(setup, **over):
        return step_time(d, setup, 2e5, replace(base, overhead_s={**base.overhead_s, **over}))[0]

    elements = 1 * 128 * d.hidden  # one layer's activations of one micro-batch
    assert t(s, elem_layer=1e-9) - t(s) == pytest.approx(2 * d.layers * elements * 1e-9)
    full = replace(s, activation_checkpointing="full")
    assert t(full, ckpt_layer=1e-3) - t(full) == pytest.approx(2 * d.layers * 1e-3)
    assert t(s, ckpt_layer=1e-3) == t(s)  # no checkpointing, no cost
    z3 = replace(s, zero=3)
    calls = sum(c.calls for c in step_collectives(d, z3, 2e5) if c.op in ("all_gather", "reduce_scatter"))
    assert calls == 2 * 2 * (d.layers + 1) + (d.layers + 1)  # fwd + bwd gathers per micro-batch, one scatter
    assert t(z3, fsdp_unit=1e-3) - t(z3) == pytest.approx(calls * 1e-3)
    assert t(s, fsdp_unit=1e-3) == t(s)  # ZeRO-0: no FSDP2 units
    # the optimizer step: per parameter this rank updates (ZeRO-1 and up: its 1/dp share)
    assert t(s, optimizer_param=1e-8) - t(s) == pytest.approx(2e5 * 1e-8)
    assert t(replace(s, zero=1), optimizer_param=1e-8) - t(replace(s, zero=1)) == pytest.approx(2e5 * 1e-8 / 4)
