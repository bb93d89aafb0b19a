"""Rank-0 progress display, JSONL metrics (one object per optimizer step), optional TensorBoard / Weights & Biases /
MLflow (the same scalars in each: every numeric field of a record but the step, which is their x axis), summary."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from trellis.errors import ConfigError


def peak_memory_bytes(device: torch.device) -> int:
    """Accelerator peak allocated bytes, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def strict_json_line(record: dict) -> str:
    """`record` as strict JSON (RFC 8259 has no NaN/Infinity): a non-finite float becomes null and its key is
    listed under "nonfinite", e.g. {"loss": null, "nonfinite": ["loss"]}; lists of floats likewise."""
    bad: list[str] = []

    def clean(key: str, v):
        if isinstance(v, float) and not math.isfinite(v):
            bad.append(key)
            return None
        if isinstance(v, (list, tuple)):
            return [clean(f"{key}[{i}]", x) for i, x in enumerate(v)]
        if isinstance(v, dict):
            return {k: clean(f"{key}.{k}", x) for k, x in v.items()}
        return v

    out = {k: clean(k, v) for k, v in record.items()}
    if bad:
        out["nonfinite"] = bad
    return json.dumps(out, allow_nan=False)


class MetricsWriter:
    """Appends one JSON object per step; flushes each line so a killed run keeps what it logged."""

    def __init__(self, path: str, tensorboard_dir: str = "", resume: bool = False, *, wandb_project: str = "",
                 mlflow_tracking_uri: str = "", mlflow_experiment: str = "trellis", run_name: str = "",
                 run_config: dict | None = None):
        self.path = Path(path) if path else None
        self._f = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a" if resume else "w", buffering=1)
        self._tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("warning: logging.tensorboard_dir is set but tensorboard is not installed "
                      "(pip install 'trellis-train[tensorboard]'); skipping TensorBoard", file=sys.stderr)
            else:
                self._tb = SummaryWriter(tensorboard_dir)
        self._trackers: list = []
        if wandb_project:
            self._trackers.append(WandbTracker(wandb_project, run_name, run_config or {}))
        if mlflow_tracking_uri:
            self._trackers.append(MlflowTracker(mlflow_tracking_uri, mlflow_experiment, run_name, run_config or {}))

    @classmethod
    def for_run(cls, cfg, resume: bool = False) -> "MetricsWriter":
        """The writer `cfg.logging` asks for, with the resolved run config logged once to each tracker."""
        from trellis.configs import to_dict

        lg = cfg.logging
        return cls(lg.metrics_file, lg.tensorboard_dir, resume=resume, wandb_project=lg.wandb_project,
                   mlflow_tracking_uri=lg.mlflow_tracking_uri, mlflow_experiment=lg.mlflow_experiment,
                   run_name=lg.run_name, run_config=to_dict(cfg))

    def write(self, record: dict) -> None:
        if self._f:
            self._f.write(strict_json_line(record) + "\n")
        scalars = scalar_fields(record)
        if self._tb:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, record["step"])
        for t in self._trackers:
            t.log(scalars, record["step"])

    def close(self) -> None:
        if self._f:
            self._f.close()
        if self._tb:
            self._tb.close()
        for t in self._trackers:
            t.close()
        self._trackers = []


def scalar_fields(record: dict) -> dict[str, float]:
    """What TensorBoard, W&B and MLflow get from a record: its numbers (bools as 0/1; not lists, not the step)."""
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": "0.001"} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def _require(module: str, key: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"logging.{key} needs the {module} package: pip install 'trellis-train[{module}]' "
                          f"(or unset logging.{key})") from None


class WandbTracker:
    """One W&B run (rank 0). WANDB_MODE=offline writes it under WANDB_DIR for a later `wandb sync`."""

    def __init__(self, project: str, name: str, run_config: dict):
        wandb = _require("wandb", "wandb_project")
        self.run = wandb.init(project=project, name=name or None, config=run_config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """One MLflow run through the client API (no process-global active run): params = the flattened run config,
    metrics = the scalars per step. Any tracking URI MLflow takes (http(s)://, sqlite:///, databricks, ...)."""

    def __init__(self, uri: str, experiment: str, name: str, run_config: dict):
        _require("mlflow", "mlflow_tracking_uri")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=name or None).info.run_id
        params = [Param(k, v[:6000]) for k, v in _flat(run_config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Progress:
    """A live bar on a terminal (rich), plain lines otherwise (logs, CI), or nothing."""

    def __init__(self, mode: str, total: int, start: int = 0):
        self.total = total
        if mode == "auto":
            mode = "rich" if sys.stderr.isatty() else "plain"
        self.mode = mode
        self._bar = None
        if mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, rec: dict) -> None:
        scale = f" scale {rec['loss_scale']:.0f}" if rec.get("loss_scale") is not None else ""
        info = (f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s "
                f"{rec['step_time_s']:.2f} s/step{scale}{_throughput_text(rec)}" + (" SKIPPED(overflow)" if rec.get("skipped") else "")
                + (f" eval_loss {rec['eval_loss']:.4f}" if rec.get("eval_loss") is not None else ""))
        if self.mode == "rich":
            self._bar.update(self._task, completed=rec["step"], info=info)
        elif self.mode == "plain":
            print(f"step {rec['step']}/{self.total} {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _throughput_text(rec: dict) -> str:
    """" 12.3 TFLOP/s MFU 41.0%" (MFU only where the device's peak is known; parallel/flops.py)."""
    if rec.get("tflops") is None:
        return ""
    return f" {rec['tflops']:.3g} TFLOP/s" + (f" MFU {rec['mfu']:.1%}" if rec.get("mfu") is not None else "")


SUMMARY_WIDTH = 120  # the end-of-run summary fits a 120-column terminal


def print_summary(summary: dict, memory_table: list[dict] | None = None, file=sys.stderr) -> None:
    """One screen at the end of a run."""
    lines = ["", "─" * 72, "trellis run summary", "─" * 72]
    for k in ("model", "layout", "precision", "data", "steps", "tokens", "first_loss", "final_loss", "wall_s",
              "tokens_per_s", "mean_step_s", "tflops", "mfu", "skipped_steps", "loss_scale", "eval_loss", "metrics_file", "checkpoint",
              "resumed_from", "stopped_by_signal"):
        if k in summary and summary[k] is not None:
            v = summary[k]
            if k == "mfu":
                v = f"{v:.1%}"
            elif k == "tflops":
                v = f"{v:.3g} TFLOP/s per device"
            elif isinstance(v, float):
                v = f"{v:.4f}" if "loss" in k else f"{v:.2f}"
            lines.append(f"  {k:<14} {v}")
    if memory_table:
        lines.append("")
        lines += memory_table_lines(memory_table)
    lines.append("─" * 72)
    print("\n".join(lines), file=file, flush=True)


def memory_table_lines(rows: list[dict], width: int = SUMMARY_WIDTH) -> list[str]:
    """The per-rank memory table in human units, every line <= `width` columns: each column as wide as its
    widest cell, the PEFT split (base, adapter) left out when it is 0 on every rank, and the columns
    continued in a second block (rank column repeated) if they still do not fit."""
    cols = [c for c in rows[0] if c != "rank" and (c not in ("base", "adapter") or any(r.get(c) for r in rows))]

    def cell(v) -> str:
        return fmt_bytes(v) if isinstance(v, (int, float)) else str(v)

    label = [f"rank {r['rank']}" for r in rows]
    lw = max(len("memory"), *(len(x) for x in label))
    cw = {c: max(len(c), *(len(cell(r.get(c, 0))) for r in rows)) for c in cols}
    blocks: list[list[str]] = [[]]
    for c in cols:  # greedy: as many columns per block as fit
        used = 2 + lw + sum(2 + cw[k] for k in blocks[-1])
        if blocks[-1] and used + 2 + cw[c] > width:
            blocks.append([])
        blocks[-1].append(c)
    out: list[str] = []
    for block in blocks:
        out.append("  " + "memory".ljust(lw) + "".join("  " + c.rjust(cw[c]) for c in block))
        for name, r in zip(label, rows):
            out.append("  " + name.ljust(lw) + "".join("  " + cell(r.get(c, 0)).rjust(cw[c]) for c in block))
    return out


class StepTimer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt
