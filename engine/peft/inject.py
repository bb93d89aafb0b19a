"""PEFT adapters injected into the full model *before* it is partitioned.

peft's own layers and configs are used (`inject_adapter_in_model`, in place, so the model keeps its
structure and parameter names gain only `.base_layer` / `.lora_A.default` style suffixes); the base is
frozen, so only adapter parameters reach grads, the optimizer and checkpoints' trainable state.

Adapter init draws from a generator seeded by `adapter_seed(cfg)` right before injection, so every rank
(and a 1-process peft reference seeded the same way) creates bit-identical adapters whatever ran before.
QLoRA: with tp == 1 the decoder-block linears are quantized to 4 bit before injection; with tp > 1 they
are tagged and the LoRA-aware TP plan quantizes each rank's shard (parallel/quant4bit.py).
Prompt tuning / P-tuning / prefix tuning / P-tuning v2 attach peft's prompt module in place
(engine/peft/prompt.py; per-layer K/V prefixes are refused under interleaved 1F1B with a clear error) and the
injector returns the `PromptHooks` parallelize() passes to the pipeline stages (None for adapter methods).
`peft.init_adapter` fills the injected adapters from a PEFT-format directory (engine/peft/init_adapter.py), still
before partitioning.
"""

from __future__ import annotations

import torch

from trellis.configs.schema import PEFT_PROMPT_METHODS
from trellis.configs.validate import base_quantization
from trellis.errors import ConfigError
from trellis.parallel.models import family_for
from trellis.parallel.prompt_hooks import PromptHooks
from trellis.parallel.quant4bit import mark_for_tp_quantization, quantize_blocks

from ..model import load_hf_config
from .init_adapter import check_agrees, load_init_adapter, read_adapter_config, refuse_unfused_families
from .lazy import import_peft
from .prompt import attach_prompt_learning
from .quantize import quant_spec

INJECTABLE = ("lora", "rslora", "dora", "qlora", "ia3", "lokr", "loha", "adalora", "hra")
PROMPT_LEARNING = PEFT_PROMPT_METHODS


def _require_peft(cfg):
    """peft imported, with bitsandbytes only for a quantized base (engine/peft/lazy.py)."""
    import_peft(bitsandbytes=base_quantization(cfg) != "none")


def build_peft_config(cfg, spec, total_steps: int):
    """The peft config object for `cfg.peft` with the family's default targets."""
    _require_peft(cfg)
    import peft

    p = cfg.peft
    targets = list(p.target_modules) or list(spec.default_lora_targets)
    m = p.method
    if m in ("lora", "rslora", "dora", "qlora"):
        return peft.LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=targets,
                               use_rslora=m == "rslora", use_dora=m == "dora", task_type="CAUSAL_LM")
    if m == "ia3":
        mlp_in = [t for t in targets if any(k in t for k in ("up_proj", "gate_proj", "down_proj", "fc", "mlp", "4h"))]
        return peft.IA3Config(target_modules=targets, feedforward_modules=mlp_in, task_type="CAUSAL_LM")
    if m == "adalora":
        return peft.AdaLoraConfig(init_r=p.r, target_r=adalora_target_r(cfg), lora_alpha=p.alpha,
                                  target_modules=targets, total_step=total_steps, tinit=p.adalora_tinit,
                                  tfinal=p.adalora_tfinal, deltaT=p.adalora_delta_t, beta1=p.adalora_beta1,
                                  beta2=p.adalora_beta2, orth_reg_weight=p.adalora_orth_reg_weight,
                                  task_type="CAUSAL_LM")
    if m == "lokr":
        return peft.LoKrConfig(r=p.r, alpha=p.alpha, target_modules=targets, task_type="CAUSAL_LM")
    if m == "loha":
        return peft.LoHaConfig(r=p.r, alpha=p.alpha, target_modules=targets, task_type="CAUSAL_LM")
    if m == "hra":
        return peft.HRAConfig(r=p.r, target_modules=targets, task_type="CAUSAL_LM")
    raise ConfigError(f"peft.method={m!r} (prompt learning) has no peft adapter config here; "
                      f"use one of {', '.join(INJECTABLE)}")


def adalora_target_r(cfg) -> int:
    """AdaLoRA's final average rank per module: peft.adalora_target_r, or r // 2 when 0."""
    return cfg.peft.adalora_target_r or max(cfg.peft.r // 2, 1)


def adapter_seed(cfg) -> int:
    """The seed adapter init draws from (a 1-process reference seeds torch with it before get_peft_model)."""
    return cfg.train.seed + 7919


def check_init_adapter(cfg) -> None:
    """peft.init_adapter's checks that need no model weights, in the launching process before any rank starts:
    files present (safetensors), and adapter_config.json agreeing with cfg.peft on this model's family."""
    if not cfg.peft.init_adapter:
        return
    ac = read_adapter_config(cfg)
    _, hf = load_hf_config(cfg.model)
    spec = family_for(hf.model_type)
    refuse_unfused_families(cfg, spec)
    check_agrees(cfg, ac, build_peft_config(cfg, spec, cfg.train.steps))


def make_injector(cfg):
    """`inject(model, spec) -> PromptHooks | None` for parallelize(): adds adapters (or the prompt module) in
    place and freezes the base; prompt learning returns what the pipeline stages need to know."""

    def inject(model: torch.nn.Module, spec) -> PromptHooks | None:
        _require_peft(cfg)
        from peft import inject_adapter_in_model
        from peft.tuners.tuners_utils import cast_adapter_dtype

        if cfg.peft.method in PROMPT_LEARNING:
            if quant_spec(cfg) is not None:
                raise ConfigError(f"peft.method={cfg.peft.method!r} with peft.quantize_base: use 'qlora' for a 4-bit base")
            hooks = attach_prompt_learning(model, spec, cfg, adapter_seed(cfg))
            for n, prm in model.named_parameters():
                prm.requires_grad_(n.startswith("peft_prompt."))
            return hooks
        pc = build_peft_config(cfg, spec, cfg.train.steps)
        q = quant_spec(cfg)
        if q is not None:
            if cfg.parallel.tp > 1:
                mark_for_tp_quantization(model, spec, q)
            else:
                quantize_blocks(model, spec, q)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(adapter_seed(cfg))
            inject_adapter_in_model(pc, model)
        # peft creates adapters in the base layer's dtype: a 4-bit base with peft.compute_dtype='bf16' would give
        # bf16 adapters trained without an fp32 copy. Upcast them, as get_peft_model does (autocast_adapter_dtype).
        cast_adapter_dtype(model, adapter_name="default", autocast_adapter_dtype=True)
        for n, prm in model.named_parameters():
            prm.requires_grad_(_is_adapter_param(n))
        if not any(prm.requires_grad for prm in model.parameters()):
            raise ConfigError(f"peft.target_modules={pc.target_modules}: no module of the model matched")
        if cfg.peft.init_adapter:
            load_init_adapter(model, spec, cfg, pc)
        return None

    return inject


# AdaLoRA's `ranknum` (the initial rank, a scaling constant) is a frozen Parameter in peft: not an adapter key.
_ADAPTER_KEYS = ("lora_", "ia3_", "hada_", "lokr_", "hra_", "lora_magnitude_vector")


def _is_adapter_param(name: str) -> bool:
    return any(k in name for k in _ADAPTER_KEYS) and "base_layer" not in name.split(".")[-1]
