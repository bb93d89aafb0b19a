"""DeepSpeed backend proofs on real gloo ranks (DeepSpeed's CPU accelerator), tiny Llama, fp32.

One 2-rank launch runs the native reference, DeepSpeed ZeRO 1/2/3, and a save/resume at dp=2; a 1-rank
launch resumes that checkpoint through DeepSpeed's universal format. Offload runs need the cpu_adam /
async_io op builds (minutes the first time): they are marked integration.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from .harness import run_ranks
from .workers import poison_grad_on_rank1

BASE = {  # fp32, constant LR, no weight decay: every backend/stage must agree
    "train.steps": 5, "train.micro_batch_size": 2, "train.grad_accum": 2, "train.lr": 3e-3,
    "train.schedule": "constant", "train.warmup_steps": 0, "train.weight_decay": 0.0, "train.grad_clip": 1.0,
    "data.seq_len": 64, "logging.progress": "none",
}


def ds_scenarios(rank: int, world: int, scenarios: list[dict]) -> list[dict]:
    """Several trainings in one process group; per scenario the metric records, memory report, trainable
    parameter count and (NVMe runs) the swap-directory bytes measured while training."""
    from trellis import configs
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import Trainer

    ctx = init_distributed(300.0)
    out = []
    for sc in scenarios:
        cfg = configs.load("tiny-llama", dict(sc["overrides"]))
        trainer = Trainer(cfg, ctx)
        swap_bytes: list[dict] = []
        if sc.get("measure_swap"):
            _measure_swap_during_steps(trainer, Path(cfg.zero.nvme_path), rank, swap_bytes)
        trainer.train()
        records = []
        if rank == 0 and cfg.logging.metrics_file:
            records = [json.loads(x) for x in Path(cfg.logging.metrics_file).read_text().splitlines()]
        n_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                          for _, p in trainer.backend.trainable_named_parameters())
        out.append({"records": records, "memory": trainer.backend.memory_report(), "n_trainable": n_trainable,
                    "swap_bytes": swap_bytes})
        del trainer
    return out


def swap_dir_bytes(root: Path, rank: int) -> dict:
    """This rank's files under the NVMe swap dir (DeepSpeed writes <root>/param/zero_stage_3/<dtype>params/rankR
    and <root>/optimizer/zero_stage_3/optimizer/rankR): st_size and the bytes really allocated on disk
    (st_blocks × 512), split into param / optimizer files."""
    out = {"param": 0, "optimizer": 0, "size": 0, "on_disk": 0, "files": 0}
    for f in root.rglob("*"):
        rel = f.relative_to(root).parts
        if not f.is_file() or f"rank{rank}" not in rel:
            continue
        st = f.stat()
        out[rel[0]] += st.st_size
        out["size"] += st.st_size
        out["on_disk"] += st.st_blocks * 512
        out["files"] += 1
    return out


def _measure_swap_during_steps(trainer, root: Path, rank: int, sink: list[dict]) -> None:
    """Wrap train_step: after every step, measure this rank's files in the swap dir."""
    step = trainer.backend.train_step

    def measured(batches, lr, **kw):
        res = step(batches, lr, **kw)
        sink.append(swap_dir_bytes(root, rank))
        return res

    trainer.backend.train_step = measured


def _losses(result) -> list[float]:
    return [r["loss"] for r in result["records"]]


def _max_diff(a, b) -> float:
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


def _assert_optimizer_bytes(res, dp: int, label: str) -> None:
    """optimizer states (Adam m, v) + fp32 master == 12 bytes × trainable params / dp, + padding."""
    mem = res["memory"]
    got = mem["optimizer_states"] + mem["master_weights"]
    want = 12 * res["n_trainable"] / dp
    print(f"{label}: optimizer {mem['optimizer_states']} + master {mem['master_weights']} = {got} B, "
          f"12·N/dp = {want:.0f} B (N={res['n_trainable']}), padding {got - want:.0f} B")
    assert want <= got <= want + 12 * 2 * 64 * dp, (got, want)  # ≤ alignment padding of each partition


@pytest.fixture(scope="module")
def dp2_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")

    def ov(name, **extra):
        return {**BASE, "parallel.dp": 2, "logging.metrics_file": str(tmp / f"{name}.jsonl"), **extra}

    ck = tmp / "ck"
    scenarios = [
        {"overrides": ov("native")},
        {"overrides": ov("z1", **{"zero.backend": "deepspeed", "zero.stage": 1})},
        # the uninterrupted run of the resume check: saves step-3 (and the final step-5)
        {"overrides": ov("z2", **{"zero.backend": "deepspeed", "zero.stage": 2, "checkpoint.dir": str(ck),
                                  "checkpoint.interval": 3})},
        {"overrides": ov("z3", **{"zero.backend": "deepspeed", "zero.stage": 3})},
        {"overrides": ov("z2_resumed", **{"zero.backend": "deepspeed", "zero.stage": 2, "checkpoint.dir": str(tmp / "ck_r"),
                                          "checkpoint.resume": str(ck / "step-3")})},
    ]
    results = run_ranks(2, ds_scenarios, scenarios, timeout=900)
    names = ["native", "z1", "z2", "z3", "z2_resumed"]
    return {"rank0": dict(zip(names, results[0])), "rank1": dict(zip(names, results[1])), "ckpt": ck, "tmp": tmp}


def test_zero_1_2_3_equal_native_and_each_other(dp2_runs):
    r = dp2_runs["rank0"]
    native = _losses(r["native"])
    assert len(native) == 5 and native[-1] < native[0]
    for stage in ("z1", "z2", "z3"):
        d = _max_diff(_losses(r[stage]), native)
        print(f"deepspeed {stage} vs native: max |Δloss| = {d:.2e}")
        assert d <= 1e-5, (stage, _losses(r[stage]), native)
    for a, b in (("z1", "z2"), ("z2", "z3")):
        assert _max_diff(_losses(r[a]), _losses(r[b])) <= 1e-5
    assert all(rec["grad_norm"] > 0 and not rec["skipped"] for rec in r["z2"]["records"])


def test_optimizer_and_master_bytes_are_12_per_param_over_dp(dp2_runs):
    for rank in ("rank0", "rank1"):
        for stage in ("z1", "z2", "z3"):
            _assert_optimizer_bytes(dp2_runs[rank][stage], 2, f"{rank} {stage}")
    # ZeRO-3 also partitions the parameters themselves.
    z3, z2 = dp2_runs["rank0"]["z3"]["memory"], dp2_runs["rank0"]["z2"]["memory"]
    assert z3["params"] * 1.5 < z2["params"]


def test_save_dp2_resume_dp2_is_bitwise(dp2_runs):
    r = dp2_runs["rank0"]
    straight = _losses(r["z2"])
    resumed = _losses(r["z2_resumed"])
    assert resumed == straight[3:], (resumed, straight)  # steps 4 and 5, bitwise
    assert [rec["step"] for rec in r["z2_resumed"]["records"]] == [4, 5]
    step3 = dp2_runs["ckpt"] / "step-3"
    assert (step3 / "metadata.json").is_file() and any((step3 / "state" / "ds").glob("*optim_states.pt"))


def test_consolidated_fp32_and_universal_resume_at_dp1(dp2_runs):
    """Resume the dp=2 ZeRO-2 checkpoint on ONE rank (grad_accum doubled: same global batch, same data)."""
    tmp = dp2_runs["tmp"]
    over = {**BASE, "parallel.dp": 1, "train.grad_accum": 4, "zero.backend": "deepspeed", "zero.stage": 2,
            "checkpoint.dir": str(tmp / "ck_dp1"), "checkpoint.resume": str(dp2_runs["ckpt"] / "step-3"),
            "logging.metrics_file": str(tmp / "dp1.jsonl")}
    [res] = run_ranks(1, ds_scenarios, [{"overrides": over}], timeout=600)
    straight = _losses(dp2_runs["rank0"]["z2"])
    got = _losses(res[0])
    d = _max_diff(got, straight[3:])
    print(f"universal resume dp2 -> dp1: losses {got} vs uninterrupted {straight[3:]}, max |Δ| = {d:.2e}")
    assert d <= 1e-5
    # fp32 consolidation of the dp=2 checkpoint: every model parameter, full shape.
    import torch

    from trellis import configs
    from trellis.engine.backends.deepspeed import DeepSpeedBackend
    from trellis.engine.model import build_model

    sd = DeepSpeedBackend.consolidate_fp32(str(dp2_runs["ckpt"] / "step-3" / "state"))
    model, _ = build_model(configs.load("tiny-llama").model, seed=0, device=torch.device("cpu"))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert {n: tuple(t.shape) for n, t in sd.items() if n in shapes} == shapes
    assert all(t.dtype == torch.float32 for t in sd.values())


# DeepSpeed never swaps a tensor below 1 MiB (deepspeed/runtime/swap_tensor/utils.py MIN_AIO_BYTES, a module
# constant; aio.block_size can only raise it): not a param partition (partitioned_param_swapper.swappable_tensor),
# not an optimizer sub-group (optimizer_utils.is_swappable_tensor). tiny-llama's largest fp32 partition at dp=2
# is the whole 106,496-element weight sub-group = 416 KiB, so it keeps everything in RAM: nothing to measure.
SWAP_MIN_BYTES = 1 << 20


def swappable_llama(tmp: Path) -> Path:
    """tiny-llama widened so that DeepSpeed really swaps at dp=2 in fp32: hidden 1024, one layer (4.5 M params)."""
    from trellis import configs

    c = json.loads((Path(configs.__file__).parent / "models" / "tiny-llama" / "config.json").read_text())
    c.update(hidden_size=1024, intermediate_size=256, num_hidden_layers=1, num_attention_heads=8,
             num_key_value_heads=2, head_dim=128)
    d = tmp / "wide-llama"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(c))
    return d


def expected_swap_bytes(model_dir: Path, dp: int) -> dict:
    """Per rank, from the model's shapes and DeepSpeed's 1 MiB rule (fp32 = 4 B): param files = the partitions
    of ≥ 1 MiB; optimizer files = fp32 master + exp_avg + exp_avg_sq of each swappable sub-group (one per trellis
    param group: 2-D weights / 1-D norms) + the fp32 gradient partitions of the swapped params."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    parts = {n: 4 * math.ceil(p.numel() / dp) for n, p in model.named_parameters()}
    swapped = sum(b for b in parts.values() if b >= SWAP_MIN_BYTES)
    groups = [sum(b for n, b in parts.items() if dict(model.named_parameters())[n].ndim == k) for k in (2, 1)]
    states = sum(3 * g for g in groups if g >= SWAP_MIN_BYTES)
    return {"param": swapped, "optimizer": states + swapped}


@pytest.mark.integration
def test_cpu_and_nvme_offload_equal_no_offload(tmp_path):
    """Needs the cpu_adam and async_io ops (python -m trellis.engine.backends.ds_ops build) and libaio-dev. The NVMe
    pair runs a widened tiny-llama (see SWAP_MIN_BYTES): on tiny-llama itself DeepSpeed swaps nothing."""
    from trellis.engine.backends import ds_ops

    os.environ["TORCH_EXTENSIONS_DIR"] = str(ds_ops.use_project_extensions_dir())

    def ov(name, **extra):
        return {**BASE, "parallel.dp": 2, "zero.backend": "deepspeed", "logging.metrics_file": str(tmp_path / f"{name}.jsonl"),
                **extra}

    swap, wide = tmp_path / "swap", swappable_llama(tmp_path)
    scenarios = [
        {"overrides": ov("z2", **{"zero.stage": 2})},
        {"overrides": ov("z2_cpu", **{"zero.stage": 2, "zero.offload_optimizer": "cpu"})},
        {"overrides": ov("z3_wide", **{"zero.stage": 3, "model.path": str(wide)})},
        {"overrides": ov("z3_nvme", **{"zero.stage": 3, "model.path": str(wide), "zero.offload_optimizer": "nvme",
                                       "zero.offload_param": "nvme", "zero.nvme_path": str(swap)}), "measure_swap": True},
    ]
    r0, r1 = run_ranks(2, ds_scenarios, scenarios, timeout=1500)
    z2, z2_cpu, z3, z3_nvme = r0
    d_cpu = _max_diff(_losses(z2_cpu), _losses(z2))
    d_nvme = _max_diff(_losses(z3_nvme), _losses(z3))
    print(f"cpu offload vs none: max |Δloss| = {d_cpu:.2e}; nvme offload vs none (wide llama): {d_nvme:.2e}")
    assert d_cpu <= 1e-5 and d_nvme <= 1e-5
    want = expected_swap_bytes(wide, 2)
    for rank, res in (("rank0", z3_nvme), ("rank1", r1[3])):
        print(f"nvme swap dir, {rank}, after each step: {res['swap_bytes']}; expected {want}")
        assert len(res["swap_bytes"]) == BASE["train.steps"]
        for got in res["swap_bytes"]:
            assert got["param"] == want["param"] and got["optimizer"] == want["optimizer"], (got, want)
            assert got["on_disk"] >= got["size"] > 0  # allocated on disk, not sparse
        # what is swapped out is not in RAM: the swappable sub-group's states are empty placeholders
        assert res["memory"]["optimizer_states"] + res["memory"]["master_weights"] < want["optimizer"] / 100


def test_cli_refuses_deepspeed_fp16_on_a_cpu_without_fp16(tmp_path):
    """The real CLI on this machine: DeepSpeed's CPU accelerator has no fp16 here, so the run must stop
    with a ConfigError (exit 2) naming the fixes, before any step."""
    import subprocess
    import sys

    from trellis.engine.backends.deepspeed import fp16_supported

    if fp16_supported("cpu"):
        pytest.skip("this CPU supports fp16 in DeepSpeed")
    metrics = tmp_path / "m.jsonl"
    p = subprocess.run([sys.executable, "-m", "trellis", "train", "tiny-llama", "--zero.backend=deepspeed",
                        "--precision.dtype=fp16", "--parallel.dp=1", "--train.steps=1", "--data.seq_len=32",
                        "--logging.progress=none", f"--logging.metrics_file={metrics}"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "precision.dtype='bf16'" in p.stderr and "zero.backend='native'" in p.stderr
    assert "Traceback" not in p.stderr
    assert not metrics.exists() or not metrics.read_text().strip()


def _force_fp16_support() -> None:
    """A CPU without fp16 in oneDNN: pretend DeepSpeed's CPU accelerator (and our pre-check) supports fp16, so the
    loss-scaler logic runs anyway (torch computes fp16 on any CPU, only slower). On a CPU that has it nothing is
    forced: DeepSpeed's real fp16 path runs."""
    from deepspeed.accelerator import get_accelerator

    from trellis.engine.backends import deepspeed as deepspeed_backend

    if deepspeed_backend.fp16_supported("cpu"):
        return
    type(get_accelerator()).is_fp16_supported = lambda self: True
    deepspeed_backend.fp16_supported = lambda device_type: True


def fp16_scaler_scenarios(rank: int, world: int, scenarios: list[dict]) -> list[list[dict]]:
    _force_fp16_support()
    from trellis import configs
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import Trainer

    ctx = init_distributed(300.0)
    out = []
    for sc in scenarios:
        cfg = configs.load("tiny-llama", dict(sc["overrides"]))
        trainer = Trainer(cfg, ctx)
        poison_grad_on_rank1(sc["inf_steps"], math.inf)(trainer, rank)
        trainer.train()
        out.append([json.loads(x) for x in Path(cfg.logging.metrics_file).read_text().splitlines()]
                   if rank == 0 else [])
    return out


def test_deepspeed_fp16_loss_scaling_on_cpu(tmp_path):
    """DeepSpeed's fp16 loss scaling through our backend (skip agreed across ranks, growth after
    `loss_scale_window` clean steps, hysteresis), on 2 gloo ranks. Capability branch: on a CPU whose oneDNN has
    fp16 (AVX512-FP16 / AMX-FP16) this is DeepSpeed's real CPU fp16 path, which the CLI then accepts; on any
    other CPU DeepSpeed's support check is forced (the logic is the same, the CLI refuses: test above)."""
    from trellis.engine.backends.deepspeed import fp16_supported

    print("DeepSpeed fp16 on this CPU:", "supported (real path)" if fp16_supported("cpu") else "forced")
    base = {**BASE, "parallel.dp": 2, "zero.backend": "deepspeed", "zero.stage": 2, "precision.dtype": "fp16",
            "precision.initial_scale_power": 8, "precision.loss_scale_window": 2, "train.steps": 5}
    scenarios = [
        {"overrides": {**base, "precision.hysteresis": 1, "logging.metrics_file": str(tmp_path / "h1.jsonl")},
         "inf_steps": {2}},
        {"overrides": {**base, "precision.hysteresis": 2, "logging.metrics_file": str(tmp_path / "h2.jsonl")},
         "inf_steps": {2, 3}},
        {"overrides": {**base, "precision.dtype": "fp32", "logging.metrics_file": str(tmp_path / "fp32.jsonl")},
         "inf_steps": set()},
    ]
    r0, _ = run_ranks(2, fp16_scaler_scenarios, scenarios, timeout=900)
    h1, h2, fp32 = r0
    # step 1 runs before any update: its loss differs from fp32 only by fp16 rounding in the forward (relative
    # 2^-11 per op; bound 2^-8 of the loss); a run that was not in fp16 at all would give |Δ| == 0
    d1 = abs(h1[0]["loss"] - fp32[0]["loss"])
    print(f"first-step loss fp16 {h1[0]['loss']:.6f} vs fp32 {fp32[0]['loss']:.6f}: |Δ| {d1:.2e}")
    assert 0 < d1 <= 2 ** -8 * fp32[0]["loss"]
    print("hysteresis 1: skipped", [r["skipped"] for r in h1], "scales", [r["loss_scale"] for r in h1])
    print("hysteresis 2: skipped", [r["skipped"] for r in h2], "scales", [r["loss_scale"] for r in h2])
    # DeepSpeed's rule (runtime/fp16/loss_scaler.py): an overflow skips the step on every rank and, once
    # hysteresis is spent, halves the scale; the scale doubles when (iter - last_overflow_iter - 1) is a
    # positive multiple of loss_scale_window, i.e. after `window` clean steps not counting the first one.
    assert [r["skipped"] for r in h1] == [False, True, False, False, False]
    assert [r["loss_scale"] for r in h1] == [256.0, 128.0, 128.0, 128.0, 256.0]
    # hysteresis 2: the first overflow only spends hysteresis (scale kept), the second halves the scale
    assert [r["skipped"] for r in h2] == [False, True, True, False, False]
    assert [r["loss_scale"] for r in h2] == [256.0, 256.0, 128.0, 128.0, 128.0]
    # a skipped step's grad norm is non-finite: strict JSON writes it as null and names it (engine/metrics.py)
    assert all(r["grad_norm"] is None and "grad_norm" in r["nonfinite"] for r in h2 if r["skipped"])
