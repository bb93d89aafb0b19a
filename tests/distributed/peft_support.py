"""PEFT test support: a 1-process peft reference, an independent per-rank trainable-size rule, and the
worker that runs several PEFT trainings in one spawned process group.

The reference uses only HF + peft's public API (`get_peft_model`, or HF's 4-bit load for QLoRA) and
plain torch AdamW: no trellis parallel or PEFT code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

BASE = {"parallel.dp": 1, "parallel.pp": 1, "parallel.tp": 1, "train.steps": 3, "train.micro_batch_size": 2, "train.grad_accum": 2, "train.lr": 1e-2,
        "train.schedule": "constant", "train.warmup_steps": 0, "train.weight_decay": 0.0, "train.grad_clip": 1.0,
        "data.seq_len": 32, "logging.progress": "none", "peft.method": "lora", "peft.r": 4, "peft.alpha": 8.0}
PROBE_SEED = 99


def probe_ids(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab, (2, 16), generator=g)


def peft_config(cfg, targets):
    import peft

    p = cfg.peft
    if p.method in ("prompt", "ptuning"):
        kw = dict(num_virtual_tokens=p.num_virtual_tokens, task_type="CAUSAL_LM")
        if p.method == "prompt":
            return peft.PromptTuningConfig(**kw)
        return peft.PromptEncoderConfig(encoder_hidden_size=64, **kw)
    if p.method in ("prefix", "ptuning_v2"):  # P-tuning v2: prefix tuning with the MLP reparameterisation
        return peft.PrefixTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type="CAUSAL_LM",
                                       prefix_projection=p.method == "ptuning_v2", encoder_hidden_size=64)
    if p.method == "ia3":
        ff = [t for t in targets if t in ("gate_proj", "up_proj", "down_proj")]
        return peft.IA3Config(target_modules=list(targets), feedforward_modules=ff, task_type="CAUSAL_LM")
    return peft.LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=0.0, target_modules=list(targets),
                           use_rslora=p.method == "rslora", use_dora=p.method == "dora", task_type="CAUSAL_LM")


def reference_model(cfg, targets, tmp: Path | None = None):
    """The unsharded peft model, adapters initialised from the engine's documented adapter seed."""
    from peft import get_peft_model

    from trellis.engine.model import build_model
    from trellis.engine.peft.inject import adapter_seed
    from trellis.parallel.hf_surgery import prepare_model
    from trellis.parallel.models import family_for

    model, model_dir = build_model(cfg.model, seed=cfg.train.seed)
    prepare_model(model, family_for(model.config.model_type))  # GPT-2: the unfused q/k/v every layout trains
    if cfg.peft.method == "qlora" and cfg.parallel.tp > 1:
        _per_shard_4bit(model, cfg.parallel.tp)
    elif cfg.peft.quantize_base == "int8":  # HF's own 8-bit load (bitsandbytes Linear8bitLt) of the same weights
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        model.save_pretrained(str(tmp))
        model = AutoModelForCausalLM.from_pretrained(str(tmp), quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                     dtype=torch.float32)
    elif cfg.peft.method == "qlora":  # HF's own 4-bit load of the same weights
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        model.save_pretrained(str(tmp))
        pe = cfg.peft  # the run's 4-bit settings, read off the config (qlora's "auto" is NF4)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=pe.double_quant,
                                 bnb_4bit_quant_type="nf4" if pe.quantize_base == "auto" else pe.quantize_base,
                                 bnb_4bit_compute_dtype=torch.bfloat16 if pe.compute_dtype == "bf16" else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(str(tmp), quantization_config=bnb, dtype=torch.float32)
    # Train mode, as any training loop sets it (from_pretrained returns eval mode): in eval mode bitsandbytes
    # repacks frozen-input 4-bit linears into its bf16 CPU inference kernel on AVX512-BF16 CPUs, a different
    # kernel than the engine's training path (measured: |Δloss| 2.6e-3 instead of <= 1e-6 over 8 steps).
    model.train()
    torch.manual_seed(adapter_seed(cfg))
    return get_peft_model(model, peft_config(cfg, targets)), model_dir


def _per_shard_4bit(model, tp: int) -> None:
    """Replace every decoder linear's weight by NF4 + double-quant round trips of its tp shards (rows of a
    colwise layer, columns of a rowwise one), with bitsandbytes directly: the 4-bit base a tp run holds."""
    import bitsandbytes.functional as bf

    from trellis.parallel.models import family_for

    spec = family_for(model.config.model_type)
    for layer in model.get_submodule(spec.layers):
        for path, kind in spec.tp_plan.items():
            lin = layer.get_submodule(path)
            dim = 1 if kind == "rowwise" else 0
            parts = []
            for w in lin.weight.detach().chunk(tp, dim=dim):
                packed, state = bf.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=True,
                                                 quant_type="nf4")
                parts.append(bf.dequantize_4bit(packed, state).float())
            with torch.no_grad():
                lin.weight.copy_(torch.cat(parts, dim=dim))


def reference_loop(cfg, model, model_dir):
    """(global-batch sampler, trainable params, AdamW) of a 1-process reference loop: the same data, global
    batch (grad_accum x dp micro-batches per step) and optimizer settings as the engine's run of `cfg`."""
    from trellis.engine.data import GlobalBatchSampler, build_dataset
    from trellis.engine.tokenizer import find_tokenizer, load_tokenizer

    t = cfg.train
    tok = load_tokenizer(find_tokenizer(model_dir, cfg.model.tokenizer))
    data, _ = build_dataset(cfg.data, tok, t.seed)
    dp = max(cfg.parallel.dp, 1)
    sampler = GlobalBatchSampler(data, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum * dp,
                                 dp_rank=0, dp_size=1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=0.0, foreach=False)
    return sampler, params, opt


def reference_run(cfg, targets, steps: int, tmp: Path | None = None, dtype: torch.dtype = torch.float32):
    """(losses, peft model after `steps` steps, probe logits, probe logits with the adapters disabled).
    dtype=torch.float64 runs the same reference in double precision: its distance from the fp32 run is the
    size of fp32 round-off on this trajectory, the error model the bounds of the tp tests derive from."""
    t = cfg.train
    model, model_dir = reference_model(cfg, targets, tmp)
    model.to(dtype)
    sampler, params, opt = reference_loop(cfg, model, model_dir)
    losses = []
    n_virtual = cfg.peft.num_virtual_tokens if cfg.peft.method in ("prompt", "ptuning") else 0
    for _ in range(steps):
        batches = sampler.next()
        n_tokens = sum(b.labels.numel() for b in batches)
        total = 0.0
        for b in batches:
            logits = model(input_ids=b.input_ids).logits[:, n_virtual:]  # peft returns virtual positions too
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b.labels.reshape(-1),
                                   reduction="sum") / n_tokens
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    ids = probe_ids(model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, n_virtual:]
        if n_virtual:  # the wrapped HF model without virtual tokens
            base_logits = model.get_base_model()(input_ids=ids).logits
        else:
            with model.disable_adapter():
                base_logits = model(input_ids=ids).logits
    return losses, model, logits, base_logits


def expected_local_numel(ref_model, tp_plan: dict, tp: int) -> int:
    """Per-tp-rank trainable elements from the DESIGN rules, computed on the unsharded peft model:
    colwise base -> lora_B / DoRA magnitude / IA3 output vector split over tp, lora_A replicated;
    rowwise base -> lora_A / IA3 input vector split, lora_B / magnitude replicated."""
    total = 0
    for name, p in ref_model.named_parameters():
        if not p.requires_grad:
            continue
        if "prompt_encoder" in name:  # virtual tokens: replicated over tp
            total += p.numel()
            continue
        kind = next(k for path, k in tp_plan.items() if f".{path}." in name)
        col = kind != "rowwise"
        if ".lora_B." in name or "lora_magnitude_vector" in name:
            split = col
        elif ".lora_A." in name:
            split = not col
        elif "ia3_l" in name:
            split = col if p.shape[1] == 1 else not col  # (out, 1) scales outputs, (1, in) inputs
        else:
            raise AssertionError(f"unexpected trainable parameter {name}")
        total += p.numel() // tp if split else p.numel()
    return total


def peft_scenarios(rank: int, world: int, scenarios: list[dict]) -> list[dict]:
    """Several PEFT trainings in one process group. Per scenario: loss records (rank 0), memory report,
    frozen params holding a grad, optimizer-owned params that are not adapters, replica drift over tp,
    probe logits (non-pipeline layouts), or the error text when `expect_error` is set."""
    from trellis import configs
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import Trainer

    ctx = init_distributed(120.0)
    out = []
    for sc in scenarios:
        cfg = configs.load(sc.get("config", "tiny-llama"), dict(sc["overrides"]))
        try:
            if sc.get("reverse_order"):
                _reverse_injection_order()
            trainer = Trainer(cfg, ctx)
            trainer.train()
        except Exception as e:  # noqa: BLE001 - reported to the test
            if not sc.get("expect_error"):
                raise
            dist.barrier()
            out.append({"error": f"{type(e).__name__}: {e}"})
            continue
        finally:
            if sc.get("reverse_order"):
                _restore_injection_order()
        out.append(_inspect(trainer, cfg, rank))
    return out


def _inspect(trainer, cfg, rank: int) -> dict:
    from torch.distributed.tensor import DTensor

    backend = trainer.backend
    module = backend.module
    records = []
    if rank == 0 and cfg.logging.metrics_file:
        records = [json.loads(line) for line in Path(cfg.logging.metrics_file).read_text().splitlines()]
    frozen_with_grad = [n for n, p in module.named_parameters() if not p.requires_grad and p.grad is not None]
    opt = getattr(backend.optimizer, "inner", backend.optimizer)
    adapter_ids = {id(p) for p in backend.params}
    owned = [p for g in (opt.param_groups if opt is not None else []) for p in g["params"]]
    non_adapter_in_opt = sum(id(p) not in adapter_ids for p in owned)
    drift = 0.0
    if trainer.dims.tp > 1:  # replicated (plain) adapter params must be bit-identical over tp
        plain = [p for _, p in backend.named_trainable if not isinstance(p, DTensor)]
        drift = _replica_drift(plain, trainer.dims.mesh["tp"].get_group())
    pp_drift = 0.0
    pipe = backend.pm.pipeline
    if pipe is not None:  # modules replicated on every stage (prefix encoder) must be bit-identical over pp
        local = [p.to_local() if isinstance(p, DTensor) else p for p in pipe._replicated_params()]
        pp_drift = _replica_drift(local, pipe.pp_group)
    logits = None
    if trainer.dims.pp == 1:
        with torch.no_grad():
            lg = module(input_ids=probe_ids(trainer.hf_config.vocab_size).to(trainer.ctx.device)).logits
            logits = (lg.full_tensor() if isinstance(lg, DTensor) else lg).detach().cpu().clone()
    ckpt = str(trainer.checkpointer.last_saved) if trainer.checkpointer and trainer.checkpointer.last_saved else None
    return {"records": records, "memory": backend.memory_report(), "int8_base": int8_base(module),
            "frozen_with_grad": frozen_with_grad,
            "non_adapter_in_opt": non_adapter_in_opt, "n_opt_params": len(owned), "drift": drift,
            "pp_drift": pp_drift,
            "logits": logits if rank == 0 else None, "checkpoint": ckpt, "tp": trainer.dims.tp,
            "dp": trainer.dims.dp}


def int8_base(module) -> dict:
    """This rank's 8-bit base as stored, read off the live bitsandbytes layers: bytes of the int8 weights and of
    their fp32 row scales (SCB), and whether every layer holds its whole (out, in) weight with one scale a row."""
    import bitsandbytes as bnb

    out = {"layers": 0, "weight_bytes": 0, "scale_bytes": 0, "dtypes": set(), "whole": True}
    for m in module.modules():
        if not isinstance(m, bnb.nn.Linear8bitLt):
            continue
        w = m.weight
        scb = w.SCB if getattr(w, "SCB", None) is not None else m.state.SCB
        out["layers"] += 1
        out["weight_bytes"] += w.numel() * w.element_size()
        out["scale_bytes"] += scb.numel() * scb.element_size()
        out["dtypes"] |= {str(w.dtype), f"scale {scb.dtype}"}
        out["whole"] &= tuple(w.shape) == (m.out_features, m.in_features) and tuple(scb.shape) == (m.out_features,)
    out["dtypes"] = sorted(out["dtypes"])
    return out


def _replica_drift(tensors: list[torch.Tensor], group) -> float:
    """Largest |difference| between the copies of each tensor held by the ranks of `group`."""
    drift = 0.0
    for t in tensors:
        copies = [torch.empty_like(t.data) for _ in range(dist.get_world_size(group))]
        dist.all_gather(copies, t.data.contiguous(), group=group)
        drift = max(drift, max((c - copies[0]).abs().max().item() for c in copies))
    return drift


# ---- the deliberately wrong order (proves the order test can fail) --------------------------------

_saved = {}


def _reverse_injection_order() -> None:
    """Make the engine inject adapters AFTER tensor parallel: what the order test must catch."""
    from trellis.engine.backends import native as native_backend
    from trellis.parallel import parallelize as P

    orig = P.parallelize
    _saved["fn"] = orig

    def reversed_parallelize(model, dims, cfg, *, compute_dtype, inject_peft=None, loss_fn=None):
        pm = orig(model, dims, cfg, compute_dtype=compute_dtype, inject_peft=None, loss_fn=loss_fn)
        inject_peft(pm.module, pm.spec)
        return pm

    native_backend.parallelize = reversed_parallelize


def _restore_injection_order() -> None:
    from trellis.engine.backends import native as native_backend

    native_backend.parallelize = _saved.pop("fn")
