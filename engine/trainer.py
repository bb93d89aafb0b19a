"""Trainer (`trellis train`): the Python API's Engine in a loop, with metrics, checkpoints and signals.

One code path with the API (engine/api.py): the Engine builds the model, backend, data position and
Checkpointer and runs each step (engine.batches / engine.train_step, the LR schedule, the step counter); the
Trainer adds what a CLI run needs around it (metrics, progress, the checkpoint cadence, resume, stop signals,
the non-finite guard, the final summary and evaluation).
"""

from __future__ import annotations

import math
import os
import signal
import time

import torch
import torch.distributed as dist

from trellis.errors import TrainingDiverged
from trellis.parallel.flops import ThroughputMeter, flops_for_config, peak_flops

from .api import Engine
from .backends.base import STOP_SIGNALS
from .dpo import DPO
from .distributed import DistContext
from .metrics import MetricsWriter, Progress, StepTimer, peak_memory_bytes, print_summary



class StopRequested:
    """Set by SIGTERM/SIGUSR1/SIGINT/SIGHUP and handed to the engine (engine.stop_requested); the step's one
    scalar all-reduce agrees it over all ranks (StepResult.stop_signal), and the loop stops after that step:
    the step running when the signal came, or the next one if it came after that step's reduction."""

    def __init__(self, engine):
        self.engine = engine
        self.signum: int | None = None
        self._t_first = 0.0
        self._prev = {}

    def install(self) -> None:
        for s in STOP_SIGNALS:
            self._prev[s] = signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        # A second Ctrl-C stops now; one within a second is the same Ctrl-C passed on by the spawning parent.
        if self.signum is not None and signum == signal.SIGINT and time.monotonic() - self._t_first > 1.0:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum, self._t_first = signum, time.monotonic()
            self.engine.stop_requested = signum

    def restore(self) -> None:
        for s, h in self._prev.items():
            signal.signal(s, h)


class Trainer:
    def __init__(self, cfg, ctx: DistContext):
        self.cfg = cfg
        self.ctx = ctx
        self.engine = Engine(cfg, ctx)
        e = self.engine
        self.dims, self.backend, self.checkpointer = e.dims, e.backend, e.checkpointer
        self.tokenizer, self.hf_config, self.model_dir = e.tokenizer, e.hf_config, e.model_dir
        self.model_type, self.num_params = e.model_type, e.num_params
        self.input_tokens_seen = 0  # non-padding input positions, all dp ranks
        self.dpo = DPO(e) if cfg.train.objective == "dpo" else None
        self._setup_data()
        self.meter = self._throughput_meter()

    @property
    def step(self) -> int:
        return self.engine.step

    @property
    def tokens_seen(self) -> int:
        return self.engine.tokens_seen

    def _setup_data(self) -> None:
        self.train_data, self.eval_data = self.engine.datasets()
        self.steps_per_epoch = self.engine.steps_per_epoch

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        main = self.ctx.is_main
        stop = StopRequested(self.engine)
        stop.install()
        resumed_from = None
        if self.checkpointer is not None:
            resumed = self.checkpointer.maybe_resume()
            if resumed is not None:
                resumed_from, state = resumed
                self.engine.step = self.engine.sampler.step = state.step
                self.engine.tokens_seen = state.tokens_seen
                self.input_tokens_seen = self.engine.input_tokens(0, self.step)
        writer = MetricsWriter.for_run(cfg, resume=resumed_from is not None) if main else None
        progress = Progress(cfg.logging.progress, cfg.train.steps, self.step) if main else None
        timer = StepTimer()
        t_start = time.perf_counter()
        first_loss = last_loss = None
        step_times: list[float] = []
        skipped = 0
        nonfinite_run = 0  # consecutive steps with a non-finite loss or gradient norm
        stopped_by = 0
        try:
            for batches in self.engine.batches(self.train_data):
                step_input_tokens = self.engine.input_tokens(self.step)
                self.input_tokens_seen += step_input_tokens
                dpo = self.dpo.train_step(batches) if self.dpo is not None else None
                res = dpo.step if dpo is not None else self.engine.train_step(batches)
                lr = res.lr
                dt = timer.lap()
                step_times.append(dt)
                skipped += int(res.skipped)
                first_loss = res.loss if first_loss is None else first_loss
                last_loss = res.loss
                rec = {"step": self.step, "loss": res.loss, "lr": lr, "grad_norm": res.grad_norm,
                       "loss_scale": res.loss_scale, "tokens_per_s": res.tokens / dt if dt > 0 else 0.0,
                       "step_time_s": dt, "tokens": self.tokens_seen, "input_tokens": self.input_tokens_seen,
                       "skipped": res.skipped}
                rec.update(self.meter(step_input_tokens, dt))  # mfu, tflops, hfu (parallel/flops.py)
                if dpo is not None:
                    rec.update(reward_margin=dpo.reward_margin, reward_accuracy=dpo.reward_accuracy)
                if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0 and self.eval_data is not None:
                    rec["eval_loss"] = self.evaluate()
                # loss and grad norm are reduced over the world: every rank takes the same branch
                bad = _nonfinite(res.loss) or (_nonfinite(res.grad_norm) and self.backend.loss_scaler is None)
                nonfinite_run = nonfinite_run + 1 if bad else 0
                if (self.step % cfg.logging.log_interval == 0 or self.step == cfg.train.steps or bad
                        or "eval_loss" in rec):
                    rec["peak_mem_bytes"] = self._gather_peak_memory()
                    if main:
                        writer.write(rec)
                        progress.update(rec)
                if nonfinite_run >= cfg.train.max_nonfinite_steps:
                    raise TrainingDiverged(
                        f"step {self.step}: the loss or gradient norm was inf/nan for {nonfinite_run} consecutive "
                        f"steps (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); stopped without "
                        "saving. Resume from the last checkpoint with a lower train.lr, or check the data")
                if self.checkpointer is not None and not bad:  # never a checkpoint of a non-finite step
                    self.checkpointer.after_step(self.step, self.tokens_seen)
                stopped_by = res.stop_signal
                if stopped_by:
                    break
        finally:
            if progress:
                progress.close()
            if writer:
                writer.close()
        # The last step is always saved; a stop signal saves only with checkpoint.save_on_signal (else the run
        # stops at the step boundary and a resume starts from the last interval checkpoint).
        finished = self.step >= cfg.train.steps
        if self.checkpointer is not None and nonfinite_run == 0 and (
                finished or (stopped_by and cfg.checkpoint.save_on_signal)):
            self.checkpointer.save(self.step, self.tokens_seen)
        stop.restore()  # after the final save: a signal during it must not kill the rank mid-save
        wall = time.perf_counter() - t_start
        summary = {
            "model": f"{self.model_type} ({self.num_params / 1e6:.2f}M params)",
            "layout": f"dp={self.dims.dp} pp={self.dims.pp} tp={self.dims.tp} zero={cfg.zero.stage} "
                      f"backend={self.backend.name}",
            "precision": cfg.precision.dtype,
            "steps": self.step,
            "tokens": self.tokens_seen,
            "input_tokens": self.input_tokens_seen,
            "data": self._data_line(),
            "steps_per_epoch": self.steps_per_epoch,
            "truncated_records": getattr(self.train_data.stats, "truncated", 0),
            "dropped_records": getattr(self.train_data.stats, "dropped", 0),
            "first_loss": first_loss,
            "final_loss": last_loss,
            "wall_s": wall,
            "tokens_per_s": self.tokens_seen / wall if wall > 0 else 0.0,
            "mean_step_s": sum(step_times[1:]) / max(len(step_times) - 1, 1) if step_times else None,
            **self._run_throughput(step_times),
            "skipped_steps": skipped,
            "loss_scale": self.backend.loss_scaler.scale if self.backend.loss_scaler is not None else None,
            "metrics_file": cfg.logging.metrics_file or None,
            "checkpoint": str(self.checkpointer.last_saved) if self.checkpointer and self.checkpointer.last_saved else None,
            "stopped_by_signal": stopped_by or None,
            "resumed_from": str(resumed_from) if resumed_from else None,
        }
        if self.eval_data is not None and cfg.train.eval_batches:
            summary["eval_loss"] = self.evaluate()
        table = self._gather_memory_table()
        if main and cfg.logging.progress != "none":
            print_summary(summary, table)
        return summary

    # ---- MFU / TFLOP/s (parallel/flops.py) ---------------------------------------------------------
    def _throughput_meter(self) -> ThroughputMeter:
        from trellis.parallel.models.dims import dims_from_hf_config

        per_token = flops_for_config(self.cfg, dims_from_hf_config(self.hf_config))
        # only the main rank reports; a CPU's peak is calibrated once per machine (≤ 1 s) and cached
        peak = peak_flops(self.ctx.device, self.cfg.precision.dtype) if self.ctx.is_main else None
        if self.ctx.device.type == "cpu":  # the other ranks wait: no step of theirs runs during a calibration
            dist.barrier()
        return ThroughputMeter(per_token, self.ctx.world_size, peak)

    def _run_throughput(self, step_times: list[float]) -> dict:
        """The run's mfu/tflops over the steps after the first (its compile / warm-up), like mean_step_s."""
        if len(step_times) < 2:
            return {"tflops": None, "mfu": None}
        steps = len(step_times) - 1
        tokens = self.engine.input_tokens(self.step - steps, steps)
        m = self.meter(tokens, sum(step_times[1:]))
        return {"tflops": m["tflops"], "mfu": m["mfu"]}

    def evaluate(self) -> float:
        batches = self.engine.eval_batches()
        return self.dpo.eval_loss(batches) if self.dpo is not None else self.engine.eval_loss(batches)

    def _data_line(self) -> str:
        st = self.train_data.stats
        line = (f"{len(self.train_data)} rows ({self.train_data.packing} packing), {self.steps_per_epoch} "
                f"steps/epoch")
        if st is not None and (st.truncated or st.dropped):
            line += f", {st.truncated} records truncated, {st.dropped} dropped (data.truncation)"
        return line

    def _gather_peak_memory(self) -> list[int]:
        t = torch.tensor([peak_memory_bytes(self.ctx.device)], dtype=torch.int64)
        out = [torch.zeros_like(t) for _ in range(self.ctx.world_size)]
        dist.all_gather(out, t)
        return [int(x.item()) for x in out]

    def _gather_memory_table(self) -> list[dict]:
        rep = self.backend.memory_report()
        row = {"rank": self.ctx.rank, "params": rep["params"], "base": rep.get("base_params", 0),
               "adapter": rep.get("adapter_params", 0), "trainable": rep["trainable_params"],
               "grads": rep.get("grads", 0), "optimizer": rep["optimizer_states"], "master": rep["master_weights"],
               "peak": peak_memory_bytes(self.ctx.device)}
        rows: list = [None] * self.ctx.world_size
        dist.all_gather_object(rows, row)
        return rows


def train_this_rank(cfg, ctx: DistContext) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Trainer(cfg, ctx).train()


def _nonfinite(x) -> bool:
    return x is not None and not math.isfinite(x)
