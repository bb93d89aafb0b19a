"""The FLOP model (parallel/flops.py) against hand counts of one layer, torch's own FLOP counter on real HF
models, the device peak table and the CPU calibration cache."""

from __future__ import annotations

import json

import pytest
import torch

from trellis.parallel.flops import (FlopsPerToken, ThroughputMeter, cpu_cache_file, cpu_peak_flops, flops_per_token,
                                  gpu_peak_flops, peak_flops)
from trellis.engine.metrics import print_summary, _throughput_text
from trellis.parallel.models.dims import dims_from_hf_config

# one decoder layer, GQA (4 query heads, 2 kv heads of 16), gated MLP, untied head
LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "tie_word_embeddings": False}
# one GPT-2 layer: fused c_attn, 4h MLP, tied head
GPT2 = {"model_type": "gpt2", "vocab_size": 96, "n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 64}


def test_llama_gqa_one_layer_by_hand():
    d = dims_from_hf_config(LLAMA)
    # forward per token, 2 FLOPs per multiply-add:
    q = o = 2 * 64 * 64                 # 8192 each (4 heads x 16)
    k = v = 2 * 64 * 32                 # 4096 each (2 kv heads x 16)
    gate = up = 2 * 64 * 128            # 16384 each
    down = 2 * 128 * 64                 # 16384
    linears = q + k + v + o + gate + up + down
    assert linears == 73728
    # seq 8, causal: a query attends (8 + 1) / 2 = 4.5 keys on average; QK^T and AV over 4 heads x 16
    attn = 2 * (2 * 4 * 16 * 4.5)       # 1152
    head = 2 * 64 * 512                 # 65536
    f = flops_per_token(d, seq_len=8)
    assert f.forward == 73728 + 1152 + 65536 == 140416
    assert f.model == 3 * (linears + attn + head) == 421248  # backward = 2 x forward when everything trains
    assert f.hardware == f.model
    # selective recompute: the attention module's forward again (q, k, v, o and the attention matmuls)
    sel = flops_per_token(d, seq_len=8, activation_checkpointing="selective")
    assert (sel.model, sel.hardware) == (421248, 421248 + 24576 + 1152)
    full = flops_per_token(d, seq_len=8, activation_checkpointing="full")
    assert full.hardware == 421248 + 73728 + 1152
    # without the causal mask every query sees all 8 keys
    assert flops_per_token(d, seq_len=8, causal=False).forward == 73728 + 2 * (2 * 4 * 16 * 8) + 65536


def test_llama_lora_frozen_base_by_hand():
    d = dims_from_hf_config(LLAMA)
    # LoRA r=4 on all 7 linears (the family default): A (in x 4) + B (4 x out), forward 2*4*(in+out)
    lora = (2 * 4 * (64 + 64)) * 2 + (2 * 4 * (64 + 32)) * 2 + (2 * 4 * (64 + 128)) * 3
    assert lora == 8192
    fwd = 73728 + 1152 + lora + 65536
    # backward: frozen linears and head only their input gradient (1x), attention and LoRA 2x ...
    bwd = 73728 + 2 * 1152 + 2 * lora + 65536
    # ... minus what autograd skips in the first block: the input gradients of q, k, v and of their lora_A
    skip = (8192 + 4096 + 4096) + 3 * (2 * 4 * 64)
    f = flops_per_token(d, seq_len=8, peft="lora", lora_r=4)
    assert f.forward == fwd == 148608
    assert f.model == fwd + bwd - skip == 288640
    # a frozen base without LoRA matrices (IA3): no weight gradients, adapters not counted
    assert flops_per_token(d, seq_len=8, peft="ia3").model == (73728 + 1152 + 65536) * 2 + 1152 - 16384


def test_gpt2_one_layer_by_hand():
    d = dims_from_hf_config(GPT2)
    c_attn, c_proj, c_fc, mlp_proj = 2 * 32 * 96, 2 * 32 * 32, 2 * 32 * 128, 2 * 128 * 32
    linears = c_attn + c_proj + c_fc + mlp_proj           # 24576
    attn = 2 * (2 * 4 * 8 * (16 + 1) / 2)                 # seq 16: 1088
    head = 2 * 32 * 96                                    # tied to wte: still a matmul, 6144
    f = flops_per_token(d, seq_len=16)
    assert f.forward == linears + attn + head == 31808
    assert f.model == 3 * 31808
    # LoRA r=2 on the default targets: c_attn.q/.k/.v (three 32->32 parts of the fused c_attn), both c_proj
    # (attention 32->32 and MLP 128->32: peft matches by suffix) and c_fc 32->128
    lora = 3 * (2 * 2 * 64) + 2 * 2 * 64 + 2 * 2 * 160 + 2 * 2 * 160
    assert lora == 2304
    skip = c_attn + 3 * (2 * 2 * 32)
    lf = flops_per_token(d, seq_len=16, peft="lora", lora_r=2)
    assert lf.model == (linears + attn + lora + head) + (linears + 2 * attn + 2 * lora + head) - skip == 65088


def _torch_counted(cfg: dict, seq: int, lora_r: int = 0) -> int:
    """FLOPs torch.utils.flop_counter counts in one forward + backward of a real HF model (eager attention:
    its bmm over the whole s x s score matrix, i.e. causal=False)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModelForCausalLM

    c = AutoConfig.for_model(**cfg)
    c._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(c)
    if lora_r:
        import peft

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora_r, target_modules=targets))
    x = torch.randint(0, cfg["vocab_size"], (2, seq))
    with FlopCounterMode(display=False) as fc:
        model(input_ids=x).logits.sum().backward()
    return fc.get_total_flops()


def test_matches_torch_flop_counter_full_and_lora():
    cfg = dict(LLAMA, num_hidden_layers=2, hidden_size=32, intermediate_size=48, head_dim=8, vocab_size=96)
    d = dims_from_hf_config(cfg)
    tokens = 2 * 16
    assert _torch_counted(cfg, 16) == flops_per_token(d, seq_len=16, causal=False).model * tokens
    assert _torch_counted(cfg, 16, lora_r=4) == flops_per_token(d, seq_len=16, causal=False, peft="lora",
                                                                lora_r=4).model * tokens


@pytest.mark.parametrize("name,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.5), ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H100 NVL", "fp16", 835.5),
    ("NVIDIA H200", "bf16", 989.5), ("NVIDIA H200 NVL", "bf16", 835.5), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100-PCIE-40GB", "fp32", 19.5), ("NVIDIA B200", "bf16", 2250.0), ("NVIDIA L40S", "fp32", 91.6),
    ("NVIDIA H100 80GB HBM3", "fp32", 67.0)])
def test_peak_table(name, dtype, tflops):
    assert gpu_peak_flops(name, dtype) == tflops * 1e12


def test_peak_unknown_gpu_and_override(monkeypatch):
    assert gpu_peak_flops("NVIDIA GeForce GT 710", "bf16") is None
    monkeypatch.setenv("TRELLIS_PEAK_TFLOPS", "123.5")
    assert peak_flops(torch.device("cpu"), "bf16") == 123.5e12


def test_cpu_calibration_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("TRELLIS_CACHE", str(tmp_path))
    monkeypatch.delenv("TRELLIS_PEAK_TFLOPS", raising=False)
    assert cpu_peak_flops("fp32", calibrate=False) is None  # no cache: nothing measured unless asked
    measured = cpu_peak_flops("fp32")
    assert measured > 1e8
    path = cpu_cache_file()
    assert path.parent == tmp_path / "flops" and "torch" in path.name
    doc = json.loads(path.read_text())
    doc["flops"]["bf16"] = 4.25e12  # a later start reads the file instead of measuring
    path.write_text(json.dumps(doc))
    assert cpu_peak_flops("bf16", calibrate=False) == 4.25e12
    path.write_text("not json")  # a corrupt cache is measured again
    assert cpu_peak_flops("bf16", calibrate=False) is None


def test_meter_and_display():
    m = ThroughputMeter(FlopsPerToken(forward=1.0, model=3e6, hardware=4e6), world_size=2, peak=1e12)
    r = m(input_tokens=1000, seconds=0.5)  # 3e9 FLOPs / 0.5 s / 2 devices = 3e9 FLOP/s per device
    assert r == {"tflops": 3e9 / 1e12, "mfu": 3e9 / 1e12, "hfu": 4e9 / 1e12}
    assert ThroughputMeter(m.per_token, 1, None)(1000, 1.0)["mfu"] is None
    assert _throughput_text({"tflops": 0.003, "mfu": 0.003}) == " 0.003 TFLOP/s MFU 0.3%"
    import io

    out = io.StringIO()
    print_summary({"tflops": 0.003, "mfu": 0.4123}, file=out)
    assert "0.003 TFLOP/s per device" in out.getvalue() and "41.2%" in out.getvalue()


def test_planner_compute_term_uses_the_flop_model():
    from trellis.engine.memory.cluster import default_profile
    from trellis.engine.memory.estimator import TrainingSetup, estimate
    from trellis.engine.memory.models import resolve_model
    from trellis.engine.memory.planner import throughput

    d = resolve_model("llama-3-8b")
    parts = {}
    for peft in ("none", "lora"):
        s = TrainingSetup(dp=8, zero=3, seq_len=4096, micro_batch=1, peft=peft, backend="native")
        parts[peft] = throughput(d, s, estimate(d, s))[1]["compute_s"]
    tokens = 4096  # one micro-batch of one sequence per rank
    assert parts["none"] == pytest.approx(flops_per_token(d, seq_len=4096).hardware * tokens
                                          / default_profile("H100").flops("bf16"), rel=1e-12)
    # a frozen base does no weight-gradient matmuls: ~2/3 of full fine-tuning's compute (the old 6Ψ rule: equal)
    assert 0.6 < parts["lora"] / parts["none"] < 0.72
