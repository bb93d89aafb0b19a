"""LoRA DPO (train.objective='dpo', engine/dpo.py) on real gloo ranks against a 1-process reference written
here from the DPO formula: HF + peft's get_peft_model with trellis' adapter seed, the reference log-probs under
`model.disable_adapter()`, torch's AdamW, the same global batches of preference pairs.

One 2-rank launch: dp2 and pp2 through the API, dp2 through the CLI's Trainer (metrics JSONL), a plain
LoRA SFT engine of the dp2 layout for the parameter-bytes comparison, and full fine-tuning DPO under dp2
ZeRO-3 with its frozen reference Engine (reference: a frozen deepcopy of the initial HF model). One 4-rank
launch: LoRA dp2·tp2 ZeRO-3 likewise.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trellis import configs
from trellis.parallel.models import family_for

from .harness import run_ranks
from .peft_support import BASE, reference_loop, reference_model

pytestmark = pytest.mark.distributed

STEPS = 3
TOL = 1e-5
TARGETS = family_for("llama").default_lora_targets
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "fish"]


def write_pairs(path: Path, n: int = 32) -> Path:
    with path.open("w") as f:
        for i in range(n):
            a, b, c = WORDS[i % 12], WORDS[(3 * i + 1) % 12], WORDS[(5 * i + 2) % 12]
            f.write(json.dumps({"prompt": f"Q{i}: name a {a} thing.", "chosen": f" A {b} {a} {c}.",
                                "rejected": f" No {c} {b}" + " really" * (i % 3)}) + "\n")
    return path


def dpo_overrides(tmp: Path, **layout) -> dict:
    return {**BASE, "train.objective": "dpo", "train.dpo_beta": 0.5, "data.type": "preference",
            "data.path": str(tmp / "pairs.jsonl"), "data.cache_dir": str(tmp / "cache"), **layout}


# ---- inside the ranks ------------------------------------------------------------------------------------
def dpo_scenarios(rank: int, world: int, scenarios: list[dict]) -> list[dict]:
    import trellis
    from trellis.engine.distributed import init_distributed
    from trellis.engine.dpo import DPO
    from trellis.engine.trainer import Trainer

    out = []
    for sc in scenarios:
        cfg = trellis.load_config("tiny-llama", [f"--{k}={v}" for k, v in sc["overrides"].items()])
        if sc.get("cli"):
            Trainer(cfg, init_distributed(120.0)).train()
            recs = [json.loads(x) for x in Path(cfg.logging.metrics_file).read_text().splitlines()] if rank == 0 else []
            out.append({"records": recs})
            continue
        engine = trellis.initialize(cfg)
        if sc.get("sft"):  # a plain LoRA engine of the same layout: only its parameter bytes
            out.append({"param_bytes": engine.backend.memory_report()["params"]})
            continue
        dpo = DPO(engine)
        res = {"losses": [], "margins": [], "accuracies": []}
        first = None
        for mbs in engine.batches():
            first = first or mbs
            r = dpo.train_step(mbs)
            res["losses"].append(r.step.loss)
            res["margins"].append(r.reward_margin)
            res["accuracies"].append(r.reward_accuracy)
        res["eval_first"] = dpo.eval_loss(first)  # the trained policy's DPO loss on step 1's batch
        res["param_bytes"] = engine.backend.memory_report()["params"]
        if dpo.reference is not None:  # full fine-tuning: the frozen reference, sharded like the policy
            rep = dpo.reference.backend.memory_report()
            res["ref_param_bytes"], res["ref_optimizer_bytes"] = rep["params"], rep["optimizer_states"]
            res["ref_trainable"] = sum(p.requires_grad for p in dpo.reference.model.parameters())
        out.append(res)
    return out


# ---- the 1-process reference (HF + peft, the DPO formula) -----------------------------------------------
def response_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    mask = labels != -100
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return torch.where(mask, lp, torch.zeros_like(lp)).sum(-1)


def reference_dpo(overrides: dict) -> dict:
    cfg = configs.load("tiny-llama", overrides)
    beta = cfg.train.dpo_beta
    if cfg.peft.method == "none":  # full fine-tuning: a frozen copy of the initial model is the reference
        from trellis.engine.model import build_model

        model, model_dir = build_model(cfg.model, seed=cfg.train.seed)
        frozen = copy.deepcopy(model).requires_grad_(False)
        ref_model, disabled = frozen, contextlib.nullcontext
    else:
        model, model_dir = reference_model(cfg, TARGETS)
        ref_model, disabled = model, model.disable_adapter
    sampler, params, opt = reference_loop(cfg, model, model_dir)
    def dpo_loss(batches, train: bool):
        pairs = sum(b.input_ids.shape[0] // 2 for b in batches)
        total, margins = 0.0, []
        for b in batches:
            n = b.input_ids.shape[0] // 2
            with torch.no_grad(), disabled():
                ref = response_logps(ref_model(input_ids=b.input_ids).logits, b.labels)
            with torch.set_grad_enabled(train):
                pol = response_logps(model(input_ids=b.input_ids).logits, b.labels)
                margin = beta * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))
                loss = -F.logsigmoid(margin).sum() / pairs
            if train:
                loss.backward()
            total += loss.item()
            margins.append(margin.detach())
        return total, torch.cat(margins)

    out = {"losses": [], "margins": [], "accuracies": []}
    first = None
    for _ in range(STEPS):
        batches = sampler.next()
        first = first or batches
        total, m = dpo_loss(batches, train=True)
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["losses"].append(total)
        out["margins"].append(m.mean().item())
        out["accuracies"].append((m > 0).float().mean().item())
    out["eval_first"] = dpo_loss(first, train=False)[0]
    return out


def check_against_reference(name: str, got: dict, ref: dict) -> float:
    assert abs(got["losses"][0] - math.log(2)) <= 1e-6, (name, got["losses"][0])  # B = 0: policy == reference
    assert got["margins"][0] == 0.0 and got["accuracies"][0] == 0.0, name
    d = max(abs(a - b) for a, b in zip(got["losses"], ref["losses"]))
    dm = max(abs(a - b) for a, b in zip(got["margins"], ref["margins"]))
    de = abs(got["eval_first"] - ref["eval_first"])
    print(f"{name}: max |Δloss| = {d:.2e}, max |Δmargin| = {dm:.2e}, |Δeval| = {de:.2e} "
          "vs the 1-process DPO reference")
    assert len(got["losses"]) == STEPS and d <= TOL and dm <= TOL, (name, got, ref)
    assert got["accuracies"] == pytest.approx(ref["accuracies"], abs=1e-12), name
    assert de <= TOL, (name, got["eval_first"], ref["eval_first"])
    assert ref["losses"][-1] < ref["losses"][0] - 1e-4, ref  # the steps move the policy: a real comparison
    return d


def test_dpo_lora_dp2_pp2_cli_and_full_zero3_equal_the_reference(tmp_path):
    write_pairs(tmp_path / "pairs.jsonl")
    dp2 = dpo_overrides(tmp_path, **{"parallel.dp": 2})
    pp2 = dpo_overrides(tmp_path, **{"parallel.pp": 2})
    cli = {**dp2, "logging.metrics_file": str(tmp_path / "m.jsonl")}
    sft = {**dp2, "train.objective": "causal_lm"}
    full = dpo_overrides(tmp_path, **{"parallel.dp": 2, "zero.stage": 3, "peft.method": "none", "train.lr": 1e-3})
    results = run_ranks(2, dpo_scenarios, [{"overrides": dp2}, {"overrides": pp2}, {"overrides": cli, "cli": True},
                                           {"overrides": sft, "sft": True}, {"overrides": full}], timeout=300)
    r0 = results[0]
    for i, name, ov in ((0, "dp2", dp2), (1, "pp2", pp2), (4, "full dp2 zero3", full)):  # pp2: dp1's global batch
        check_against_reference(name, r0[i], reference_dpo(ov))
        assert results[1][i]["losses"] == r0[i]["losses"], name
    recs = r0[2]["records"]
    assert [r["loss"] for r in recs] == r0[0]["losses"]  # the CLI runs the API's DPO step
    assert [r["reward_margin"] for r in recs] == r0[0]["margins"]
    assert [r["reward_accuracy"] for r in recs] == r0[0]["accuracies"]
    for r in results:  # no second copy of the base: the LoRA-DPO rank holds what a LoRA SFT rank holds
        assert r[0]["param_bytes"] == r[3]["param_bytes"] > 0, (r[0]["param_bytes"], r[3]["param_bytes"])
        f = r[4]  # full fine-tuning: the reference is the policy's ZeRO-3 shard again, frozen, with no optimizer state
        assert f["ref_param_bytes"] == f["param_bytes"] > 0
        assert f["ref_optimizer_bytes"] == 0 and f["ref_trainable"] == 0
        assert f["losses"] == r0[4]["losses"]


def test_lora_dpo_dp2_tp2_zero3_equals_the_reference(tmp_path):
    write_pairs(tmp_path / "pairs.jsonl")
    ov = dpo_overrides(tmp_path, **{"parallel.dp": 2, "parallel.tp": 2, "zero.stage": 3})
    results = run_ranks(4, dpo_scenarios, [{"overrides": ov},
                                           {"overrides": {**ov, "train.objective": "causal_lm"}, "sft": True}],
                        timeout=300)
    check_against_reference("dp2·tp2 zero3", results[0][0], reference_dpo(ov))
    for r in results:
        assert r[0]["losses"] == results[0][0]["losses"]
        assert r[0]["param_bytes"] == r[1]["param_bytes"] > 0
