"""Zero-bubble pipeline schedules: the combinations trellis refuses (one line naming the key, exit 2) and the
bench's bubble arithmetic (bench/pipeline_bubble.py) against the closed form for GPipe / 1F1B."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from trellis import configs
from trellis.cli import main
from trellis.configs.validate import validate
from trellis.errors import ConfigError
from trellis.parallel.dims import ParallelDims, validate_model_dims
from trellis.parallel.pipeline import stage_ids_for

ZB = ["interleaved_zb", "zbv", "dualpipev"]


@pytest.mark.parametrize("schedule", ZB)
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_bubble_with_fsdp_is_refused_with_exit_2(schedule, stage, capsys):
    rc = main(["config", "show", "tiny-llama", "--parallel.pp=2", f"--parallel.pp_schedule={schedule}",
               f"--zero.stage={stage}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert f"parallel.pp_schedule='{schedule}' with zero.stage={stage}" in err and "zero.stage=0 or 1" in err, err


@pytest.mark.parametrize("schedule", ZB)
def test_zero_bubble_with_compile_is_a_config_error(schedule):
    """One rule (configs/validate.py: compile_errors) for every zero-bubble schedule name."""
    cfg = configs.load("tiny-llama", {"parallel.pp": 2, "parallel.pp_schedule": schedule})
    validate(cfg)  # eager: fine
    object.__setattr__(cfg.train, "compile", True)
    with pytest.raises(ConfigError, match=f"train.compile=true: parallel.pp_schedule='{schedule}' \\(zero-bubble\\) "
                                          "rejects compiled stages.*train.compile=false"):
        validate(cfg)
    cfg1 = configs.load("tiny-llama", {"parallel.pp": 2, "parallel.pp_schedule": "1f1b"})
    object.__setattr__(cfg1.train, "compile", True)
    validate(cfg1)  # 1F1B runs compiled stages


def test_layer_and_micro_batch_rules_per_schedule():
    dims = ParallelDims(dp=1, pp=2, tp=1, world_size=2)
    kw = dict(num_heads=4, num_kv_heads=4, vocab_size=8, intermediate_size=8)
    for s in ZB:
        with pytest.raises(ConfigError, match=f"pp_schedule='{s}' needs >= 4 layers"):
            validate_model_dims(dims, num_layers=3, micro_batches=4, pp_schedule=s, **kw)
        validate_model_dims(dims, num_layers=4, micro_batches=4, pp_schedule=s, **kw)
    with pytest.raises(ConfigError, match="'dualpipev' needs >= 4 micro-batches"):
        validate_model_dims(dims, num_layers=4, micro_batches=3, pp_schedule="dualpipev", **kw)
    with pytest.raises(ConfigError, match="'interleaved_zb' needs .* divisible by parallel.pp=2"):
        validate_model_dims(dims, num_layers=4, micro_batches=3, pp_schedule="interleaved_zb", **kw)
    validate_model_dims(dims, num_layers=4, micro_batches=3, pp_schedule="zbv", **kw)


def test_stage_placement():
    assert [stage_ids_for("zbv", r, 4) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [stage_ids_for("interleaved_zb", r, 2) for r in range(2)] == [[0, 2], [1, 3]]
    assert stage_ids_for("1f1b", 1, 2) == [1]


def _bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "pipeline_bubble.py"
    spec = importlib.util.spec_from_file_location("pipeline_bubble", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("pp,m", [(2, 2), (2, 8), (4, 4), (4, 16)])
def test_bench_simulation_matches_the_1f1b_closed_form(pp, m):
    b = _bench()
    for s in ("gpipe", "1f1b"):
        orders = {r: b.single_stage_order(s, r, pp, m) for r in range(pp)}
        got = b.simulate(orders, pp)["per_rank"]
        assert all(abs(x - (pp - 1) / (m + pp - 1)) < 1e-12 for x in got), (s, got)


def test_bench_simulation_of_torchs_own_action_lists():
    """torch's schedules build their per-rank action lists without a process group (stages stubbed): under unit
    costs interleaved 1F1B gives (p - 1) / (v·m + p - 1) with v = 2, and the zero-bubble ones less."""
    from types import SimpleNamespace

    from torch.distributed import pipelining as pl

    b = _bench()
    got = {}
    for name, cls in [("interleaved_1f1b", pl.ScheduleInterleaved1F1B), ("interleaved_zb", pl.ScheduleInterleavedZeroBubble),
                      ("zbv", pl.ScheduleZBVZeroBubble), ("dualpipev", pl.ScheduleDualPipeV)]:
        stages = [SimpleNamespace(group_size=2, group_rank=0, num_stages=4, submod=None, stage_index=i) for i in (0, 1)]
        sched = cls(stages, n_microbatches=8, loss_fn=lambda out, target: out, scale_grads=False)
        got[name] = b.simulate(b.torch_order(sched.pipeline_order), 4)["per_rank"]
    assert all(abs(x - 1 / 17) < 1e-12 for x in got["interleaved_1f1b"]), got
    for name in ("interleaved_zb", "zbv", "dualpipev"):
        assert max(got[name]) < 1 / 17, (name, got[name])
