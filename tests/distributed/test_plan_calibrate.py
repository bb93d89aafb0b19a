"""`trellis plan --calibrate` and `--validate` through the real CLI on 2 gloo ranks, and the throughput model's
per-layout collective counts against the package's counter on real engine steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trellis.engine.memory.cluster import OPS, load_profile

from .harness import run_ranks

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]


def _trellis(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trellis", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_calibrate_then_validate_on_two_ranks(tmp_path):
    out = tmp_path / "cluster.json"
    r = _trellis("plan", "--calibrate", "--nproc", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    raw = json.loads(out.read_text())
    assert raw["version"] == 1 and raw["ranks_per_node"] == 2 and raw["device"] == "cpu"
    assert set(raw["collectives"]) == set(OPS)
    for op, fits in raw["collectives"].items():
        assert list(fits) == ["2"], op
        ab = fits["2"]
        assert 0 <= ab["alpha_s"] < 0.1 and 0 <= ab["beta_s_per_byte"] < 1e-6 and ab["alpha_s"] + ab["beta_s_per_byte"] > 0
    assert all(0 < v < 1e13 for v in raw["matmul_flops"].values())
    assert raw["overhead_s"]["layer"] > 0 and raw["overhead_s"]["tp_layer"] >= raw["overhead_s"]["layer"]
    load_profile(out)  # what it wrote, it reads

    r = _trellis("plan", "--model", "tiny-llama", "--gpus", "2", "--gpu-mem", "8GB", "--seq-len", "128",
                 "--global-batch", "8", "--precision", "fp32", "--cluster", str(out), "--validate", "--top", "1",
                 "--validate-steps", "2", "--json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res["layouts"]) == 2 and set(res["layouts"][0]) == {"name", "predicted_step_s", "measured_step_s"}
    assert all(x["measured_step_s"] > 0 and x["predicted_step_s"] > 0 for x in res["layouts"])
    # the top layout (dp2) and the bottom one (tp2, full recompute) are an order of magnitude apart here
    assert res["spearman"] == pytest.approx(1.0)


LAYOUTS = [dict(dp=2, tp=1, pp=1, zero=0), dict(dp=2, tp=1, pp=1, zero=1), dict(dp=2, tp=1, pp=1, zero=3),
           dict(dp=1, tp=2, pp=1, zero=0), dict(dp=1, tp=1, pp=2, zero=0)]
_OP = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter", "isend": "send_recv",
       "irecv": "send_recv"}


def _count_worker(rank: int, world: int) -> list[dict]:
    from trellis import configs
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import Trainer
    from trellis.parallel.comm_count import count_collectives

    ctx = init_distributed(300.0)
    out = []
    for lay in LAYOUTS:
        cfg = configs.load("tiny-llama", {"parallel.dp": lay["dp"], "parallel.tp": lay["tp"], "parallel.pp": lay["pp"],
                                          "zero.stage": lay["zero"], "train.micro_batch_size": 1,
                                          "train.grad_accum": 4, "data.seq_len": 32, "train.steps": 3,
                                          "logging.progress": "none", "logging.metrics_file": "",
                                          "precision.dtype": "fp32"})
        trainer = Trainer(cfg, ctx)
        batches = trainer.engine.batches(trainer.train_data)
        trainer.engine.train_step(next(batches))
        with count_collectives(trainer.dims.mesh) as counts:
            trainer.engine.train_step(next(batches))
        totals: dict[str, list[int]] = {}
        for ops in counts.as_dict().values():
            for op, v in ops.items():
                if op == "p2p":  # batch_isend_irecv's ops, also seen as the isend/irecv it issues
                    continue
                t = totals.setdefault(_OP.get(op, op), [0, 0])
                t[0] += v["calls"]
                t[1] += v["bytes"]
        trainable = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                        for p in trainer.backend.params)
        out.append({"totals": totals, "trainable": trainable * (lay["dp"] if lay["zero"] >= 2 else 1)})
    return out


def test_modelled_collectives_match_the_counter():
    """step_collectives (calls and payload per op, last pipeline stage) = what the engine sent in a step."""
    from trellis.engine.memory.estimator import TrainingSetup
    from trellis.engine.memory.models import resolve_model
    from trellis.engine.memory.throughput import step_collectives

    d = resolve_model("tiny-llama")
    results = run_ranks(2, _count_worker, timeout=300)[-1]  # the last rank: last stage, last tp rank
    for lay, got in zip(LAYOUTS, results):
        s = TrainingSetup(backend="native", precision="fp32", seq_len=32, micro_batch=1, grad_accum=4, **lay)
        want: dict[str, list[float]] = {}
        for c in step_collectives(d, s, got["trainable"]):
            w = want.setdefault(c.op, [0, 0])
            w[0] += c.calls
            w[1] += c.bytes
        assert set(got["totals"]) == set(want), (lay, got["totals"], want)
        for op, (calls, nbytes) in want.items():
            assert got["totals"][op][0] == calls, (lay, op, got["totals"][op], want[op])
            assert got["totals"][op][1] == pytest.approx(nbytes, rel=0.02), (lay, op, got["totals"][op], want[op])
