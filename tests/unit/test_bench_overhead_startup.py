"""The arithmetic of bench/deepspeed_overhead.py and bench/startup.py (not their timings: benches are not tests),
and parallel/comm_count.py's counting on a real 1-process gloo group."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["deepspeed_overhead", "startup"])
def test_summary_is_min_median_max_of_the_pairs(name):
    s = _bench(name).summarize([1.10, 0.98, 1.30, 1.02, 1.05, 1.00, 1.20])
    assert (s["min"], s["median"], s["max"]) == (0.98, 1.05, 1.30)
    assert s["ratios"] == [1.10, 0.98, 1.30, 1.02, 1.05, 1.00, 1.20]


def test_collectives_per_step_skip_the_warmup_and_the_tail():
    # snapshots at the start of steps 0..4 and one after the loop; warm-up 2: steps 2 and 3 are measured
    snaps = [{}, {"all_reduce": 5}, {"all_reduce": 9}, {"all_reduce": 12, "broadcast": 1},
             {"all_reduce": 16, "broadcast": 1}, {"all_reduce": 30, "broadcast": 4}]
    assert _bench("deepspeed_overhead").per_step(snaps, warmup=2) == {"all_reduce": 3.5, "broadcast": 0.5}


def test_collective_counter_counts_calls_and_bytes_and_restores(tmp_path):
    import torch
    import torch.distributed as dist

    from trellis.parallel.comm_count import count_collectives

    original = dist.all_reduce
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with count_collectives() as cc:
            dist.all_reduce(torch.zeros(3, dtype=torch.float64))
            torch.distributed.distributed_c10d.all_reduce(torch.zeros(2))  # the other namespace, same counter
            dist.broadcast(torch.zeros(4, dtype=torch.int64), src=0)
            cc.active = False
            dist.all_reduce(torch.zeros(1))  # paused: not counted
        assert cc.snapshot() == {"all_reduce": 2, "broadcast": 1}
        assert cc.bytes("single-rank", "all_reduce") == 3 * 8 + 2 * 4 and cc.bytes("single-rank", "broadcast") == 4 * 8
        assert dist.all_reduce is original
    finally:
        dist.destroy_process_group()
