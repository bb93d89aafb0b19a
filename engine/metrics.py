"""Rank-0 progress display, JSONL metrics (one object per optimizer step), optional TensorBoard, summary."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch


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

    def __init__(self, path: str, tensorboard_dir: str = "", resume: bool = False):
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

    def write(self, record: dict) -> None:
        if self._f:
            self._f.write(strict_json_line(record) + "\n")
        if self._tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._f:
            self._f.close()
        if self._tb:
            self._tb.close()


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
        cols = [c for c in memory_table[0] if c != "rank"]
        lines.append("")
        lines.append("  per-rank memory " + "  ".join(f"{c:>14}" for c in cols))
        for row in memory_table:
            lines.append(f"  rank {row['rank']:<10} " + "  ".join(
                f"{fmt_bytes(row[c]) if isinstance(row[c], (int, float)) else str(row[c]):>14}" for c in cols))
    lines.append("─" * 72)
    print("\n".join(lines), file=file, flush=True)


class StepTimer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt
