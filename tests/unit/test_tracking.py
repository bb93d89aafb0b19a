"""Experiment tracking with the real packages: one MetricsWriter (as `logging.*` configures it) writes the same
records to TensorBoard, Weights & Biases (offline mode: no network) and MLflow (a local sqlite store); each is read
back from what the package itself wrote (TensorBoard's event file, W&B's offline `.wandb` transaction log, MLflow's
store) and carries the same scalars per step; the run config is logged once."""

from __future__ import annotations

import json
import struct

import pytest

from trellis import configs
from trellis.engine.metrics import MetricsWriter, scalar_fields
from trellis.errors import ConfigError

RECORDS = [{"step": s, "loss": 3.0 - 0.5 * s, "lr": 1e-3 * s, "grad_norm": 0.25 * s, "loss_scale": None,
            "tokens_per_s": 100.0 + s, "step_time_s": 0.5, "tokens": 128 * s, "skipped": s == 2,
            "peak_mem_bytes": [1000 + s, 2000 + s]} for s in (1, 2, 3)]


def _wandb_records(run_file):
    """W&B's offline run file: a LevelDB-style log (7-byte file header ':W&B' 0xBEE1 v0; 32 KiB blocks of records
    with a 7-byte header crc32/length/type, type 1 = full, 2/3/4 = first/middle/last), each a wandb Record proto."""
    from wandb.proto import wandb_internal_pb2 as pb

    b = run_file.read_bytes()
    assert b[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(b):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is zero padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", b[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        buf += b[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_tensorboard_wandb_offline_and_mlflow_sqlite_get_the_same_scalars_and_the_config(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = configs.load("tiny-llama", {"logging.metrics_file": str(tmp_path / "m.jsonl"),
                                      "logging.tensorboard_dir": str(tmp_path / "tb"),
                                      "logging.wandb_project": "trellis-test", "logging.mlflow_tracking_uri": uri,
                                      "logging.run_name": "tiny", "train.lr": 1e-3})
    w = MetricsWriter.for_run(cfg)
    for r in RECORDS:
        w.write(r)
    w.close()
    want = {r["step"]: scalar_fields(r) for r in RECORDS}
    assert set(want[1]) == {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "tokens", "skipped"}

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tb = {s: {k: e.value for k in acc.Tags()["scalars"] for e in acc.Scalars(k) if e.step == s} for s in want}

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    recs = _wandb_records(run_file)
    wb = {int(r.history.step.num): {k: float(json.loads(i.value_json)) for i in r.history.item
                                    if not (k := i.key or "/".join(i.nested_key)).startswith("_")}
          for r in recs if r.HasField("history")}
    (run,) = [r.run for r in recs if r.HasField("run")]
    assert run.project == "trellis-test" and run.display_name == "tiny"
    wb_config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert wb_config["train"]["lr"] == 1e-3 and wb_config["model"]["path"] == "tiny-llama"

    client = MlflowClient(tracking_uri=uri)
    (ml_run,) = client.search_runs([client.get_experiment_by_name("trellis").experiment_id])
    assert ml_run.info.run_name == "tiny" and ml_run.info.status == "FINISHED"
    assert ml_run.data.params["train.lr"] == "0.001" and ml_run.data.params["model.path"] == "tiny-llama"
    assert len(ml_run.data.params) == len(configs.all_keys())  # the whole resolved config, once
    ml = {s: {} for s in want}
    for k in ml_run.data.metrics:
        for m in client.get_metric_history(ml_run.info.run_id, k):
            ml[m.step][k] = m.value

    for name, got in (("tensorboard", tb), ("wandb", wb), ("mlflow", ml)):
        for s in want:
            assert set(got[s]) == set(want[s]), (name, s, got[s])
            for k, v in want[s].items():
                assert got[s][k] == pytest.approx(v, rel=1e-6), (name, s, k)  # TensorBoard stores float32


def test_a_missing_tracking_package_is_one_line_naming_the_extra(monkeypatch):
    """The check runs at config load (before any rank starts). A real missing module stands in for wandb."""
    from trellis.configs import validate

    monkeypatch.setitem(validate.TRACKERS, "wandb_project", ("trellis_no_such_tracker_pkg", "wandb"))
    with pytest.raises(ConfigError) as e:
        configs.load("tiny-llama", {"logging.wandb_project": "p"})
    msg = str(e.value)
    assert "logging.wandb_project needs the trellis_no_such_tracker_pkg package: pip install 'trellis-train[wandb]'" \
        in msg and "\n" not in msg
