"""Memory estimator: parameter counts vs real HF models, hand-derived formulas, classic ZeRO figures, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trellis.engine.memory.estimator import KEYS, TrainingSetup, estimate
from trellis.engine.memory.models import dims_from_hf_config, dims_from_params, resolve_model, total_params
from trellis.errors import ConfigError

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"
TINY = ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-neox", "tiny-bloom", "tiny-qwen3", "tiny-phi3", "tiny-gemma2"]
# small variants exercising each family's switches (biases, GQA, untied head, OPT projection, n_inner default)
VARIANTS = [
    {"model_type": "qwen2", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
    {"model_type": "mistral", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": True},
    {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
     "num_attention_heads": 4, "attention_bias": True, "mlp_bias": True},
    {"model_type": "gpt2", "vocab_size": 96, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
    {"model_type": "opt", "vocab_size": 96, "hidden_size": 32, "ffn_dim": 48, "num_hidden_layers": 2,
     "num_attention_heads": 4, "word_embed_proj_dim": 16, "max_position_embeddings": 64},
    {"model_type": "gpt_neox", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
     "num_attention_heads": 4, "tie_word_embeddings": False},
    {"model_type": "bloom", "vocab_size": 96, "hidden_size": 32, "n_layer": 2, "n_head": 4},
    {"model_type": "qwen3", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "attention_bias": True,
     "tie_word_embeddings": True},
    {"model_type": "phi3", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0},
    {"model_type": "gemma2", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 24, "tie_word_embeddings": False},
]


def _hf_count(cfg: dict) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_param_count_matches_hf_tiny(name):
    cfg = json.loads((MODELS / name / "config.json").read_text())
    assert total_params(resolve_model(name)) == _hf_count(cfg)


@pytest.mark.parametrize("cfg", VARIANTS, ids=[v["model_type"] for v in VARIANTS])
def test_param_count_matches_hf_variants(cfg):
    assert total_params(dims_from_hf_config(cfg)) == _hf_count(cfg)


@pytest.mark.parametrize("name,published", [("llama-2-7b", 6_738_415_616), ("gpt2", 124_439_808),
                                            ("bloom-7b1", 7_069_016_064), ("gpt-neox-20b", 20_554_567_680)])
def test_presets_match_published_totals(name, published):
    """Totals as printed by the model cards / `num_parameters()` of the published checkpoints."""
    assert total_params(resolve_model(name)) == published


# The published config.json values (dimensions) of one real model per family added in issue 19, written out here
# (not read from configs/), and the total its model card / `num_parameters()` gives: Qwen3-8B "8.2B" (6.95B
# non-embedding), Phi-3-mini "3.8B", Gemma-2-9b "9.24B" (tied embeddings, 4 norms per block).
PUBLISHED = {
    "Qwen3-8B": ({"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                  "attention_bias": False, "tie_word_embeddings": False}, 8_190_735_360),
    "Phi-3-mini-4k-instruct": ({"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
                                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                                "vocab_size": 32064, "pad_token_id": 32000, "tie_word_embeddings": False},
                               3_821_079_552),
    "Gemma-2-9b": ({"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
                    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
                    "tie_word_embeddings": True}, 9_241_705_984),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_new_families_match_published_totals_and_hf(name):
    cfg, published = PUBLISHED[name]
    assert total_params(dims_from_hf_config(cfg)) == published
    assert _hf_count(cfg) == published  # HF's own module tree (meta device) agrees with the card


@pytest.mark.parametrize("name,published", [("qwen3-8b", 8_190_735_360), ("phi-3-mini-4k", 3_821_079_552),
                                            ("gemma-2-9b", 9_241_705_984)])
def test_new_family_presets_match_published_totals(name, published):
    assert total_params(resolve_model(name)) == published


@pytest.mark.parametrize("stage,expected_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_classic_zero_figures(stage, expected_gb):
    """ZeRO paper, Fig. 1: Ψ=7.5B, Nd=64, mixed-precision Adam (K=12): 16Ψ, 4Ψ+12Ψ/Nd, 2Ψ+14Ψ/Nd, 16Ψ/Nd."""
    est = estimate(dims_from_params(int(7.5e9)), TrainingSetup(dp=64, zero=stage))
    assert est.worst_rank.total / 1e9 == pytest.approx(expected_gb, abs=0.05)


def test_native_stage_semantics_hand_derived():
    """Native, fp32 params are the master: Ψ=1e9, Nd=4.
    stage0: 4Ψ+4Ψ+8Ψ = 16e9; stage1: 4Ψ+4Ψ+8Ψ/4 = 10e9; stage2/3: 16Ψ/4 = 4e9 persistent, no master copy."""
    d = dims_from_params(10**9)
    got = [estimate(d, TrainingSetup(dp=4, zero=z, backend="native", precision="bf16")).ranks[0] for z in range(4)]
    persistent = [r.params + r.grads + r.optimizer_states + r.master_weights for r in got]
    assert persistent == pytest.approx([16e9, 10e9, 4e9, 4e9])
    assert all(r.master_weights == 0 for r in got)
    # stage 2 keeps every block gathered (2 bytes each); stage 3 only a couple of blocks
    assert got[2].buffers == pytest.approx(2e9) and got[3].buffers < got[2].buffers


def test_fp32_deepspeed_has_no_master():
    """fp32: params 4 + grads 4 + Adam 8 = 16Ψ with no master copy."""
    r = estimate(dims_from_params(10**6), TrainingSetup(precision="fp32")).ranks[0]
    assert (r.params, r.grads, r.master_weights, r.optimizer_states) == (4e6, 4e6, 0, 8e6)


def test_lora_trainable_count_hand_derived():
    """tiny-llama (h=64, q=64, kv=32, ffn=128, 4 layers), r=4, all 7 linears:
    q 4(64+64) + k 4(64+32) + v 4(64+32) + o 4(64+64) + gate/up 2·4(64+128) + down 4(128+64)
    = 512 + 384 + 384 + 512 + 768 + 768 + 768 = 4096 per layer."""
    r = estimate(resolve_model("tiny-llama"), TrainingSetup(peft="lora", lora_r=4, backend="native",
                                                             precision="fp32")).ranks[0]
    assert r.trainable_params == 4 * 4096
    assert r.grads == 4 * 4 * 4096 and r.optimizer_states == 8 * 4 * 4096


def test_qlora_base_bytes():
    """NF4 + double quant: 0.5 + 1/64 + 4/(64·256) bytes per base linear weight; the rest in storage dtype."""
    d = resolve_model("llama-2-7b")
    r = estimate(d, TrainingSetup(peft="qlora", double_quant=True, precision="bf16")).ranks[0]
    linear_w = d.layers * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert r.params_by_dtype["4bit"] == pytest.approx(linear_w * (0.5 + 1 / 64 + 4 / 16384), rel=1e-9)


def test_pipeline_worst_rank_and_tp_sharding():
    d = resolve_model("llama-2-7b")
    est = estimate(d, TrainingSetup(pp=4, tp=2, seq_len=2048, micro_batch=1, grad_accum=8))
    # 1F1B: stage 0 holds 4 micro-batches of activations, the last only one (plus the logits)
    assert est.worst == 0 and est.ranks[0].activations > 3 * est.ranks[3].activations
    assert est.ranks[3].logits > 0 and est.ranks[0].logits == 0
    one = estimate(d, TrainingSetup()).ranks[0].params
    assert sum(r.params for r in est.ranks) == pytest.approx(one / 2, rel=1e-3)


def test_json_keys_stable():
    doc = estimate(resolve_model("tiny-llama"), TrainingSetup(seq_len=16)).as_dict()
    for k in KEYS:
        assert k in doc["ranks"][0] and isinstance(doc["ranks"][0][k], int)
        assert k in doc["worst_rank"]
    assert {"schema_version", "model", "setup", "ranks", "worst_rank", "fits", "gpu_mem"} <= set(doc)


def test_errors_name_the_fix():
    with pytest.raises(ConfigError, match="did you mean llama-2-7b"):
        resolve_model("lama-2-7b")
    with pytest.raises(ConfigError, match=r"parallel.tp=3 does not divide num_attention_heads=32; use one of 1, 2, 4"):
        estimate(resolve_model("llama-2-7b"), TrainingSetup(tp=3))
    with pytest.raises(ConfigError, match="missing num_hidden_layers"):
        dims_from_hf_config({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_attention_heads": 2,
                             "intermediate_size": 16})
    with pytest.raises(ConfigError, match="--hidden"):
        estimate(dims_from_params(10**9), TrainingSetup(tp=2))


@pytest.mark.parametrize("tp,sp", [(1, False), (4, False), (4, True)])
def test_korthikanti_generic_block(tp, sp):
    """Korthikanti et al. 2022, 16-bit GPT block with dropout: per layer sbh(10 + 24/t + 5as/(ht)) bytes with
    tp=t, and sbh/t·(34 + 5as/h) with sequence parallel. s=2048, b=1, h=1024, a=16 (+ 8 bytes/token ids)."""
    s, h, a = 2048, 1024, 16
    d = dims_from_params(10**9, hidden=h, layers=1, heads=a)
    r = estimate(d, TrainingSetup(tp=tp, sequence_parallel=sp, seq_len=s, micro_batch=1)).ranks[0]
    per_layer = s * h * ((34 + 5 * a * s / h) / tp if sp else 10 + 24 / tp + 5 * a * s / (h * tp))
    assert r.activations == pytest.approx(per_layer + 8 * s)


def test_full_checkpointing_keeps_block_inputs():
    """Full recompute keeps only the block input per layer: 2sbh bytes in 16-bit (s=4096, b=1, h=4096),
    so one more layer adds exactly that; one block's full activations are recomputed on top (independent
    of depth). Selective keeps more than full and less than none."""
    from trellis.engine.memory.models import with_overrides

    d = resolve_model("llama-2-7b")
    setup = TrainingSetup(activation_checkpointing="full", seq_len=4096, micro_batch=1)
    deeper = estimate(with_overrides(d, layers=d.layers + 1), setup).ranks[0].activations
    assert deeper - estimate(d, setup).ranks[0].activations == 2 * 4096 * 4096
    acts = {m: estimate(d, TrainingSetup(activation_checkpointing=m, seq_len=4096)).ranks[0].activations
            for m in ("none", "selective", "full")}
    assert acts["full"] < acts["selective"] < acts["none"]


def test_mixed_precision_regimes_llama_layer_hand_derived():
    """Bytes one Llama-2-7B layer keeps per token (h=4096, 32 heads, 32 kv heads, ffn 11008), derived from
    what HF's ops save (measured on the tiny model in tests/distributed/test_memory_engine_validation.py):
    - both regimes: sdpa keeps q, k, v, out (4·4096 16-bit) + a logsumexp per head (32 fp32); SwiGLU keeps
      gate, silu(gate), up, gate·up (4·11008 16-bit).
    - autocast (params fp32): each RMSNorm keeps its fp32 input, x·rsqrt (2·4096·4 B) and rsqrt (4 B); its
      fp32 output is not kept, but each consuming linear keeps its own 16-bit cast: 3 (q, k, v) + 2 (gate, up).
    - cast (module in 16-bit): each RMSNorm keeps an fp32 copy of its input (4096·4 B), rsqrt (4 B), the
      16-bit normalised value and output (2·4096·2 B), shared by the consumers."""
    from trellis.engine.memory.activations import per_layer_bytes

    d = resolve_model("llama-2-7b")
    h, f = 4096, 11008
    common = 2 * (4 * h + 4 * f) + 32 * 4
    autocast = 2 * (2 * h * 4 + 4) + 2 * (3 + 2) * h + common
    cast = 2 * (h * 4 + 4 + 2 * h * 2) + common
    for mode, want in (("autocast", autocast), ("cast", cast)):
        got = per_layer_bytes(d, tokens=1, seq=1, tp=1, sp=False, act_bytes=2, ckpt="none", mode=mode)["kept"]
        assert got == want, (mode, got, want)


def test_int8_base_bytes_equal_bitsandbytes_layers(tmp_path):
    """The estimator's int8 line vs the bytes of bitsandbytes' own 8-bit load (HF `load_in_8bit`, no trellis
    code) of the tiny Llama: int8 weights + fp32 row scales (SCB) of every decoder-block Linear8bitLt."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from trellis.configs import PRESET_DIR

    hf = json.loads((PRESET_DIR / "models" / "tiny-llama" / "config.json").read_text())
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf.items() if k != "architectures"})).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    layers = [m for m in model.model.layers.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    measured = sum(m.weight.numel() * m.weight.element_size() + m.weight.SCB.numel() * m.weight.SCB.element_size()
                   for m in layers)
    assert layers and all(m.weight.dtype == torch.int8 and m.weight.SCB.dtype == torch.float32 for m in layers)
    est = estimate(resolve_model("tiny-llama"), TrainingSetup(backend="native", peft="lora", quant="int8"))
    assert est.ranks[0].params_by_dtype["int8"] == measured


def test_context_parallel_rules_and_terms():
    """--cp: the engine's head rule (parallel/dims.py), the seq-len rule, the native backend only; activations are
    the chunk's (measured halving at cp2: tests/distributed/test_context_parallel.py), ZeRO shards over dp x cp,
    and kv heads that do not divide cp are replicated (their extra bytes and the all-to-all buffers counted)."""
    llama = resolve_model("tiny-llama")  # 4 heads, 2 kv heads
    with pytest.raises(ConfigError, match=r"parallel.cp=8: the all-to-all over heads needs num_attention_heads=4 "
                                          r"divisible by cp x tp = 8; use parallel.cp in 1, 2, 4"):
        estimate(llama, TrainingSetup(cp=8, seq_len=256, backend="native"))
    with pytest.raises(ConfigError, match=r"--seq-len=250 must be divisible by --cp=4"):
        estimate(llama, TrainingSetup(cp=4, seq_len=250, backend="native"))
    with pytest.raises(ConfigError, match="--cp=2: context parallel runs on the native backend"):
        estimate(llama, TrainingSetup(cp=2, seq_len=256, backend="deepspeed"))
    one, two = (estimate(llama, TrainingSetup(cp=cp, dp=1, zero=1, seq_len=256, micro_batch=2, precision="fp32",
                                              backend="native")).ranks[0] for cp in (1, 2))
    assert two.activations == one.activations / 2 and two.logits == one.logits / 2
    assert two.optimizer_states == one.optimizer_states / 2  # ZeRO-1 over dp x cp = 2 ranks
    # cp2: 2 kv heads divide cp, nothing replicated; all-to-all send + receive of q, k, v (4 + 2 + 2 heads of 16)
    assert two.comm_buffers - two.grads == 2 * 2 * 128 * (4 + 2 + 2) * 16 * 4
    four = estimate(llama, TrainingSetup(cp=4, seq_len=256, micro_batch=2, precision="fp32", backend="native")).ranks[0]
    quarter = one.activations / 4
    layers, replicated_kv = 4, 2 * 64 * 2 * (4 - 2) * 16 * 4  # tokens x (k, v) x extra heads x head_dim x fp32
    assert four.activations == quarter + layers * replicated_kv
    from trellis.parallel.context_parallel import cp_family_errors

    assert cp_family_errors("llama", 2) == [] and cp_family_errors("bloom", 1) == []
    assert "context parallel is not supported for the bloom family" in cp_family_errors("bloom", 2)[0]
