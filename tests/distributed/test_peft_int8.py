"""LoRA on an 8-bit base (`peft.quantize_base = "int8"`, bitsandbytes Linear8bitLt) on real gloo ranks.

One spawned 2-rank group runs dp2 ZeRO-3 and pp2. The reference is bitsandbytes' own 1-process
int8 model: HF `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_8bit=True))` of the same
weights + peft's `get_peft_model` + torch AdamW (tests/distributed/peft_support.py; no trellis quantization
code). On CPU, bitsandbytes 0.50 trains int8 through dequantize + fp matmul (MatMul8bitFp), the same
arithmetic on both sides, so only summation order differs.
Checks: losses vs the reference, the live storage (int8 weights + one fp32 scale per row, whole on every
rank, also under ZeRO-3), those bytes and the rank's parameter bytes vs the estimator, only adapters train,
and the exported adapter loads with `PeftModel.from_pretrained` on the int8 base (exact logits) and on the
fp base (off by the quantization only); the merged export equals the trained model.
"""

from __future__ import annotations

import pytest
import torch

from trellis import configs
from trellis.parallel.models import family_for

from .harness import run_ranks
from .peft_support import BASE, peft_scenarios, probe_ids, reference_run

pytestmark = pytest.mark.distributed
TARGETS = family_for("llama").default_lora_targets
INT8 = {"peft.method": "lora", "peft.quantize_base": "int8", "train.steps": 6, "train.lr": 3e-2}
# Both layouts have the same global batch (2 x 2 x dp2 = 2 x 4 x pp2's dp1), so one reference serves both.
CASES = {
    "dp2-int8-z3": {"parallel.dp": 2, "zero.stage": 3, **INT8},  # ZeRO-3 on the adapters, int8 base whole
    "pp2-int8": {"parallel.pp": 2, "train.grad_accum": 4, **INT8},
}


def _overrides(name: str, tmp) -> dict:
    return {**BASE, **CASES[name], "logging.metrics_file": str(tmp / f"{name}.jsonl"),
            "checkpoint.dir": str(tmp / f"ckpt-{name}")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    per_rank = run_ranks(2, peft_scenarios, [{"overrides": _overrides(n, tmp)} for n in CASES], timeout=600)
    return {"tmp": tmp, "out": {n: [per_rank[r][i] for r in range(2)] for i, n in enumerate(CASES)}, "refs": {}}


def _cfg(runs, name):
    return configs.load("tiny-llama", _overrides(name, runs["tmp"]))


def reference(runs, name):
    cfg = _cfg(runs, name)
    gb = cfg.parallel.dp * cfg.train.grad_accum * cfg.train.micro_batch_size  # what changes the reference
    if gb not in runs["refs"]:
        ref_cfg = configs.load("tiny-llama", {**_overrides(name, runs["tmp"]), "parallel.pp": 1})
        runs["refs"][gb] = reference_run(ref_cfg, TARGETS, cfg.train.steps, runs["tmp"] / f"hf-base-{gb}")
    return runs["refs"][gb]


def _engine_logits(runs, name):
    r0 = runs["out"][name][0]
    return r0["logits"] if r0["logits"] is not None else reference(runs, name)[2]


@pytest.mark.parametrize("name", list(CASES))
def test_int8_lora_matches_bitsandbytes_reference(runs, name):
    ref_losses = reference(runs, name)[0]
    ranks = runs["out"][name]
    losses = [r["loss"] for r in ranks[0]["records"]]
    dl = max(abs(a - b) for a, b in zip(losses, ref_losses))
    print(f"{name}: losses {losses}\n  bnb reference {ref_losses}\n  max |Δloss| {dl:.2e}")
    assert len(losses) == len(ref_losses) and dl <= 1e-5
    assert sum(losses[-2:]) / 2 < losses[0] - 0.05, losses  # it trains
    for r in ranks:
        assert r["frozen_with_grad"] == [] and r["non_adapter_in_opt"] == 0 and r["n_opt_params"] > 0


@pytest.mark.parametrize("name", list(CASES))
def test_int8_storage_and_bytes_match_estimator(runs, name):
    from trellis.engine.memory.estimator import TrainingSetup, estimate
    from trellis.engine.memory.models import resolve_model

    ov = CASES[name]
    dp, pp = ov.get("parallel.dp", 1), ov.get("parallel.pp", 1)
    d = resolve_model("tiny-llama")
    est = estimate(d, TrainingSetup(backend="native", dp=dp, pp=pp, zero=ov.get("zero.stage", 0), precision="fp32",
                                    peft="lora", lora_r=BASE["peft.r"], quant="int8"))
    layers_per_rank = d.layers // pp
    # the tiny Llama's 7 block linears, (out, in): q, k, v, o, gate, up, down; k/v are GQA-narrow
    kv = d.kv_heads * d.hidden // d.heads
    shapes = [(d.hidden, d.hidden), (kv, d.hidden), (kv, d.hidden), (d.hidden, d.hidden),
              (d.ffn, d.hidden), (d.ffn, d.hidden), (d.hidden, d.ffn)]
    for rank, r in enumerate(runs["out"][name]):
        q = r["int8_base"]
        e = est.ranks[rank // dp] if pp > 1 else est.ranks[0]
        print(f"{name} rank{rank}: int8 base {q}; estimator int8 line {e.params_by_dtype.get('int8')}; params "
              f"measured {r['memory']['params'] + q['scale_bytes']} estimated {e.params:.0f}")
        assert q["layers"] == 7 * layers_per_rank and q["whole"], q  # every block linear, whole even under ZeRO-3
        assert q["dtypes"] == ["scale torch.float32", "torch.int8"], q
        assert q["weight_bytes"] == layers_per_rank * sum(o * i for o, i in shapes)  # 1 byte per weight
        assert q["scale_bytes"] == layers_per_rank * 4 * sum(o for o, _ in shapes)  # fp32 per output row
        assert r["memory"]["params_by_dtype"]["int8"] == q["weight_bytes"]  # what the engine reports, too
        assert e.params_by_dtype["int8"] == q["weight_bytes"] + q["scale_bytes"]
        measured = r["memory"]["params"] + q["scale_bytes"]  # every live parameter + the row scales
        assert abs(e.params - measured) <= 0.01 * measured, (e.params, measured)


@pytest.mark.parametrize("name", list(CASES))
def test_int8_adapter_export_loads_with_peft(runs, name, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trellis.engine.model import build_model
    from trellis.engine.peft.export import export_adapter

    r0 = runs["out"][name][0]
    out = export_adapter(r0["checkpoint"], tmp_path / "adapter")
    cfg = _cfg(runs, name)
    base, _ = build_model(cfg.model, seed=cfg.train.seed)
    ids = probe_ids(base.config.vocab_size)
    base.save_pretrained(str(tmp_path / "fp-base"))
    int8_base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp-base"), dtype=torch.float32,
                                                     quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    engine = _engine_logits(runs, name)
    got = {}
    for label, b in (("int8 base", int8_base), ("fp base", base)):
        model = PeftModel.from_pretrained(b, str(out))
        model.train()  # the training-time int8 path (bitsandbytes' eval path on CPU is another kernel)
        with torch.no_grad():
            got[label] = model(input_ids=ids).logits
            with model.disable_adapter():
                got[label + " without adapter"] = model(input_ids=ids).logits
    d_int8 = (got["int8 base"] - engine).abs().max().item()
    d_fp = (got["fp base"] - engine).abs().max().item()
    quant_effect = (got["fp base without adapter"] - got["int8 base without adapter"]).abs().max().item()
    print(f"{name}: adapter on the int8 base |Δlogits| {d_int8:.2e}; on the fp base {d_fp:.2e} "
          f"(int8 vs fp base alone {quant_effect:.2e})")
    assert d_int8 <= 1e-5
    assert 0 < d_fp <= 3 * quant_effect


def test_int8_merged_export_equals_trained_model(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from trellis.engine.peft.export import export_merged

    name = "dp2-int8-z3"
    out = export_merged(runs["out"][name][0]["checkpoint"], tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        got = model(input_ids=probe_ids(model.config.vocab_size)).logits
    d = (got - _engine_logits(runs, name)).abs().max().item()
    print(f"{name}: merged (into the dequantized int8 base) |Δlogits| {d:.2e}")
    assert d <= 1e-4
