"""`peft.init_adapter`: a LoRA adapter written by peft's own `save_pretrained` on the 1-process model (A and B
both non-zero, so neither is trellis' own init) is loaded into a dp2·tp2 run before partitioning. Its probe
logits before the first step equal peft's `PeftModel.from_pretrained` of the same directory, and 3 training steps
equal a hand-written 1-process peft loop continuing it (same data order as tests/distributed/reference.py).
Bad inputs are one ConfigError each (exit 2): before any rank starts for the files and adapter_config.json,
on the ranks before the first step for a base model of other shapes. In one process, every supported method's
peft-saved adapter loads to PeftModel.from_pretrained's logits.

Error model for the bounds: the 1-process reference and the dp2·tp2 run differ only in fp32 summation order
(tp-split matmuls, dp-summed grads), ~1e-7 relative on these O(1)-O(10) values; 1e-5 leaves two decades.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from trellis import configs
from trellis.cli import main
from trellis.parallel.models import family_for

from .harness import run_ranks
from .peft_support import BASE, probe_ids, reference_loop, reference_model

pytestmark = pytest.mark.distributed
TARGETS = family_for("llama").default_lora_targets
RUN = {**BASE, "parallel.dp": 2, "parallel.tp": 2}  # peft.method lora, r 4, alpha 8, 3 steps
STEPS = RUN["train.steps"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """peft's own save of a LoRA adapter whose A and B are both non-zero (seeded random values)."""
    out = tmp_path_factory.mktemp("adapter") / "lora"
    model, _ = reference_model(configs.load("tiny-llama", dict(BASE)), TARGETS)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(str(out))
    assert (out / "adapter_model.safetensors").is_file()
    return out


def _probe(trainer) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        lg = trainer.backend.module(input_ids=probe_ids(trainer.hf_config.vocab_size)).logits
    return (lg.full_tensor() if isinstance(lg, DTensor) else lg).detach().clone()


def _engine_run(rank: int, world: int, scenarios: list[dict]) -> list[dict]:
    """Each scenario's probe logits before / after training and losses, or its ConfigError's text."""
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import Trainer
    from trellis.errors import ConfigError

    ctx = init_distributed(120.0)
    out = []
    for overrides in scenarios:
        try:
            trainer = Trainer(configs.load("tiny-llama", overrides), ctx)
        except ConfigError as e:  # what run_rank turns into `error: ...`, exit 2
            torch.distributed.barrier()
            out.append({"error": str(e)})
            continue
        before = _probe(trainer)
        trainer.train()
        records = [json.loads(x) for x in open(overrides["logging.metrics_file"])] if rank == 0 else []
        out.append({"before": before, "after": _probe(trainer), "losses": [r["loss"] for r in records]})
    return out


def _other_base(adapter, tmp):
    """The adapter with the same names but another base's shapes (a q_proj twice as wide)."""
    from safetensors.torch import load_file, save_file

    bad = _copy(adapter, tmp, "other-base")
    state = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in state if "q_proj.lora_A" in k)
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] * 2)
    save_file(state, str(bad / "adapter_model.safetensors"))
    return bad, key


@pytest.fixture(scope="module")
def engine(adapter, tmp_path_factory):
    """One dp2·tp2 group: the adapter of another base (refused on the ranks), then the real continuation."""
    tmp = tmp_path_factory.mktemp("engine")
    bad, key = _other_base(adapter, tmp)
    good = {**RUN, "peft.init_adapter": str(adapter), "logging.metrics_file": str(tmp / "m.jsonl")}
    scenarios = [{**good, "peft.init_adapter": str(bad), "logging.metrics_file": str(tmp / "bad.jsonl")}, good]
    per_rank = run_ranks(4, _engine_run, scenarios, timeout=400)
    return {"bad": [r[0] for r in per_rank], "bad_key": key, "good": per_rank[0][1], "overrides": good}


def _peft_reference(cfg, adapter_dir, dtype: torch.dtype = torch.float32):
    """peft loads the adapter on the unsharded base and continues it with plain torch AdamW. float64 runs
    the same loop in double precision: its distance from float32 is the fp32 round-off on this trajectory."""
    from peft import PeftModel

    from trellis.engine.model import build_model

    base, model_dir = build_model(cfg.model, seed=cfg.train.seed)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True).to(dtype)
    ids = probe_ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    sampler, params, opt = reference_loop(cfg, model, model_dir)
    losses = []
    for _ in range(STEPS):
        batches = sampler.next()
        n_tokens = sum(b.labels.numel() for b in batches)
        total = 0.0
        for b in batches:
            logits = model(input_ids=b.input_ids).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.labels.reshape(-1),
                                   reduction="sum") / n_tokens
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    return before, base_logits, losses, after


def test_dp2_tp2_continues_a_peft_adapter_like_peft(adapter, engine):
    overrides = engine["overrides"]
    engine = engine["good"]
    before, base_logits, losses, after = _peft_reference(configs.load("tiny-llama", overrides), adapter)
    d_before = (engine["before"] - before).abs().max().item()
    d_loss = max(abs(a - b) for a, b in zip(engine["losses"], losses))
    d_after = (engine["after"] - after).abs().max().item()
    print(f"init_adapter dp2·tp2: |Δlogits| before {d_before:.2e}, max |Δloss| {d_loss:.2e} over {STEPS} steps, "
          f"|Δlogits| after {d_after:.2e} (max |logit| {after.abs().max().item():.1f})")
    assert (before - base_logits).abs().max().item() > 1e-2  # not vacuous: the adapter changes the outputs
    assert d_before <= 1e-5
    assert len(engine["losses"]) == STEPS and d_loss <= 1e-5
    # After the 3rd update Adam has amplified round-off in elements whose gradient is near eps (its first
    # steps move by ~lr * sign(g)): bound the logits by the fp32 round-off the reference itself shows against
    # float64 on this trajectory (x10), not by a fixed number.
    *_, after64 = _peft_reference(configs.load("tiny-llama", overrides), adapter, torch.float64)
    roundoff = (after - after64).abs().max().item()
    print(f"reference fp32 vs fp64 |Δlogits| after: {roundoff:.2e}")
    assert d_after <= max(1e-5, 10 * roundoff)


def _copy(adapter, tmp_path, name="a"):
    d = tmp_path / name
    shutil.copytree(adapter, d)
    return d


def _edit_config(d, **changes):
    ac = json.loads((d / "adapter_config.json").read_text())
    ac.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(ac))


def _cases(adapter, tmp_path):
    no_cfg = _copy(adapter, tmp_path, "no-config")
    (no_cfg / "adapter_config.json").unlink()
    pickled = _copy(adapter, tmp_path, "bin")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    patterned = _copy(adapter, tmp_path, "patterned")
    _edit_config(patterned, rank_pattern={"q_proj": 8})
    lora = ["--peft.method=lora", "--peft.r=4", "--peft.alpha=8"]
    return [
        ([*lora, f"--peft.init_adapter={tmp_path / 'nowhere'}"], ["nowhere", "no such directory"]),
        ([*lora, f"--peft.init_adapter={no_cfg}"], ["adapter_config.json is missing"]),
        ([*lora, f"--peft.init_adapter={pickled}"], ["adapter_model.bin is a pickle", "safetensors"]),
        (["--peft.method=lora", "--peft.r=8", "--peft.alpha=8", f"--peft.init_adapter={adapter}"],
         ["r=4", "peft.r gives 8"]),
        ([*lora, "--peft.target_modules=['q_proj']", f"--peft.init_adapter={adapter}"],
         ["peft.target_modules gives ['q_proj']"]),
        (["--peft.method=dora", "--peft.r=4", "--peft.alpha=8", f"--peft.init_adapter={adapter}"],
         ["'lora' adapter but peft.method='dora'", "set peft.method='lora'"]),
        ([*lora, f"--peft.init_adapter={patterned}"], ["rank_pattern"]),
        (["--peft.method=prompt", f"--peft.init_adapter={adapter}"], ["peft.method='prompt'"]),
        ([f"--model.path={adapter}"], ["is a PEFT adapter", f"peft.init_adapter='{adapter}'"]),
    ]


def test_bad_adapters_are_refused_before_ranks_start(adapter, tmp_path, capsys, monkeypatch):
    """One `error:` line naming the field and the fix, exit 2, raised before any rank is spawned
    (tiny-llama has parallel.dp=2: a spawn would start 2 processes)."""
    import trellis.engine.run as run

    monkeypatch.setattr(run, "spawn_local_ranks", lambda *a, **k: pytest.fail("ranks were started"))
    for argv, needles in _cases(adapter, tmp_path):
        assert main(["train", "tiny-llama", "--train.steps=1", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert all(n in err for n in needles) and "Traceback" not in err, (argv, err)


def test_adapter_of_another_base_is_a_config_error_on_the_ranks(engine):
    """Same names, other shapes: found on every rank before the first step (a ConfigError: exit 2 from the CLI)."""
    for result in engine["bad"]:
        assert "another base model (shape mismatch" in result["error"] and engine["bad_key"] in result["error"]


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "ia3"])
def test_every_supported_method_loads_peft_keys(method, tmp_path):
    """1 process, no partitioning: trellis' injector + init_adapter on the whole model reproduces
    `PeftModel.from_pretrained` of a peft-saved adapter with random values for every supported method
    (peft's key names: DoRA's magnitude vector, IA3's scaling vectors)."""
    from peft import PeftModel

    from trellis.engine.model import build_model
    from trellis.engine.peft.inject import make_injector

    cfg = configs.load("tiny-llama", {**BASE, "peft.method": method})
    model, _ = reference_model(cfg, TARGETS)
    g = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # IA3 scales and DoRA magnitudes are multiplicative: perturb around their init
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + 0.1 * noise) if ("ia3_l" in name or "magnitude" in name) else 0.05 * noise)
    model.save_pretrained(str(tmp_path / method))
    cfg = configs.load("tiny-llama", {**BASE, "peft.method": method, "peft.init_adapter": str(tmp_path / method)})
    ours, _ = build_model(cfg.model, seed=cfg.train.seed)
    ids = probe_ids(ours.config.vocab_size)
    with torch.no_grad():
        base_logits = ours(input_ids=ids).logits
    make_injector(cfg)(ours, family_for("llama"))
    base, _ = build_model(cfg.model, seed=cfg.train.seed)
    ref = PeftModel.from_pretrained(base, str(tmp_path / method))
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
        d = (logits - ref(input_ids=ids).logits).abs().max().item()
    print(f"init_adapter {method}: |Δlogits| vs PeftModel.from_pretrained {d:.2e}")
    assert (logits - base_logits).abs().max().item() > 1e-3  # not vacuous: the loaded adapter changes outputs
    assert d <= 1e-6  # the same modules and fp32 ops; only the loading path differs
