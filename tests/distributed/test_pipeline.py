"""Pipeline parallel (torch.distributed.pipelining) alone and composed into 3D layouts: numerics equal the
1-process HF reference. A non-causal stage (the HF eager + mask=None pitfall) would fail these."""

from __future__ import annotations

import pytest
import torch

from trellis import configs
from trellis.parallel.hf_surgery import to_hf_state_dict
from trellis.parallel.pipeline import split_layers

from .harness import run_ranks
from .pipeline_workers import pipeline_checks
from .reference import reference_run
from .test_tensor_parallel import NEW_EPS
from .workers import train_scenarios

pytestmark = pytest.mark.distributed

# eps=1e-6: see test_tensor_parallel.py (keeps Adam's sign-of-noise updates at rounding level)
EXACT = {"train.eps": 1e-6, "train.steps": 3, "train.micro_batch_size": 1, "train.grad_accum": 4, "train.lr": 3e-3,
         "train.schedule": "constant", "train.warmup_steps": 0, "train.weight_decay": 0.0, "train.grad_clip": 1.0,
         "data.seq_len": 64, "logging.progress": "none"}
MT = {"tiny-llama": "llama", "tiny-gpt2": "gpt2", "tiny-opt": "opt", "tiny-bloom": "bloom", "tiny-neox": "gpt_neox",
      "tiny-qwen3": "qwen3", "tiny-phi3": "phi3", "tiny-gemma2": "gemma2"}


def _assert_matches_reference(world, cases, tmp_path, timeout=600, extra_scenarios=()):
    """`extra_scenarios` run in the same process group after the reference cases (not compared here)."""
    scenarios = [{"overrides": {**EXACT, **ov, "logging.metrics_file": str(tmp_path / f"{i}.jsonl")}}
                 for i, ov in enumerate(cases.values())]
    ranks = run_ranks(world, train_scenarios, [*scenarios, *extra_scenarios], timeout=timeout)
    for i, label in enumerate(cases):
        ov = scenarios[i]["overrides"]
        out = ranks[0][i]
        ref_losses, ref_state = reference_run(configs.load("tiny-llama", ov), 3)
        losses = [r["loss"] for r in out["records"]]
        state = to_hf_state_dict(out["state"], MT[ov.get("model.path", "tiny-llama")])
        assert set(state) >= set(ref_state) - {"lm_head.weight"}, label
        dl = max(abs(a - b) for a, b in zip(losses, ref_losses))
        dw = max((state[k] - v).abs().max().item() for k, v in ref_state.items() if k in state)
        print(f"{label}: max |Δloss| {dl:.2e}, max |Δw| {dw:.2e}")
        assert len(losses) == 3 and dl <= 1e-5 and dw <= 1e-5, label
    return ranks


def test_pp2_schedules_families_and_splits(tmp_path):
    cases = {
        "pp2 llama 1f1b": {"parallel.dp": 1, "parallel.pp": 2},
        "pp2 llama gpipe": {"parallel.dp": 1, "parallel.pp": 2, "parallel.pp_schedule": "gpipe"},
        "pp2 llama split=params +full ckpt": {"parallel.dp": 1, "parallel.pp": 2, "parallel.pp_split": "params",
                                              "activation_checkpointing.mode": "full"},
        "pp2 llama split=1 (1+3 layers)": {"parallel.dp": 1, "parallel.pp": 2, "parallel.pp_split": "1"},
        "pp2 gpt2 (tied embeddings)": {"parallel.dp": 1, "parallel.pp": 2, "model.path": "tiny-gpt2"},
        "pp2 opt (tied)": {"parallel.dp": 1, "parallel.pp": 2, "model.path": "tiny-opt"},
        "pp2 bloom (alibi, tied)": {"parallel.dp": 1, "parallel.pp": 2, "model.path": "tiny-bloom"},
        "pp2 neox (partial rotary)": {"parallel.dp": 1, "parallel.pp": 2, "model.path": "tiny-neox"},
        # Adam eps 1e-5 for the new families: see NEW_EPS in test_tensor_parallel.py
        "pp2 qwen3 (q/k norms)": {"parallel.dp": 1, "parallel.pp": 2, "model.path": "tiny-qwen3", **NEW_EPS},
        "pp2 phi3 (fused qkv / gate_up)": {"parallel.dp": 1, "parallel.pp": 2, "model.path": "tiny-phi3", **NEW_EPS},
        # eager attention (explicit causal mask in the stages), final-logit softcap on the last stage, tied
        "pp2 gemma2 (softcaps, scaled embedding, tied)": {"parallel.dp": 1, "parallel.pp": 2,
                                                          "model.path": "tiny-gemma2", **NEW_EPS},
    }
    ranks = _assert_matches_reference(2, cases, tmp_path)
    # tied copies on the first and last stage stay identical after the optimizer steps
    i = list(cases).index("pp2 gpt2 (tied embeddings)")
    st = ranks[0][i]["state"]
    assert (st["transformer.wte.weight"] - st["lm_head.weight"]).abs().max() == 0


def test_pp2_tp2_and_dp2_pp2(tmp_path):
    cases = {
        "pp2·tp2 llama": {"parallel.dp": 1, "parallel.pp": 2, "parallel.tp": 2},
        "pp2·tp2 bloom": {"parallel.dp": 1, "parallel.pp": 2, "parallel.tp": 2, "model.path": "tiny-bloom"},
        "pp2·tp2 gpt2 (tied, vocab-parallel)": {"parallel.dp": 1, "parallel.pp": 2, "parallel.tp": 2,
                                                "model.path": "tiny-gpt2"},
        "dp2·pp2 llama zero1": {"parallel.dp": 2, "parallel.pp": 2, "zero.stage": 1, "train.grad_accum": 2},
        "dp2·pp2 llama zero3": {"parallel.dp": 2, "parallel.pp": 2, "zero.stage": 3, "train.grad_accum": 2},
        "dp2·pp2 llama zero0": {"parallel.dp": 2, "parallel.pp": 2, "zero.stage": 0, "train.grad_accum": 2},
        "dp2·pp2 bloom zero2 +full ckpt": {"parallel.dp": 2, "parallel.pp": 2, "zero.stage": 2, "train.grad_accum": 2,
                                           "model.path": "tiny-bloom", "activation_checkpointing.mode": "full"},
    }
    _assert_matches_reference(4, cases, tmp_path)


def test_3d_dp2_pp2_tp2_on_8_ranks(tmp_path):
    cases = {
        "dp2·pp2·tp2 llama zero0": {"parallel.dp": 2, "parallel.pp": 2, "parallel.tp": 2, "train.grad_accum": 2},
        "dp2·pp2·tp2 llama zero2 +selective ckpt": {"parallel.dp": 2, "parallel.pp": 2, "parallel.tp": 2,
                                                   "train.grad_accum": 2, "zero.stage": 2,
                                                   "activation_checkpointing.mode": "selective"},
        "dp2·pp2·tp2 llama zero1": {"parallel.dp": 2, "parallel.pp": 2, "parallel.tp": 2, "train.grad_accum": 2,
                                    "zero.stage": 1},
        "dp2·pp2·tp2 bloom zero3": {"parallel.dp": 2, "parallel.pp": 2, "parallel.tp": 2, "train.grad_accum": 2,
                                    "zero.stage": 3, "model.path": "tiny-bloom"},
    }
    _assert_matches_reference(8, cases, tmp_path, timeout=900)


INTERLEAVED = {"parallel.pp": 2, "parallel.pp_schedule": "interleaved_1f1b"}  # 4 layers -> 4 stages, 2 per rank


def test_pp2_interleaved_1f1b_and_zero_bubble_trainer_and_same_layout_resume(tmp_path):
    """Interleaved 1F1B through the trainer: rank 0 runs stages 0 and 2, rank 1 stages 1 and 3 (one layer
    each); optimizer, clipping and checkpoints see both through one module with the original names. Then
    4 steps saving at step 2 vs a resume from that step-2 checkpoint: steps 3-4 and the weights bit-identical.
    The zero-bubble schedules (split input/weight backward) with activation checkpointing, and DualPipeV on
    GPT-2, whose V placement puts both copies of the tied embedding on rank 0 (stages 0 and 3): their grads add
    locally and the gradient norm that clipping uses counts the weight once."""
    cases = {
        "pp2 interleaved llama": {"parallel.dp": 1, **INTERLEAVED},
        "pp2 interleaved llama +full ckpt": {"parallel.dp": 1, **INTERLEAVED, "activation_checkpointing.mode": "full"},
        "pp2 interleaved gpt2 (tied)": {"parallel.dp": 1, **INTERLEAVED, "model.path": "tiny-gpt2"},
        "pp2 interleaved_zb llama +full ckpt": {"parallel.dp": 1, "parallel.pp": 2, "parallel.pp_schedule":
                                                "interleaved_zb", "activation_checkpointing.mode": "full"},
        "pp2 zbv llama +selective ckpt": {"parallel.dp": 1, "parallel.pp": 2, "parallel.pp_schedule": "zbv",
                                          "activation_checkpointing.mode": "selective"},
        "pp2 dualpipev gpt2 (tied, both copies on rank 0)": {"parallel.dp": 1, "parallel.pp": 2,
                                                             "parallel.pp_schedule": "dualpipev",
                                                             "model.path": "tiny-gpt2"},
    }
    a, b = tmp_path / "ck_straight", tmp_path / "ck_resumed"
    common = {**EXACT, "parallel.dp": 1, **INTERLEAVED, "train.steps": 4, "checkpoint.keep_last_k": 5}
    resume = [
        {"overrides": {**common, "checkpoint.dir": str(a), "checkpoint.interval": 2,
                       "logging.metrics_file": str(tmp_path / "straight.jsonl")}},
        {"overrides": {**common, "checkpoint.dir": str(b), "checkpoint.resume": str(a / "step-2"),
                       "logging.metrics_file": str(tmp_path / "resumed.jsonl")}},
    ]
    ranks = _assert_matches_reference(2, cases, tmp_path, extra_scenarios=resume)
    for label in ("pp2 interleaved gpt2 (tied)", "pp2 dualpipev gpt2 (tied, both copies on rank 0)"):
        st = ranks[0][list(cases).index(label)]["state"]
        assert (st["transformer.wte.weight"] - st["lm_head.weight"]).abs().max() == 0, label
    # both virtual stages' parameters are in this rank's module and its memory report: the two ranks'
    # fp32 bytes add up to the HF model's, Adam state to twice that
    from trellis.engine.model import build_model

    hf, _ = build_model(configs.load("tiny-llama", {}).model, seed=0)
    model_bytes = 4 * sum(p.numel() for p in hf.parameters())
    for r in (0, 1):
        names = set(ranks[r][0]["param_dtypes"])
        layers = sorted({n.split(".")[2] for n in names if n.startswith("model.layers.")})
        assert layers == (["0", "2"] if r == 0 else ["1", "3"]), (r, layers)
        print(f"rank {r}: layers {layers}, params {ranks[r][0]['memory']['params']} B, "
              f"optimizer {ranks[r][0]['memory']['optimizer_states']} B (model {model_bytes} B)")
    assert sum(ranks[r][0]["memory"]["params"] for r in (0, 1)) == model_bytes
    assert sum(ranks[r][0]["memory"]["optimizer_states"] for r in (0, 1)) == 2 * model_bytes
    straight, resumed = ranks[0][len(cases)], ranks[0][len(cases) + 1]
    s_loss = {r["step"]: r["loss"] for r in straight["records"]}
    r_loss = {r["step"]: r["loss"] for r in resumed["records"]}
    assert sorted(s_loss) == [1, 2, 3, 4] and sorted(r_loss) == [3, 4], r_loss
    assert resumed["summary"]["resumed_from"] == str(a / "step-2")
    dl = max(abs(r_loss[k] - s_loss[k]) for k in (3, 4))
    dw = max((straight["state"][k] - v).abs().max().item() for k, v in resumed["state"].items())
    print(f"pp2 interleaved resume at step 2: steps 3-4 max |Δloss| {dl:.2e}, final max |Δw| {dw:.2e}")
    assert set(straight["state"]) == set(resumed["state"])
    assert dl == 0.0 and dw == 0.0  # bit-identical fp32


def test_interleaved_1f1b_dp2_pp2_zero1_zero3_and_pp2_tp2_and_zbv_tp2(tmp_path):
    cases = {
        "pp2·tp2 interleaved llama": {"parallel.dp": 1, **INTERLEAVED, "parallel.tp": 2},
        "dp2·pp2 interleaved llama zero1": {"parallel.dp": 2, **INTERLEAVED, "zero.stage": 1, "train.grad_accum": 2},
        "dp2·pp2 interleaved llama zero3": {"parallel.dp": 2, **INTERLEAVED, "zero.stage": 3, "train.grad_accum": 2},
        # zero bubble's split backward through DTensor (vocab-parallel head and loss on rank 0's last stage)
        "pp2·tp2 zbv llama": {"parallel.dp": 1, "parallel.pp": 2, "parallel.pp_schedule": "zbv", "parallel.tp": 2},
    }
    _assert_matches_reference(4, cases, tmp_path)


def test_split_layers_modes():
    assert [list(r) for r in split_layers(5, 2, "even")] == [[0, 1, 2], [3, 4]]
    assert [list(r) for r in split_layers(4, 2, "1")] == [[0], [1, 2, 3]]
    # a big embedding on the first stage pushes layers to the last stage
    assert [len(r) for r in split_layers(4, 2, "params", [10] * 4, first_extra=20)] == [1, 3]
    with pytest.raises(Exception, match="parallel.pp_split"):
        split_layers(4, 2, "3,1")


def test_pipeline_api_grads_equal_reference_per_fqn():
    """build_pipeline alone on 2 gloo ranks: loss, per-FQN grads and two SGD steps equal the unsharded model;
    every stage is causal; GPT-2's tied copies stay bit-identical. One spawned group for all checks."""
    cases = [("tiny-llama", "gpipe", True), ("tiny-llama", "1f1b", True), ("tiny-llama", "interleaved_1f1b", True),
             ("tiny-gpt2", "1f1b", True), ("tiny-gpt2", "interleaved_1f1b", True),
             ("tiny-opt", "1f1b", False), ("tiny-bloom", "gpipe", False), ("tiny-neox", "1f1b", False),
             # zero bubble: round-robin ZB1P, DualPipeV (V placement, overlapped F/B pairs), ZBV with GPT-2's tied
             # embedding: both copies on rank 0 (stages 0 and 3), their grads added locally
             ("tiny-llama", "interleaved_zb", True), ("tiny-llama", "dualpipev", True), ("tiny-gpt2", "zbv", True)]
    ranks = run_ranks(2, pipeline_checks, cases, timeout=420)
    for label in ranks[0]:
        first, last = ranks[0][label], ranks[1][label]
        # the two stages partition the model's parameters (the tied head weight is on both)
        assert not (set(first["param_names"]) & set(last["param_names"])) - {"lm_head.weight"}, label
        # the rank running the last stage reports the loss (rank 0 under the V placement of zbv / dualpipev)
        v = label.endswith(("zbv", "dualpipev"))
        assert bool(first["loss_delta"]) == v and bool(last["loss_delta"]) != v, label
        if v:
            first, last = last, first
        dl = max(last["loss_delta"])
        dg = max(max(first["grad_delta"]), max(last["grad_delta"]))
        dw = max(max(first["weight_delta"]), max(last["weight_delta"]))
        dc = max(first["causal_delta"], last["causal_delta"])
        print(f"{label}: |dloss| {dl:.2e}, |dgrad| {dg:.2e}, |dw| {dw:.2e}, causal leak {dc:.2e}")
        assert dl <= 1e-5 and dg <= 1e-5 and dw <= 1e-5, label
        assert dc == 0.0, label
        assert last["eval_delta"] <= 1e-5, label
        if "tied_copy" in first:
            assert torch.equal(first["tied_copy"], last["tied_copy"]), label
        if label == "tiny-gpt2 zbv":
            assert last["tied_local_delta"] == 0.0, label


def test_pipeline_eval_with_eval_batches_not_equal_to_grad_accum(tmp_path):
    """train.eval_batches=3 with grad_accum=4: the pipeline evaluates in rounds of 4 micro-batches (the last
    one filled with label-less micro-batches) and reports the same held-out loss as tp2 (no pipeline) on the
    same trained model (both layouts equal the 1-process reference in the tests above)."""
    base = {**EXACT, "train.eval_batches": 3, "parallel.dp": 1}
    cases = {"tp2": {"parallel.tp": 2}, "pp2 1f1b": {"parallel.pp": 2},
             "pp2 interleaved": {"parallel.pp": 2, "parallel.pp_schedule": "interleaved_1f1b"}}
    scenarios = [{"overrides": {**base, **ov, "logging.metrics_file": str(tmp_path / f"{i}.jsonl")}}
                 for i, ov in enumerate(cases.values())]
    r0 = run_ranks(2, train_scenarios, scenarios, timeout=600)[0]
    evals = {name: out["summary"]["eval_loss"] for name, out in zip(cases, r0)}
    print("held-out loss:", evals)
    assert all(v > 0 for v in evals.values())
    assert abs(evals["pp2 1f1b"] - evals["tp2"]) <= 1e-5 and abs(evals["pp2 interleaved"] - evals["tp2"]) <= 1e-5
