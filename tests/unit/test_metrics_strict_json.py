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


def test_the_summary_memory_table_fits_120_columns_in_human_units():
    """8 ranks of a 70B-sized layout (the widest cells) with every column set: no line over 120 columns, bytes
    printed with units, the all-zero columns left out, every rank and column still present."""
    import io

    from trellis.engine.metrics import print_summary

    cols = ("params", "base", "adapter", "trainable", "grads", "optimizer", "master", "peak")
    rows = [{"rank": r, **{c: (1023 + r) * 1024 ** 3 + 7 for c in cols}, "adapter": 0} for r in range(16)]
    buf = io.StringIO()
    print_summary({"model": "llama (68976.65M params)", "steps": 3}, rows, file=buf)
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    assert not any("adapter" in line for line in lines)  # 0 on every rank
    for c in set(cols) - {"adapter"}:
        assert any(f" {c}" in line for line in lines), c
    for r in range(16):
        assert any(line.strip().startswith(f"rank {r} ") for line in lines)
    assert "1023.0 GiB" in buf.getvalue() and "1.0 TiB" in buf.getvalue()
