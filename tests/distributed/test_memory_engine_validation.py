"""The memory estimator against the ENGINE's own training runs (issue 9, validation vs measurement).

tests/distributed/test_memory_validation.py checks the estimator against hand-built layouts; this file runs
the real trainer (`workers.train_scenarios`, config "tiny-llama", native backend) and compares, per rank:

- model states from `backend.memory_report()` (live tensors and the live optimizer): params, grads,
  optimizer_states within ±5 % — fp32 and bf16, ZeRO 0-3, dp 1 and 2, full fine-tuning and LoRA (22 layouts);
- activations saved for backward (unique storages seen by `torch.autograd.graph.saved_tensors_hooks`
  around the backend module's forward, parameters and their views excluded, checkpoint inputs included)
  within ±10 % — every case above (fp32, bf16 under autocast and under FSDP2 casting, LoRA, QLoRA,
  checkpointing none / selective / full) and every DeepSpeed case; autocast's 16-bit weight copies
  (counted apart by the meter) against the estimator's buffers line.

Grads and master weights are measured too: `memory_report()` reads the live `.grad` tensors at each step
(before they are freed) and counts as master weights the tensors the optimizer updates that are not the
model's parameters. On the native backend the fp32 trainable params ARE the master weights (engine/amp.py):
the estimator counts them once, under `params` (master_weights = 0), and the measurement finds no other
copy; both are compared like the other states. `test_grads_are_measured_from_live_tensors` drops one
gradient after the step and checks the report sees it (a figure derived from parameter sizes would not).

Every run prints measured vs estimated numbers (pytest -s to see them).
"""

from __future__ import annotations

import pytest
import torch

from .harness import run_ranks
from .workers import train_scenarios

pytestmark = pytest.mark.distributed

# 96 tokens per micro-batch: not a dimension of any tiny-llama weight (see SavedTensorMeter)
BATCH, SEQ = 2, 48
BASE = {"train.steps": 1, "train.micro_batch_size": BATCH, "train.grad_accum": 1, "data.seq_len": SEQ,
        "train.warmup_steps": 0, "logging.progress": "none", "logging.metrics_file": ""}
CASES = {f"{prec} zero{z}": {"precision.dtype": prec, "zero.stage": z} for prec in ("fp32", "bf16") for z in range(4)}
CASES.update({
    "fp32 lora zero0": {"precision.dtype": "fp32", "zero.stage": 0, "peft.method": "lora"},
    "bf16 lora zero0": {"precision.dtype": "bf16", "zero.stage": 0, "peft.method": "lora"},
    "fp32 lora zero3": {"precision.dtype": "fp32", "zero.stage": 3, "peft.method": "lora"},
    "fp32 qlora zero0": {"precision.dtype": "fp32", "zero.stage": 0, "peft.method": "qlora"},
    "bf16 qlora zero0": {"precision.dtype": "bf16", "zero.stage": 0, "peft.method": "qlora"},
    "bf16 lora zero3": {"precision.dtype": "bf16", "zero.stage": 3, "peft.method": "lora"},
    # activation checkpointing: selective (attention recomputed) and full, under autocast and FSDP2 casting
    "fp32 selective zero0": {"precision.dtype": "fp32", "zero.stage": 0, "activation_checkpointing.mode": "selective"},
    "bf16 selective zero0": {"precision.dtype": "bf16", "zero.stage": 0, "activation_checkpointing.mode": "selective"},
    "bf16 selective zero2": {"precision.dtype": "bf16", "zero.stage": 2, "activation_checkpointing.mode": "selective"},
    "fp32 full-ckpt zero0": {"precision.dtype": "fp32", "zero.stage": 0, "activation_checkpointing.mode": "full"},
    "bf16 full-ckpt zero3": {"precision.dtype": "bf16", "zero.stage": 3, "activation_checkpointing.mode": "full"},
    "bf16 lora full-ckpt zero0": {"precision.dtype": "bf16", "zero.stage": 0, "peft.method": "lora",
                                  "activation_checkpointing.mode": "full"},
})
# DeepSpeed backend, dp 2. DeepSpeed's own layout, measured: at ZeRO-2/3 the gradient partition is fp32 (4Ψ/dp,
# not the classic 2Ψ/dp: the 16-bit gradients only pass through the reduce buckets); at ZeRO-0 bf16 runs
# through FP16_UnfusedOptimizer, whose per-parameter fp32 copies are the master weights (4Ψ).
DS_CASES = {f"ds {prec} zero{z}": {"zero.backend": "deepspeed", "precision.dtype": prec, "zero.stage": z}
            for prec in ("fp32", "bf16") for z in range(4)}


def meter_activations(trainer, rank) -> None:
    """Scenario hook: meter what autograd saves during the module's forward; report it in memory_report()."""
    import functools

    from tests.support.memory_measure import SavedTensorMeter

    backend = trainer.backend
    module = backend.module
    peaks: list[int] = []
    copies: list[int] = []
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        meter = SavedTensorMeter.for_model(module)
        with meter.track():
            out = inner(*args, **kwargs)
        peaks.append(meter.peak)
        copies.append(meter.weight_copies)
        return out

    module.forward = forward
    report = backend.memory_report

    def memory_report() -> dict:
        return {**report(), "activations": max(peaks) if peaks else 0, "weight_copies": max(copies) if copies else 0}

    backend.memory_report = memory_report


def _setup(dp: int, ov: dict):
    from trellis.engine.memory.estimator import TrainingSetup

    peft = ov.get("peft.method", "none")
    quant = dict(peft="lora", quant="nf4", double_quant=True) if peft == "qlora" else dict(peft=peft)
    return TrainingSetup(backend=ov.get("zero.backend", "native"), dp=dp, zero=ov["zero.stage"],
                         precision=ov["precision.dtype"], lora_r=8, micro_batch=BATCH, seq_len=SEQ,
                         activation_checkpointing=ov.get("activation_checkpointing.mode", "none"), **quant)


@pytest.fixture(scope="module", params=[1, 2], ids=["dp1", "dp2"])
def runs(request):
    dp = request.param
    scenarios = [{"overrides": {**BASE, "parallel.dp": dp, **ov}, "hook": meter_activations} for ov in CASES.values()]
    per_rank = run_ranks(dp, train_scenarios, scenarios, timeout=500)
    return dp, {name: [per_rank[r][i]["memory"] for r in range(dp)] for i, name in enumerate(CASES)}


def _rel(est: float, meas: float) -> float:
    return (est - meas) / meas if meas else (0.0 if est == 0 else float("inf"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(CASES))
def test_model_states_match_engine(runs, name):
    from trellis.engine.memory.estimator import estimate
    from trellis.engine.memory.models import resolve_model

    dp, by_name = runs
    ov = CASES[name]
    est = estimate(resolve_model("tiny-llama"), _setup(dp, ov)).ranks[0]
    bad = []
    for rank, mem in enumerate(by_name[name]):
        line = [f"dp{dp} {name:16s} rank{rank}"]
        for key in ("params", "grads", "optimizer_states", "master_weights"):
            e, m = getattr(est, key), mem[key]
            line.append(f"{key} est {e:.0f} meas {m} ({_rel(e, m):+.2%})")
            if abs(e - m) > 0.05 * m or (m == 0 and e != 0) or (key == "grads" and m == 0):
                bad.append(line[-1])
        print(" | ".join(line))
    assert not bad, f"dp{dp} {name}: " + "; ".join(bad)


def drop_a_grad_after_the_step(trainer, rank) -> None:
    """Scenario hook: after each optimizer step free one gradient (what a parameter without a gradient looks
    like) and note the live gradient bytes the backend should then report."""
    from tests.support.memory_measure import grad_bytes

    backend = trainer.backend
    opt = backend.optimizer
    inner = opt.step
    seen: list[int] = []

    def step(*args, **kwargs):
        out = inner(*args, **kwargs)
        backend.params[0].grad = None
        seen.append(grad_bytes(backend.module))
        return out

    opt.step = step
    report = backend.memory_report
    backend.memory_report = lambda: {**report(), "live_grads_after_step": max(seen)}


@pytest.mark.timeout(300)
def test_grads_are_measured_from_live_tensors():
    sc = {"overrides": {**BASE, "parallel.dp": 1, "precision.dtype": "fp32", "zero.stage": 0},
          "hook": drop_a_grad_after_the_step}
    mem = run_ranks(1, train_scenarios, [sc], timeout=250)[0][0]["memory"]
    assert 0 < mem["grads"] == mem["live_grads_after_step"] < mem["trainable_params"], mem


def _live_ds_grad_bytes(zero_opt) -> int:
    """Bytes of every gradient buffer DeepSpeed's ZeRO optimizer holds, unique storages: the 16-bit partition
    (stage 2 `grads_in_partition`, stage 3 `grad_partitions_flat_buffer`), the averaged-gradient lists, and the
    fp32 partition gradients the inner optimizer steps on."""
    tensors = [getattr(zero_opt, "grads_in_partition", None), getattr(zero_opt, "grad_partitions_flat_buffer", None)]
    for group in getattr(zero_opt, "averaged_gradients", {}).values() if isinstance(
            getattr(zero_opt, "averaged_gradients", None), dict) else []:
        tensors += list(group or [])
    inner = getattr(zero_opt, "optimizer", zero_opt)
    tensors += [p.grad for g in inner.param_groups for p in g["params"]]
    seen: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t) and t.numel():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def meter_deepspeed(trainer, rank) -> None:
    """Scenario hook (DeepSpeed backend): activations as above, and the gradient bytes DeepSpeed really holds,
    read from its live buffers while the inner optimizer steps (the peak: both the 16-bit and the fp32
    partition exist then)."""
    meter_activations(trainer, rank)
    backend = trainer.backend
    zero_opt = backend.engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)
    step = inner.step
    peaks: list[int] = []

    def metered_step(*args, **kwargs):
        peaks.append(_live_ds_grad_bytes(zero_opt))
        return step(*args, **kwargs)

    inner.step = metered_step
    gathered: list[int] = []

    def note_gathered(*_):  # ZeRO-3: parameters whose full data is present right now (gathered for compute)
        gathered.append(sum(p.data.numel() * p.data.element_size() for p in backend.module.parameters()
                            if hasattr(p, "ds_tensor")))

    for m in backend.module.modules():
        m.register_forward_hook(note_gathered)
        m.register_full_backward_hook(note_gathered)
    report = backend.memory_report

    def memory_report() -> dict:
        out = report()
        if peaks and out["zero_stage"] >= 2:  # below stage 2 the model's own .grad tensors are the gradients
            out = {**out, "grads": max(peaks)}
        if out["zero_stage"] == 3:  # persistent params: the whole tensor lives next to its partition
            whole = sum(p.data.numel() * p.data.element_size() for p in backend.module.parameters()
                        if getattr(p, "ds_persist", False))
            out = {**out, "params": out["params"] + whole, "persistent_params": whole,
                   "gathered_peak": max(gathered, default=0)}
        return out

    backend.memory_report = memory_report


@pytest.fixture(scope="module")
def ds_runs():
    scenarios = [{"overrides": {**BASE, "parallel.dp": 2, **ov}, "hook": meter_deepspeed} for ov in DS_CASES.values()]
    per_rank = run_ranks(2, train_scenarios, scenarios, timeout=550)
    return {name: [per_rank[r][i]["memory"] for r in range(2)] for i, name in enumerate(DS_CASES)}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("key", ["params", "grads", "optimizer_states", "master_weights"])
@pytest.mark.parametrize("name", list(DS_CASES))
def test_deepspeed_model_states_match_engine(ds_runs, name, key):
    from trellis.engine.memory.estimator import estimate
    from trellis.engine.memory.models import resolve_model

    est = estimate(resolve_model("tiny-llama"), _setup(2, DS_CASES[name])).ranks[0]
    e = getattr(est, key)
    for rank, mem in enumerate(ds_runs[name]):
        m = mem[key]
        print(f"dp2 {name:16s} rank{rank} {key} est {e:.0f} meas {m} ({_rel(e, m):+.2%})")
        assert abs(e - m) <= 0.05 * m if m else e == 0


def _kept_activations(setup) -> float:
    """The estimate's activations without the recompute peak of checkpointing: what the meter can see
    (saved tensors and checkpoint inputs during forward; the recomputation runs inside backward). The
    recompute term is one block's activations without checkpointing, checked by the no-checkpoint cases."""
    from trellis.engine.memory.estimator import estimate
    from trellis.engine.memory.models import resolve_model

    est = estimate(resolve_model("tiny-llama"), setup).ranks[0]
    return est.activations - est.activations_recompute


def _check_activations(label: str, setup, mem: dict) -> list[str]:
    from trellis.engine.memory.estimator import estimate
    from trellis.engine.memory.models import resolve_model

    e, m = _kept_activations(setup), mem["activations"]
    print(f"{label} activations est {e:.0f} meas {m} ({_rel(e, m):+.2%}) | autocast weight copies meas "
          f"{mem['weight_copies']}")
    bad = [] if m > 0 and abs(e - m) <= 0.10 * m else [f"{label}: activations est {e:.0f} vs meas {m}"]
    if setup.backend == "native" and setup.zero <= 1 and setup.precision != "fp32" and \
            setup.activation_checkpointing == "none":
        # autocast's 16-bit weight copies (estimator: buffers, minus the logits tensor) match exactly
        est = estimate(resolve_model("tiny-llama"), setup).ranks[0]
        copies = est.buffers - BATCH * SEQ * est_vocab() * 2
        if abs(copies - mem["weight_copies"]) > 0.05 * mem["weight_copies"]:
            bad.append(f"{label}: weight copies est {copies:.0f} vs meas {mem['weight_copies']}")
    return bad


def est_vocab() -> int:
    from trellis.engine.memory.models import resolve_model

    return resolve_model("tiny-llama").vocab


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(CASES))
def test_activations_match_saved_tensors(runs, name):
    """Every layout: fp32 / bf16 autocast (ZeRO 0-1) / bf16 FSDP2 casting (ZeRO 2-3), full fine-tuning,
    LoRA, QLoRA, checkpointing none / selective / full."""
    dp, by_name = runs
    setup = _setup(dp, CASES[name])
    bad = []
    for rank, mem in enumerate(by_name[name]):
        bad += _check_activations(f"dp{dp} {name:24s} rank{rank}", setup, mem)
    assert not bad, "; ".join(bad)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(DS_CASES))
def test_deepspeed_activations_match_saved_tensors(ds_runs, name):
    setup = _setup(2, DS_CASES[name])
    bad = []
    for rank, mem in enumerate(ds_runs[name]):
        bad += _check_activations(f"dp2 {name:16s} rank{rank}", setup, mem)
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("name", [n for n in DS_CASES if n.endswith("zero3")])
def test_deepspeed_zero3_working_memory(ds_runs, name):
    """ZeRO-3's gathered parameters (full data present at a module's forward / backward, read from the live
    engine) against the estimator's working-memory term (the largest module gathered)."""
    from trellis.engine.memory.estimator import DTYPE_BYTES, largest_module_params
    from trellis.engine.memory.models import resolve_model, total_params

    d = resolve_model("tiny-llama")
    c = DTYPE_BYTES[DS_CASES[name]["precision.dtype"]]
    for rank, mem in enumerate(ds_runs[name]):
        print(f"dp2 {name} rank{rank}: gathered peak {mem['gathered_peak']} B; largest module "
              f"{largest_module_params(d) * c:.0f} B; whole model {total_params(d) * c} B; "
              f"persistent {mem['persistent_params']}")
        assert mem["persistent_params"] == 0  # trellis' config: stage3_param_persistence_threshold = 0
        # the gathered half of the estimator's working memory (2 x c x largest module; the other half is that
        # module's compute-dtype gradients, not read here)
        assert mem["gathered_peak"] == largest_module_params(d) * c
