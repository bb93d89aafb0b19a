"""Real reduced-precision paths on a CUDA GPU (1 rank, NCCL): what a CPU-only machine can only fake.

Skipped where no GPU exists (CI here). Run on a GPU machine with `pytest -m gpu tests/gpu`.
- DeepSpeed fp16 (ZeRO 1/2/3): DeepSpeed's own fp16 optimizer and dynamic loss scaler, with its real fp16
  support check (not forced as in tests/distributed/test_deepspeed.py).
- Native fp16/bf16: our loss scaler and FSDP2 mixed precision with CUDA autocast.
- QLoRA on bitsandbytes' CUDA 4-bit kernels.
Each run is compared with the fp32 run of the same model and data.
"""

from __future__ import annotations

import math

import pytest
import torch

from ..distributed.harness import run_ranks
from ..distributed.peft_support import peft_scenarios
from ..distributed.test_deepspeed import ds_scenarios
from ..distributed.workers import train_scenarios

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BASE = {"train.micro_batch_size": 4, "train.grad_accum": 2, "train.lr": 3e-3, "train.schedule": "constant",
        "train.warmup_steps": 0, "train.weight_decay": 0.0, "train.grad_clip": 1.0, "data.seq_len": 128,
        "logging.progress": "none", "parallel.dp": 1}
SCALER = {"precision.dtype": "fp16", "precision.initial_scale_power": 8, "precision.hysteresis": 1,
          "precision.loss_scale_window": 2, "train.steps": 5}
TRAIN = 30


def _inf_at_step2(trainer, rank):
    """Poison one gradient during the 2nd optimizer step's micro-batches."""
    ga = trainer.cfg.train.grad_accum
    # a matrix; under DeepSpeed ZeRO-3 the live tensor is an empty placeholder and ds_shape the real shape
    _, p = next((n, p) for n, p in trainer.backend.trainable_named_parameters()
                if len(getattr(p, "ds_shape", p.shape)) == 2)
    calls = {"n": 0}

    def hook(g):
        calls["n"] += 1
        return torch.full_like(g, math.inf) if (calls["n"] - 1) // ga == 1 else g

    p.register_hook(hook)


def _decreases(losses, by=0.3):
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    return last < first - by, first, last


@pytest.fixture(scope="module")
def native_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-native")
    sc = [{"overrides": {**BASE, **SCALER, "logging.metrics_file": str(tmp / "scaler.jsonl")}, "hook": _inf_at_step2}]
    for d in ("fp32", "bf16", "fp16"):
        sc.append({"overrides": {**BASE, "precision.dtype": d, "train.steps": TRAIN,
                                 "logging.metrics_file": str(tmp / f"{d}.jsonl")}})
    [r0] = run_ranks(1, train_scenarios, sc, timeout=900)
    return dict(zip(["scaler", "fp32", "bf16", "fp16"], r0))


def test_native_fp16_scaler_on_gpu(native_runs):
    recs = native_runs["scaler"]["records"]
    skipped, scales = [r["skipped"] for r in recs], [r["loss_scale"] for r in recs]
    print("native fp16 on GPU: skipped", skipped, "scales", scales)
    assert skipped == [False, True, False, False, False]
    assert scales == [256.0, 128.0, 128.0, 256.0, 256.0]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_native_amp_on_gpu_tracks_fp32(native_runs, dtype):
    ref = [r["loss"] for r in native_runs["fp32"]["records"]]
    got = [r["loss"] for r in native_runs[dtype]["records"] if not r["skipped"]]
    ok, first, last = _decreases(got)
    d5 = max(abs(a - b) for a, b in zip(got[:5], ref[:5]))
    print(f"native {dtype} on GPU: loss {first:.3f} -> {last:.3f}; fp32 {ref[0]:.3f} -> {ref[-1]:.3f}; "
          f"max |Δloss| vs fp32 over 5 steps {d5:.2e}; final {abs(got[-1] - ref[-1]):.2e}")
    assert ok
    assert set(native_runs[dtype]["param_dtypes"].values()) == {"torch.float32"}
    # 16-bit matmuls round each product to 2^-8 (bf16) / 2^-11 (fp16) relative; over a 4-layer model the
    # mean loss moves by far less than 5e-2 in the first steps, before trajectories diverge.
    assert d5 <= 5e-2


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-ds")
    sc = []
    names = []
    for z in (1, 2, 3):
        names.append(f"z{z}-scaler")
        sc.append({"overrides": {**BASE, **SCALER, "zero.backend": "deepspeed", "zero.stage": z,
                                 "logging.metrics_file": str(tmp / f"z{z}-scaler.jsonl")}, "inf_step2": True})
    for d in ("fp32", "fp16", "bf16"):
        names.append(f"z2-{d}")
        sc.append({"overrides": {**BASE, "zero.backend": "deepspeed", "zero.stage": 2, "precision.dtype": d,
                                 "train.steps": TRAIN, "logging.metrics_file": str(tmp / f"z2-{d}.jsonl")}})
    [r0] = run_ranks(1, _ds_scenarios_hooked, sc, timeout=900)
    return dict(zip(names, r0))


def _ds_scenarios_hooked(rank, world, scenarios):
    from trellis.engine import trainer as trainer_mod

    orig_init = trainer_mod.Trainer.__init__
    flags = iter([bool(sc.get("inf_step2")) for sc in scenarios])

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        if next(flags):
            _inf_at_step2(self, rank)
    trainer_mod.Trainer.__init__ = init
    return ds_scenarios(rank, world, scenarios)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_fp16_loss_scaler_real_gpu(ds_runs, stage):
    """DeepSpeed's real fp16 optimizer (support check not forced): overflow skips the step and halves the
    scale (hysteresis 1); the scale doubles after `loss_scale_window` clean steps, not counting the first."""
    recs = ds_runs[f"z{stage}-scaler"]["records"]
    skipped, scales = [r["skipped"] for r in recs], [r["loss_scale"] for r in recs]
    print(f"DeepSpeed ZeRO-{stage} fp16 on GPU: skipped {skipped} scales {scales}")
    assert skipped == [False, True, False, False, False]
    assert scales == [256.0, 128.0, 128.0, 128.0, 256.0]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_deepspeed_amp_on_gpu_tracks_fp32(ds_runs, dtype):
    ref = [r["loss"] for r in ds_runs["z2-fp32"]["records"]]
    got = [r["loss"] for r in ds_runs[f"z2-{dtype}"]["records"] if not r["skipped"]]
    ok, first, last = _decreases(got)
    d5 = max(abs(a - b) for a, b in zip(got[:5], ref[:5]))
    mem = ds_runs[f"z2-{dtype}"]["memory"]
    print(f"DeepSpeed ZeRO-2 {dtype} on GPU: loss {first:.3f} -> {last:.3f}; max |Δloss| vs fp32 over 5 steps "
          f"{d5:.2e}; optimizer {mem['optimizer_states']} B, master {mem['master_weights']} B")
    assert ok and d5 <= 5e-2
    assert mem["master_weights"] > 0  # DeepSpeed keeps fp32 master weights for 16-bit training


def test_qlora_on_cuda_kernels(tmp_path):
    """QLoRA with bitsandbytes' CUDA NF4 kernels (double quant, bf16 compute) trains, and only adapters are
    in the optimizer."""
    ov = {**BASE, "peft.method": "qlora", "precision.dtype": "bf16", "train.steps": 20, "train.lr": 1e-2,
          "logging.metrics_file": str(tmp_path / "q.jsonl")}
    [r0] = run_ranks(1, peft_scenarios, [{"overrides": ov}], timeout=600)
    out = r0[0]
    losses = [r["loss"] for r in out["records"]]
    ok, first, last = _decreases(losses, by=0.05)
    print(f"QLoRA on CUDA: loss {first:.3f} -> {last:.3f}; memory {out['memory']}")
    assert ok
    assert out["frozen_with_grad"] == [] and out["non_adapter_in_opt"] == 0


def test_int8_base_on_cuda_kernels(tmp_path):
    """LoRA on an 8-bit base (peft.quantize_base='int8') with bitsandbytes' CUDA LLM.int8 matmul: trains, stores
    int8 weights + fp32 row scales, only adapters in the optimizer. On CUDA bitsandbytes quantizes the
    activations too (MatMul8bitLt, int8 x int8 with fp16 outliers above the threshold), unlike the CPU path's
    dequantize + fp matmul: a layer's output differs from x @ dequantized(W).T by int8 activation rounding."""
    from trellis.parallel.quant4bit import dequantized_weight, linear_to_int8

    ov = {**BASE, "peft.method": "lora", "peft.quantize_base": "int8", "precision.dtype": "bf16",
          "train.steps": 20, "train.lr": 1e-2, "logging.metrics_file": str(tmp_path / "i8.jsonl")}
    [r0] = run_ranks(1, peft_scenarios, [{"overrides": ov}], timeout=600)
    out = r0[0]
    losses = [r["loss"] for r in out["records"]]
    ok, first, last = _decreases(losses, by=0.05)
    print(f"int8 base on CUDA: loss {first:.3f} -> {last:.3f}; int8 base {out['int8_base']}")
    assert ok
    assert out["frozen_with_grad"] == [] and out["non_adapter_in_opt"] == 0
    assert out["int8_base"]["whole"] and out["int8_base"]["dtypes"] == ["scale torch.float32", "torch.int8"]

    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda") * 0.02
    lin = linear_to_int8(w, None).train()
    x = torch.randn(8, 512, device="cuda", dtype=torch.float16, requires_grad=True)
    y = lin(x)
    y.float().sum().backward()  # the int8 backward runs (grad wrt the input through the int8 weight)
    ref = x.detach().float() @ dequantized_weight(lin).t()
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    print(f"CUDA int8 matmul vs dequantized fp matmul: relative difference {rel:.2e}")
    assert lin.state.CB.device.type == "cuda" and lin.state.CB.dtype == torch.int8
    assert 0 < rel < 2e-2 and x.grad is not None and torch.isfinite(x.grad).all()
