"""Document packing under every layout: hand-built packed batches (2-3 samples per row, -100 at each sample's last
token and at padding) trained 3 steps with `backend.train_step` equal a 1-process reference that runs every sample
ALONE through the plain HF model (or HF + peft's public API), no mask, same global-token normaliser, plain AdamW.
Cross-sample attention or positions that do not restart per sample move the losses by ~1e-1.
"""

from __future__ import annotations

import pytest

from tests.support.packing import global_batches, reference_losses
from trellis import configs
from trellis.engine.model import build_model
from trellis.parallel.models import family_for

from .harness import run_ranks
from .packing_workers import packed_train
from .peft_support import reference_model

pytestmark = pytest.mark.distributed

BASE = {"parallel.dp": 1, "parallel.pp": 1, "parallel.tp": 1, "train.eps": 1e-6, "train.steps": 3,
        "train.micro_batch_size": 2, "train.grad_accum": 2, "train.lr": 3e-3,
        "train.schedule": "constant", "train.warmup_steps": 0, "train.weight_decay": 0.0, "train.grad_clip": 1.0,
        "data.seq_len": 32, "logging.progress": "none"}
PROMPT = {"peft.num_virtual_tokens": 4, "train.lr": 1e-2}
LORA = {"peft.method": "lora", "peft.r": 4, "peft.alpha": 8.0, "train.lr": 1e-2}

CASES_2 = {
    "dp2 zero1": {"parallel.dp": 2, "zero.stage": 1},
    "dp2 zero3 left-padded (attention_mask) +full ckpt": ({"parallel.dp": 2, "zero.stage": 3,
                                                   "activation_checkpointing.mode": "full"}, True),
    "dp2 DeepSpeed zero2": {"parallel.dp": 2, "zero.backend": "deepspeed", "zero.stage": 2},
    "tp2 sequence_parallel": {"parallel.tp": 2, "parallel.sequence_parallel": True},
    "pp2 1f1b": {"parallel.pp": 2},
    "pp2 bloom (alibi) gpipe": {"parallel.pp": 2, "parallel.pp_schedule": "gpipe", "model.path": "tiny-bloom"},
    "dp2 prompt tuning": {"parallel.dp": 2, "peft.method": "prompt", **PROMPT},
    "pp2 prompt tuning +full ckpt": {"parallel.pp": 2, "peft.method": "prompt", "activation_checkpointing.mode": "full",
                                     **PROMPT},
    # zero bubble: segment/position ids travel with the activations through the V (stages 0,3 | 1,2); the
    # virtual tokens' embedding trains on rank 0, whose first stage runs its whole backward in the weight pass
    "pp2 zbv prompt tuning +full ckpt": {"parallel.pp": 2, "parallel.pp_schedule": "zbv", "peft.method": "prompt",
                                         "activation_checkpointing.mode": "full", **PROMPT},
    "pp2 interleaved_zb": {"parallel.pp": 2, "parallel.pp_schedule": "interleaved_zb"},
    "dp2 prefix tuning": {"parallel.dp": 2, "peft.method": "prefix", **PROMPT},
    "pp2 prefix tuning": {"parallel.pp": 2, "peft.method": "prefix", **PROMPT},
    # context parallel: the full sequence's block-causal mask in the all-to-all kernel, global positions per chunk
    "cp2": {"parallel.cp": 2},
    "cp2 qwen3": {"parallel.cp": 2, "model.path": "tiny-qwen3"},
    "cp2 gpt2 (learned positions) left-padded": ({"parallel.cp": 2, "model.path": "tiny-gpt2"}, True),
    "cp2 neox (partial rotary)": {"parallel.cp": 2, "model.path": "tiny-neox"},
    "cp2 opt": {"parallel.cp": 2, "model.path": "tiny-opt"},
    "cp2 phi3": {"parallel.cp": 2, "model.path": "tiny-phi3"},
}
CASES_4 = {"dp2·tp2 LoRA": {"parallel.dp": 2, "parallel.tp": 2, **LORA},
           "cp2·tp2 LoRA": {"parallel.cp": 2, "parallel.tp": 2, **LORA},
           "pp2·cp2 zero3": {"parallel.pp": 2, "parallel.cp": 2, "zero.stage": 3}}
CASES_8 = {"dp2·pp2·tp2 zero3": {"parallel.dp": 2, "parallel.pp": 2, "parallel.tp": 2, "zero.stage": 3}}


def _scenarios(cases: dict) -> list[dict]:
    out = []
    for ov in cases.values():
        ov, pad = ov if isinstance(ov, tuple) else (ov, False)
        out.append({"overrides": {**BASE, **ov}, "pad": pad})
    return out


def _reference(sc: dict) -> list[float]:
    cfg = configs.load("tiny-llama", sc["overrides"])
    if cfg.peft.method == "none":
        model, _ = build_model(cfg.model, seed=cfg.train.seed)
    else:
        model, _ = reference_model(cfg, family_for("llama").default_lora_targets)  # LoRA cases run llama
    n_virtual = cfg.peft.num_virtual_tokens if cfg.peft.method in ("prompt", "ptuning") else 0
    batches = global_batches(cfg, model.config.vocab_size, 3, pad=sc["pad"])
    return reference_losses(model, cfg, batches, n_virtual)


def _check(world: int, cases: dict) -> None:
    scenarios = _scenarios(cases)
    ranks = run_ranks(world, packed_train, scenarios, timeout=600)
    worst = {}
    for i, label in enumerate(cases):
        ref = _reference(scenarios[i])
        got = ranks[0][i]
        worst[label] = max(abs(a - b) for a, b in zip(got, ref))
        print(f"{label}: losses {[round(x, 5) for x in got]}, max |Δloss| vs samples alone {worst[label]:.1e}")
    assert all(len(ranks[0][i]) == 3 for i in range(len(cases)))
    assert max(worst.values()) <= 1e-5, worst


def test_packed_batches_on_2_ranks():
    _check(2, CASES_2)


def test_packed_batches_lora_on_4_ranks():
    _check(4, CASES_4)


def test_packed_batches_3d_on_8_ranks():
    _check(8, CASES_8)
