"""`peft.init_adapter = DIR`: continue training a PEFT-format adapter (peft's `save_pretrained`, or
`trellis export adapter`): `adapter_config.json` + `adapter_model.safetensors`.

The adapter's tensors are copied into the adapters trellis injects, on the whole unsharded model, before
tensor / pipeline parallel and ZeRO partition it (engine/peft/inject.py calls `load_init_adapter` right after
injection), so every layout shards the loaded values exactly as it shards fresh ones.

The config stays the one source of truth: adapter_config.json must *agree* with the peft.* settings (method,
r, alpha, target modules); it never sets them. A disagreement is a ConfigError naming the field, both values
and the fix, and fields trellis does not train with (bias, modules_to_save, rank/alpha patterns, ...) must be
at their defaults. peft.dropout is a training choice and is not compared. Safetensors only: a pickled
`adapter_model.bin` is refused (never unpickled).

`check_init_adapter` (inject.py) runs the file and config checks in the launching process, before any rank starts;
the shape check (a different base model) needs the injected model and runs on the ranks before the first step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trellis.errors import ConfigError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# trellis method -> what peft writes for it: (peft_type, use_dora, use_rslora); qlora is LoRA on a 4-bit base.
# The keys are configs.schema.PEFT_INIT_ADAPTER_METHODS (configs/validate.py refuses the others).
_METHODS = {"lora": ("LORA", False, False), "qlora": ("LORA", False, False), "rslora": ("LORA", False, True),
            "dora": ("LORA", True, False), "ia3": ("IA3", False, False)}
# peft fields that change what the adapter computes and that trellis' injection never sets: they must be off.
_MUST_BE_OFF = ("bias", "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
                "layers_to_transform", "layer_replication", "use_qalora", "target_parameters",
                "trainable_token_indices")
_OFF_VALUES = (None, False, "none", {}, [])


def _field(ac_key: str) -> str:
    return {"r": "peft.r", "lora_alpha": "peft.alpha", "target_modules": "peft.target_modules",
            "feedforward_modules": "peft.target_modules"}[ac_key]


def read_adapter_config(cfg) -> dict:
    """adapter_config.json of peft.init_adapter, after checking the directory holds a safetensors adapter."""
    d = Path(cfg.peft.init_adapter)
    where = f"peft.init_adapter={cfg.peft.init_adapter!r}"
    if not d.is_dir():
        raise ConfigError(f"{where}: no such directory; give the directory peft's save_pretrained (or "
                          "`trellis export adapter`) wrote")
    if not (d / CONFIG_FILE).is_file():
        raise ConfigError(f"{where}: {d / CONFIG_FILE} is missing; a PEFT adapter directory holds "
                          f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    if not (d / WEIGHTS_FILE).is_file():
        if (d / "adapter_model.bin").is_file():
            raise ConfigError(f"{where}: {d / 'adapter_model.bin'} is a pickle, which trellis never loads; convert "
                              "it once where you trust it (PeftModel.from_pretrained(...).save_pretrained(DIR, "
                              f"safe_serialization=True)) to get {WEIGHTS_FILE}")
        raise ConfigError(f"{where}: {d / WEIGHTS_FILE} is missing")
    try:
        ac = json.loads((d / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {d / CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(ac, dict):
        raise ConfigError(f"{where}: {d / CONFIG_FILE} is not a JSON object")
    return ac


def _method_of(ac: dict) -> str | None:
    key = (ac.get("peft_type"), bool(ac.get("use_dora")), bool(ac.get("use_rslora")))
    return next((m for m, v in _METHODS.items() if v == key and m != "qlora"), None)


def _same_modules(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return set(a or ()) == set(b or ())


def _shown(value):
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


def check_agrees(cfg, ac: dict, pc) -> None:
    """ConfigError listing every field where adapter_config.json `ac` disagrees with the peft config `pc`
    trellis builds from cfg.peft (engine/peft/inject.py: build_peft_config)."""
    where = f"peft.init_adapter={cfg.peft.init_adapter!r}: {CONFIG_FILE}"
    got = _method_of(ac)
    if got is None:
        raise ConfigError(f"{where} is a {ac.get('peft_type')!r} adapter (use_dora={ac.get('use_dora')}, "
                          f"use_rslora={ac.get('use_rslora')}); continuing an adapter supports LoRA, rsLoRA, DoRA, "
                          "QLoRA (LoRA on a 4-bit base) and IA3")
    want = cfg.peft.method
    if _METHODS[got] != _METHODS[want]:
        raise ConfigError(f"{where} is a {got!r} adapter but peft.method={want!r}; set peft.method={got!r}")
    errors = []
    keys = ("r", "lora_alpha", "target_modules") if got != "ia3" else ("target_modules", "feedforward_modules")
    for key in keys:
        mine = getattr(pc, key)
        theirs = ac.get(key)
        same = _same_modules(mine, theirs) if key.endswith("modules") else theirs == mine
        if not same:
            errors.append(f"{where} has {key}={_shown(theirs)!r} but {_field(key)} gives {_shown(mine)!r}; set "
                          f"{_field(key)} to the adapter's value")
    for key in _MUST_BE_OFF:
        if key in ac and ac[key] not in _OFF_VALUES:
            errors.append(f"{where} sets {key}={ac[key]!r}, which trellis does not train with; only adapters "
                          f"with {key} unset can be continued")
    if errors:
        raise ConfigError(errors)


def refuse_unfused_families(cfg, spec) -> None:
    if spec.fused:
        raise ConfigError(f"peft.init_adapter={cfg.peft.init_adapter!r}: continuing an adapter is not supported "
                          f"for {spec.name} yet (trellis trains its fused projections unfused into their parts); "
                          "use a llama, mistral, qwen2, qwen3, gemma2, opt, bloom or gpt_neox model")
    if spec.name == "gpt2":
        raise ConfigError(f"peft.init_adapter={cfg.peft.init_adapter!r}: continuing an adapter is not supported "
                          "for GPT-2 yet (trellis trains its c_attn unfused into q/k/v); use a llama, mistral, "
                          "qwen2, opt, bloom or gpt_neox model")


def saved_key(name: str) -> str:
    """The key peft's save_pretrained writes for the injected parameter `name` (peft's
    get_peft_model_state_dict: `base_model.model.` prefix, adapter name removed, DoRA's `.weight` dropped)."""
    key = "base_model.model." + name.replace(".default", "")
    suffix = "lora_magnitude_vector.weight"
    return key[:-len(".weight")] if key.endswith(suffix) else key


def load_init_adapter(model: torch.nn.Module, spec, cfg, pc) -> None:
    """Copy peft.init_adapter's tensors into `model`'s freshly injected adapters (whole, unsharded model)."""
    from safetensors.torch import load_file

    ac = read_adapter_config(cfg)
    refuse_unfused_families(cfg, spec)
    check_agrees(cfg, ac, pc)
    path = Path(cfg.peft.init_adapter) / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one message naming it
        raise ConfigError(f"peft.init_adapter: {path} is not a readable safetensors file ({e})") from None
    own = {saved_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(f"peft.init_adapter: {path} does not hold this model's adapters (a different base "
                          f"model or peft.target_modules?): missing {missing[:3]}, unexpected {unexpected[:3]} "
                          f"({len(missing)} missing, {len(unexpected)} unexpected)")
    wrong = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(p.shape)} on model.path={cfg.model.path!r}"
             for k, p in own.items() if state[k].shape != p.shape]
    if wrong:
        raise ConfigError(f"peft.init_adapter: {path} was made for another base model (shape mismatch, "
                          f"{len(wrong)} tensors): {'; '.join(wrong[:2])}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k].to(p.dtype))
