"""The FLOP model: model FLOPs per token of one training step, and each device's peak, for MFU and TFLOP/s.

The one place trellis counts FLOPs: the metrics (`mfu`, `tflops` in every JSONL record, the progress bar and
the summary), `bench/gpu_mfu.py` and the planner's throughput model (engine/memory/planner.py) all call
`flops_per_token`. Pure Python; torch is imported only by the CPU calibration.

Counted per token (a multiply-add is 2 FLOPs; non-matmul work — norms, activations, softmax, rotary,
the optimizer — is not counted, as Megatron/PaLM/torchtitan count MFU):
  forward   each decoder-block linear 2·fan_in·fan_out, the LM head 2·hidden·vocab (the embedding is a lookup),
            attention QKᵀ and AV 2·2·(heads·head_dim)·k, k = the keys a query attends to on average:
            (s + 1)/2 for a causal mask over s positions (the kernel skips the masked half; packed documents
            attend even fewer keys, which this does not model), s without the mask (`causal=False`).
  backward  a matmul with a trainable weight: 2× its forward (input gradient + weight gradient); with a frozen
            weight (the base under PEFT): 1× (the input gradient only, still needed by the adapters below it);
            the attention matmuls (no weights): 2× (dQ, dK, dV, dP).
  LoRA      (lora, rslora, dora, qlora, adalora at peft.r) on each target linear: A (fan_in×r) and B (r×fan_out),
            forward 2·r·(fan_in + fan_out), backward 2× that (both trainable). DoRA's weight-norm and the
            adapters of ia3/lokr/loha/hra/prompt methods are not counted (element-wise, or ≪ 1 % of the base);
            prompt methods' virtual tokens are not counted either.
  Full fine-tuning is therefore 6 FLOPs per parameter-matmul-weight per token (+ attention), the "6N" rule.
  Activation recompute is hardware work, not model work: `hardware` adds the recomputed forward (full: the
  whole block; selective: its attention module, projections included — what parallel/activation_checkpoint.py
  wraps); MFU uses `model`, HFU uses `hardware`.
  A frozen embedding: autograd skips the input gradient of the first block's input projections (q/k/v, and
  their lora_A), whose input needs no gradient; counted so (prompt/p-tuning, whose virtual tokens are trainable
  inputs, keep it). With that, full fine-tuning and LoRA equal torch.utils.flop_counter's count of a real HF
  step with eager attention and causal=False (tests/unit/test_flops.py).

Peak FLOP/s: `PEAK_TFLOPS` (dense, no sparsity, from NVIDIA's datasheets named there) for GPUs; on a CPU the
peak is a ≤ 1 s matmul calibration (`calibrate_cpu`), cached per machine (CPU model, torch version, threads)
under the trellis cache dir. It is measured once, lazily, by the first run on the machine that finds no cache
(rank 0, before the first step, the other ranks waiting), and read from the file by every later start.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .models import family_for
from .models.dims import Linear, ModelDims, linear_shapes

LORA_METHODS = ("lora", "rslora", "dora", "qlora", "adalora")


@dataclass(frozen=True)
class FlopsPerToken:
    """FLOPs per input token of one training step (forward + backward), summed over the whole model."""

    forward: float
    model: float     # what MFU counts: forward + backward, no recompute
    hardware: float  # model + the forward that activation checkpointing recomputes (HFU)


def block_linears(d: ModelDims) -> list[Linear]:
    """The decoder block's linears (the family spec's; a generic GPT block for `--params N` with dims)."""
    if d.family != "generic":
        return linear_shapes(d, family_for(d.family))
    h, f = d.hidden, d.ffn
    return [Linear("attn.qkv", h, 3 * h, True, "col"), Linear("attn.out", h, h, True, "row"),
            Linear("mlp.fc1", h, f, True, "col"), Linear("mlp.fc2", f, h, True, "row")]


def _lora_shapes(d: ModelDims, targets: tuple[str, ...] | list[str]) -> list[tuple[str, int, int]]:
    """(linear path, fan_in, fan_out) of each adapted linear of one block. A target naming a part of a fused
    linear (GPT-2's "c_attn.q" of c_attn, which parallel/hf_surgery.py unfuses) adapts that third of it."""
    lins = block_linears(d)
    if not targets:
        targets = family_for(d.family).default_lora_targets if d.family != "generic" else ()
    out = []
    for t in targets:
        for lin in lins:
            if lin.name == t or lin.name.endswith("." + t):
                out.append((lin.name, lin.fan_in, lin.fan_out))
            elif "." in t and lin.name.split(".")[-1] == t.split(".")[0]:  # fused [q|k|v]: one part
                out.append((lin.name, lin.fan_in, lin.fan_out // 3))
    return out


def flops_per_token(d: ModelDims, *, seq_len: int, peft: str = "none", lora_r: int = 8,
                    lora_targets: tuple[str, ...] | list[str] = (), activation_checkpointing: str = "none",
                    causal: bool = True) -> FlopsPerToken:
    """FLOPs per token of one training step of `d` at sequence length `seq_len` (see the module docstring)."""
    if not (d.hidden and d.layers):
        raise ValueError(f"{d.name or d.family}: the FLOP model needs the model dims (hidden size and layers)")
    frozen = peft != "none"
    keys = (seq_len + 1) / 2 if causal else float(seq_len)
    lin = block_linears(d)
    lin_fwd = sum(2 * x.fan_in * x.fan_out for x in lin)
    attn_lin_fwd = sum(2 * x.fan_in * x.fan_out for x in lin if _is_attention(d, x.name))
    core_fwd = 2 * 2 * d.heads * d.head_dim * keys  # QKᵀ and AV
    lora_fwd = attn_lora_fwd = 0.0
    # the first block's input projections: no input gradient when nothing below them trains
    first_skip = (sum(2 * x.fan_in * x.fan_out for x in lin if _is_attention(d, x.name) and x.style == "col")
                  if frozen and peft not in ("prompt", "ptuning") else 0.0)
    if peft in LORA_METHODS:
        for name, fi, fo in _lora_shapes(d, lora_targets):
            f = 2 * lora_r * (fi + fo)
            lora_fwd += f
            attn_lora_fwd += f if _is_attention(d, name) else 0.0
            if first_skip and _is_attention(d, name) and _style(lin, name) == "col":
                first_skip += 2 * lora_r * fi  # lora_A's input gradient
    head_fwd = 2 * (d.proj_dim or d.hidden) * d.vocab
    wmul = 1 if frozen else 2  # backward of a weight matmul: input grad (+ weight grad when trainable)
    block_fwd = lin_fwd + core_fwd + lora_fwd
    block_bwd = wmul * lin_fwd + 2 * core_fwd + 2 * lora_fwd
    forward = d.layers * block_fwd + head_fwd
    model = forward + d.layers * block_bwd + wmul * head_fwd - first_skip
    recompute = {"none": 0.0, "full": block_fwd, "selective": attn_lin_fwd + core_fwd + attn_lora_fwd}
    if activation_checkpointing not in recompute:
        raise ValueError(f"activation_checkpointing={activation_checkpointing!r}: use none, selective or full")
    return FlopsPerToken(forward=forward, model=model, hardware=model + d.layers * recompute[activation_checkpointing])


def _style(lins: list[Linear], name: str) -> str:
    return next(x.style for x in lins if x.name == name)


def _is_attention(d: ModelDims, name: str) -> bool:
    """Inside the block's attention module (what selective checkpointing recomputes)?"""
    prefix = family_for(d.family).attention if d.family != "generic" else "attn"
    return name.startswith(prefix + ".")


def flops_for_config(cfg, d: ModelDims) -> FlopsPerToken:
    """`flops_per_token` for a TrainConfig's run of `d`."""
    return flops_per_token(d, seq_len=cfg.data.seq_len, peft=cfg.peft.method, lora_r=cfg.peft.r,
                           lora_targets=tuple(cfg.peft.target_modules),
                           activation_checkpointing=cfg.activation_checkpointing.mode)


# ---- peak FLOP/s -----------------------------------------------------------------------------------------
# Dense tensor-core TFLOP/s (the datasheets' "with sparsity" figures halved); fp32 is the non-tensor-core FP32
# rate (trellis does not enable TF32). Matched in order against torch.cuda.get_device_name().
# Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM5 / PCIe / NVL columns); NVIDIA H200 Tensor Core GPU
# datasheet (SXM / NVL); NVIDIA A100 Tensor Core GPU datasheet (40 GB and 80 GB alike); NVIDIA HGX B200 /
# DGX B200 datasheet (per GPU = the 8-GPU figure / 8); NVIDIA L40S datasheet.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H200.*NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    (r"H200", {"bf16": 989.5, "fp16": 989.5, "fp32": 67.0}),
    (r"H100.*NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    (r"H100.*PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 51.2}),
    (r"H100", {"bf16": 989.5, "fp16": 989.5, "fp32": 67.0}),  # SXM5 ("H100 80GB HBM3")
    (r"A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    (r"B200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 75.0}),
    (r"L40S", {"bf16": 362.05, "fp16": 362.05, "fp32": 91.6}),
]


def gpu_peak_flops(device_name: str, dtype: str) -> float | None:
    """Peak dense FLOP/s of a GPU by its name (torch.cuda.get_device_name) for bf16/fp16/fp32; None if unknown."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return peaks[dtype] * 1e12
    return None


def cache_dir() -> Path:
    """$TRELLIS_CACHE/flops, else $XDG_CACHE_HOME/trellis/flops, else ~/.cache/trellis/flops."""
    if os.environ.get("TRELLIS_CACHE"):
        return Path(os.environ["TRELLIS_CACHE"]) / "flops"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trellis" / "flops"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cache_file() -> Path:
    import torch

    key = f"{_cpu_model()}-torch{torch.__version__}-{torch.get_num_threads()}threads"
    return cache_dir() / (re.sub(r"[^A-Za-z0-9.+-]+", "_", key) + ".json")


def calibrate_cpu(seconds: float = 0.6, n: int = 1024) -> dict[str, float]:
    """Measured matmul FLOP/s of this CPU for fp32 and bf16 (best of repeated n×n matmuls, `seconds` in all),
    written to `cpu_cache_file()`. Returns {"fp32": .., "bf16": .., "fp16": ..} in FLOP/s (fp16 = bf16's)."""
    import torch

    out: dict[str, float] = {}
    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        torch.mm(a, b)  # warm-up
        best, deadline = float("inf"), time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n ** 3 / best
    out["fp16"] = out["bf16"]
    path = cpu_cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"cpu": _cpu_model(), "flops": out}))
    tmp.replace(path)
    return out


def cpu_peak_flops(dtype: str, *, calibrate: bool = True) -> float | None:
    """The cached calibration of this CPU for `dtype`; measured now (≤ 1 s, once per machine) if there is no
    cache and `calibrate`, else None. A corrupt cache file is measured again."""
    path = cpu_cache_file()
    try:
        return float(json.loads(path.read_text())["flops"][dtype])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return calibrate_cpu()[dtype] if calibrate else None


def peak_flops(device, dtype: str, *, calibrate: bool = True) -> float | None:
    """Peak FLOP/s of one `device` (torch.device) for `dtype` ("bf16", "fp16", "fp32"); None when unknown.
    $TRELLIS_PEAK_TFLOPS overrides it (a GPU missing from the table, or a measured sustained rate)."""
    if os.environ.get("TRELLIS_PEAK_TFLOPS"):
        return float(os.environ["TRELLIS_PEAK_TFLOPS"]) * 1e12
    if device.type == "cuda":
        import torch

        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
    if device.type == "cpu":
        return cpu_peak_flops(dtype, calibrate=calibrate)
    return None


class ThroughputMeter:
    """TFLOP/s per device and MFU/HFU of a step from its input tokens (the whole world's) and its time."""

    def __init__(self, per_token: FlopsPerToken, world_size: int, peak: float | None):
        self.per_token, self.world, self.peak = per_token, world_size, peak

    def __call__(self, input_tokens: int, seconds: float) -> dict:
        if seconds <= 0:
            return {"tflops": None, "mfu": None, "hfu": None}
        per_dev = input_tokens * self.per_token.model / seconds / self.world
        hw = input_tokens * self.per_token.hardware / seconds / self.world
        return {"tflops": per_dev / 1e12, "mfu": per_dev / self.peak if self.peak else None,
                "hfu": hw / self.peak if self.peak else None}
