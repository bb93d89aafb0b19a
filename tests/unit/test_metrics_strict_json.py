"""Metrics JSONL is strict JSON: a non-finite value is written as null and named under "nonfinite"."""

from __future__ import annotations

import json
import math

from trellis.engine.metrics import MetricsWriter


def _strict(line: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_nonfinite_values_become_null_with_a_flag(tmp_path):
    path = tmp_path / "m.jsonl"
    w = MetricsWriter(str(path))
    w.write({"step": 1, "loss": 2.5, "grad_norm": 1.0, "loss_scale": None})
    w.write({"step": 2, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "peak_mem_bytes": [1, 2]})
    w.write({"step": 3, "loss": -math.inf, "peak_mem_bytes": [1.0, math.nan]})
    w.close()
    recs = [_strict(line) for line in path.read_text().splitlines()]
    assert recs[0] == {"step": 1, "loss": 2.5, "grad_norm": 1.0, "loss_scale": None}
    assert recs[1] == {"step": 2, "loss": None, "grad_norm": None, "lr": 1e-3, "peak_mem_bytes": [1, 2],
                       "nonfinite": ["loss", "grad_norm"]}
    assert recs[2]["loss"] is None and recs[2]["peak_mem_bytes"] == [1.0, None]
    assert recs[2]["nonfinite"] == ["loss", "peak_mem_bytes[1]"]


def test_finite_record_is_unchanged():
    from trellis.engine.metrics import strict_json_line

    rec = {"step": 7, "loss": 0.125, "skipped": False, "tokens": 10}
    assert _strict(strict_json_line(rec)) == rec
