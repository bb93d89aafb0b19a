"""LoRA under the DeepSpeed backend (issue 6 item 5): only the trainable adapter parameters reach DeepSpeed's
optimizer, at ZeRO 1, 2, 3 and ZeRO-3 + CPU offload, on 2 real gloo ranks (tiny Llama, fp32).

One 2-rank launch runs the native LoRA dp2 run and DeepSpeed ZeRO 1/2/3; the CPU-offload case (needs the
cpu_adam op) has its own launch, marked integration. Checks per run: losses over 3 steps equal the native
backend's and the 1-process peft reference's (<= 1e-5); the parameters DeepSpeed's ZeRO optimizer holds are
exactly the adapters (names), whose count equals the reference peft model's trainable count; optimizer
state + fp32 master bytes on each rank == 12 × adapter params / dp (+ partition padding); no frozen base
parameter holds a gradient after the last step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from trellis.parallel.models import family_for

from .harness import run_ranks
from .peft_support import BASE, reference_model, reference_run
from .test_deepspeed import _assert_optimizer_bytes, _max_diff

pytestmark = pytest.mark.distributed
TARGETS = family_for("llama").default_lora_targets
DP2 = {**BASE, "parallel.dp": 2}


def _zero_optimizer_params(optimizer) -> list:
    """The model parameters DeepSpeed's ZeRO optimizer partitions and updates (ZeRO-1/2: bit16_groups,
    ZeRO-3: fp16_groups)."""
    groups = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "fp16_groups", None)
    assert groups, f"no parameter groups found on {type(optimizer).__name__}"
    return [p for g in groups for p in g]


def lora_scenarios(rank: int, world: int, scenarios: list[dict]) -> list[dict]:
    """Several LoRA trainings in one process group; per scenario the metric records, the memory report,
    trainable names/count, the names of the parameters in DeepSpeed's optimizer and the frozen parameters
    that hold a gradient after training."""
    from trellis import configs
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import Trainer

    ctx = init_distributed(300.0)
    out = []
    for sc in scenarios:
        cfg = configs.load("tiny-llama", dict(sc["overrides"]))
        trainer = Trainer(cfg, ctx)
        trainer.train()
        be = trainer.backend
        records = [json.loads(x) for x in Path(cfg.logging.metrics_file).read_text().splitlines()] if rank == 0 else []
        module = be.module
        names = {id(p): n for n, p in module.named_parameters()}
        trainable = [n for n, _ in be.trainable_named_parameters()]
        res = {"records": records, "memory": be.memory_report(), "trainable": trainable,
               "n_trainable": sum(getattr(p, "ds_numel", p.numel()) for _, p in be.trainable_named_parameters()),
               "base_with_grad": [n for n, p in module.named_parameters() if not p.requires_grad and p.grad is not None],
               "n_frozen": sum(1 for p in module.parameters() if not p.requires_grad)}
        if cfg.zero.backend == "deepspeed":
            res["optimizer_params"] = [names[id(p)] for p in _zero_optimizer_params(be.optimizer)]
            res["optimizer_type"] = type(be.optimizer.optimizer).__name__
        out.append(res)
        del trainer
    return out


def _ov(tmp: Path, name: str, **extra) -> dict:
    return {**DP2, "logging.metrics_file": str(tmp / f"{name}.jsonl"), **extra}


@pytest.fixture(scope="module")
def reference():
    """The 1-process peft reference (HF + peft + torch AdamW) and its adapter parameter count."""
    from trellis import configs

    cfg = configs.load("tiny-llama", DP2)
    losses, *_ = reference_run(cfg, TARGETS, DP2["train.steps"])
    ref, _ = reference_model(cfg, TARGETS)
    return {"losses": losses, "n_adapter": sum(p.numel() for p in ref.parameters() if p.requires_grad),
            "adapter_names": sorted(n for n, p in ref.named_parameters() if p.requires_grad)}


def _check(results: dict, reference: dict, label: str) -> None:
    native = [r["loss"] for r in results["native"][0]["records"]]
    d_ref = _max_diff(native, reference["losses"])
    print(f"native LoRA dp2 vs 1-process peft reference: max |Δloss| = {d_ref:.2e}")
    assert d_ref <= 1e-5
    for name, per_rank in results.items():
        if name == "native":
            continue
        losses = [r["loss"] for r in per_rank[0]["records"]]
        d = _max_diff(losses, native)
        print(f"{label} {name}: losses {losses}, max |Δloss| vs native {d:.2e}, vs reference "
              f"{_max_diff(losses, reference['losses']):.2e}")
        assert d <= 1e-5, (name, losses, native)
        for rank, res in enumerate(per_rank):
            # trainable = the adapters: the engine's count equals the reference peft model's
            assert res["n_trainable"] == reference["n_adapter"], (res["n_trainable"], reference["n_adapter"])
            assert all(".lora_A." in n or ".lora_B." in n for n in res["trainable"])
            # DeepSpeed's ZeRO optimizer holds exactly the adapters, no base weight
            assert sorted(res["optimizer_params"]) == sorted(res["trainable"]), res["optimizer_params"]
            assert res["n_frozen"] > 0 and res["base_with_grad"] == [], res["base_with_grad"]
            _assert_optimizer_bytes({"memory": res["memory"], "n_trainable": reference["n_adapter"]}, 2,
                                    f"{label} {name} rank{rank} ({res['optimizer_type']})")


def test_lora_deepspeed_zero_1_2_3_adapters_only(tmp_path, reference):
    cases = {"native": _ov(tmp_path, "native"),
             **{f"ds-z{z}": _ov(tmp_path, f"ds-z{z}", **{"zero.backend": "deepspeed", "zero.stage": z})
                for z in (1, 2, 3)}}
    per_rank = run_ranks(2, lora_scenarios, [{"overrides": ov} for ov in cases.values()], timeout=900)
    results = {n: [per_rank[r][i] for r in range(2)] for i, n in enumerate(cases)}
    _check(results, reference, "LoRA")


@pytest.mark.integration
def test_lora_deepspeed_zero3_cpu_offload_adapters_only(tmp_path, reference):
    """Needs the cpu_adam op (python -m trellis.engine.backends.ds_ops build): DeepSpeedCPUAdam on the adapters."""
    from trellis.engine.backends import ds_ops

    os.environ["TORCH_EXTENSIONS_DIR"] = str(ds_ops.use_project_extensions_dir())
    cases = {"native": _ov(tmp_path, "native"),
             "ds-z3-offload-cpu": _ov(tmp_path, "ds-z3-cpu", **{"zero.backend": "deepspeed", "zero.stage": 3,
                                                                 "zero.offload_optimizer": "cpu"})}
    per_rank = run_ranks(2, lora_scenarios, [{"overrides": ov} for ov in cases.values()], timeout=900)
    results = {n: [per_rank[r][i] for r in range(2)] for i, n in enumerate(cases)}
    assert results["ds-z3-offload-cpu"][0]["optimizer_type"] == "DeepSpeedCPUAdam"
    _check(results, reference, "LoRA")
