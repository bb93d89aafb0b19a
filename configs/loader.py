"""TOML → TrainConfig: strict keys, typed values, dotted CLI overrides, all errors in one report."""

from __future__ import annotations

import dataclasses
import os
import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any

from trellis.errors import ConfigError

from .deepspeed_json import map_deepspeed_json
from .schema import TrainConfig
from .validate import validate

PRESET_DIR = Path(__file__).resolve().parent

# Keys that are not (or no longer) trellis keys, with what to write instead: a renamed or removed key is an
# error naming its replacement, never silently ignored. A key renamed in the schema moves here.
RENAMED_KEYS: dict[str, str] = {
    "train.batch_size": "train.micro_batch_size (sequences per rank and micro-batch) or train.global_batch_size",
    "train.gradient_accumulation_steps": "train.grad_accum",
    "train.max_steps": "train.steps",
    "train.learning_rate": "train.lr",
    "train.warmup": "train.warmup_steps",
    "train.max_grad_norm": "train.grad_clip",
    "precision.mixed_precision": "precision.dtype",
    "parallel.pipeline_schedule": "parallel.pp_schedule",
    "parallel.tensor_parallel": "parallel.tp",
    "parallel.pipeline_parallel": "parallel.pp",
    "parallel.data_parallel": "parallel.dp",
    "zero.offload": "zero.offload_optimizer and/or zero.offload_param",
    "activation_checkpointing.enabled": "activation_checkpointing.mode ('full' or 'selective')",
    "checkpoint.save_interval": "checkpoint.interval",
    "checkpoint.keep": "checkpoint.keep_last_k",
    "peft.lora_r": "peft.r",
    "peft.lora_alpha": "peft.alpha",
    "peft.lora_dropout": "peft.dropout",
    "launcher.nproc": "launcher.nproc_per_node",
}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def section_fields(cfg_cls=TrainConfig) -> dict[str, dict[str, Any]]:
    """{section: {key: type}} for every user key (the CLI surface)."""
    out = {}
    for name, sec_type in _hints(cfg_cls).items():
        if dataclasses.is_dataclass(sec_type):
            out[name] = _hints(sec_type)
    return out


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s, keys in section_fields().items() for k in keys]


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(t))
    if origin is list:
        return "a list of strings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, str(t))


def coerce(key: str, value: Any, t) -> Any:
    """Return `value` converted to type `t`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(t)
    bad = ConfigError(f"{key}: expected {_type_name(t)}, got {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(t)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        # "2" from a CLI override for Literal[0, 1, 2, 3]
        for a in allowed:
            if str(a) == str(value):
                return a
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}"
                          + (_did_you_mean(str(value), [str(a) for a in allowed])))
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return list(value)
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if t is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if t is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise bad
        return value
    raise bad  # pragma: no cover - schema uses only the types above


def parse_override_value(text: str) -> Any:
    """`--train.lr=1e-3` → 0.001; `--model.path=foo` → "foo"; TOML literal syntax, else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split `--section.key=value` / `--section.key value` pairs; return (overrides, errors)."""
    overrides: dict[str, Any] = {}
    errors: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or "." not in a.split("=", 1)[0]:
            errors.append(f"{a}: unexpected argument; config overrides look like --train.lr=1e-3")
            i += 1
            continue
        if "=" in a:
            k, v = a[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            k, v = a[2:], args[i + 1]
            i += 1
        else:
            errors.append(f"{a}: missing value; write {a}=VALUE")
            i += 1
            continue
        overrides[k] = parse_override_value(v)
        i += 1
    return overrides, errors


def _flatten(raw: dict, errors: list[str]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    sections = section_fields()
    for sec, body in raw.items():
        if sec not in sections:
            errors.append(f"{sec}: unknown section{_did_you_mean(sec, list(sections))}"
                          f" (sections: {', '.join(sections)})")
            continue
        if not isinstance(body, dict):
            errors.append(f"{sec}: must be a table ([{sec}]), got {body!r}")
            continue
        for k, v in body.items():
            flat[f"{sec}.{k}"] = v
    return flat


def build(values: dict[str, Any], source: str = "") -> TrainConfig:
    """Build a TrainConfig from flat `section.key` values; every problem goes into one ConfigError."""
    errors: list[str] = []
    sections = section_fields()
    keys = all_keys()
    per_section: dict[str, dict[str, Any]] = {s: {} for s in sections}
    for dotted, v in values.items():
        sec, _, key = dotted.partition(".")
        if dotted in RENAMED_KEYS:
            errors.append(f"{dotted}: not a trellis key (renamed or removed); use {RENAMED_KEYS[dotted]}")
            continue
        if sec not in sections or key not in sections[sec]:
            errors.append(f"{dotted}: unknown key{_did_you_mean(dotted, keys)}")
            continue
        try:
            per_section[sec][key] = coerce(dotted, v, sections[sec][key])
        except ConfigError as e:
            errors.extend(e.messages)
    if errors:
        raise ConfigError(errors)
    hints = _hints(TrainConfig)
    cfg = TrainConfig(**{s: hints[s](**kv) for s, kv in per_section.items()}, source=source)
    validate(cfg)
    return cfg


def resolve_config_path(path: str) -> Path:
    """A file path, or a preset name shipped in configs/ (e.g. "tiny-llama")."""
    p = Path(path)
    if p.is_file():
        return p
    preset = PRESET_DIR / (path if path.endswith(".toml") else f"{path}.toml")
    if preset.is_file():
        return preset
    presets = sorted(f.stem for f in PRESET_DIR.glob("*.toml"))
    raise ConfigError(f"config: no such file or preset {path!r}{_did_you_mean(p.stem, presets)}"
                      f" (presets: {', '.join(presets)})")


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


BATCH_FIELDS = ("train.micro_batch_size", "train.grad_accum", "train.global_batch_size")


def _layer_batch_fields(values: dict[str, Any], from_json: dict[str, Any], from_cli: dict[str, Any]) -> list[str]:
    """TOML < JSON < CLI for the three batch fields, which constrain each other (global = micro x accum x dp): a
    field a higher layer did not give is derived from the ones it did, as DeepSpeed derives it, instead of
    contradicting them: the lowest-ranked of the three is derived from the other two. The JSON's train_batch_size
    with its micro batch derives grad_accum (the TOML's is replaced), also when the CLI sets the micro batch; a CLI
    grad_accum (or both) re-derives the global batch; all three from one layer are checked. Edits `values`."""
    rank = {k: 2 if k in from_cli else 1 if k in from_json else 0 for k in BATCH_FIELDS}
    mb, ga, gb = BATCH_FIELDS
    if rank[gb] == 0:
        return []
    lo, hi = min(rank[mb], rank[ga]), max(rank[mb], rank[ga])
    if rank[gb] < lo or (rank[gb] == lo < hi):  # the CLI set the micro batch and/or accumulation: global follows
        values.pop(gb, None)
        return []
    if rank[gb] > lo:  # e.g. the JSON's train_batch_size over the TOML's grad_accum: derive the lowest-ranked one
        derive = ga if rank[ga] <= rank[mb] else mb
        other = mb if derive == ga else ga
        dp = _resolved_dp(values)
        given = int(values.get(other, getattr(TrainConfig().train, other.split(".")[1])))
        if dp is None:
            return [f"{gb}={values.pop(gb)} (--deepspeed train_batch_size) needs parallel.dp set (not -1) to derive "
                    f"{derive}; set parallel.dp, or give {derive} in the JSON"]
        q, r = divmod(int(values[gb]), max(given, 1) * dp)
        if r or q < 1:
            msg = f"{gb}={values.pop(gb)} (--deepspeed train_batch_size) is not a multiple of {other}={given} x "
            return [msg + f"parallel.dp={dp}; change one of them"]  # popped: the global-batch rule would repeat it
        values[derive] = q
    return []


def _resolved_dp(values: dict[str, Any]) -> int | None:
    """parallel.dp, with -1 resolved from the launcher's WORLD_SIZE (else trellis starts pp x tp ranks: dp 1)."""
    dp = int(values.get("parallel.dp", TrainConfig().parallel.dp))
    if dp > 0:
        return dp
    tp, pp = int(values.get("parallel.tp", 1)), int(values.get("parallel.pp", 1))
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        return 1
    return int(world) // (tp * pp) if int(world) % (tp * pp) == 0 else None


def load(path: str | dict | None = None, overrides: list[str] | dict[str, Any] | None = None,
         deepspeed_json: str | None = None) -> TrainConfig:
    """Config file (or preset, or a {section: {key: value}} dict as TOML would give) + optional DeepSpeed JSON
    + dotted CLI overrides → validated config.

    Precedence, lowest first: schema defaults, the TOML file, the DeepSpeed JSON, CLI overrides.
    """
    errors: list[str] = []
    values: dict[str, Any] = {}
    source = ""
    if isinstance(path, dict):
        values.update(_flatten(path, errors))
    elif path:
        p = resolve_config_path(path)
        source = str(p)
        values.update(_flatten(read_toml(p), errors))
    from_json: dict[str, Any] = {}
    if deepspeed_json:
        try:
            from_json = map_deepspeed_json(deepspeed_json)
        except ConfigError as e:
            errors.extend(e.messages)
        values.update(from_json)
    from_cli: dict[str, Any] = {}
    if isinstance(overrides, dict):
        from_cli = dict(overrides)
    elif overrides:
        from_cli, ov_errors = parse_overrides(overrides)
        errors.extend(ov_errors)
    values.update(from_cli)
    for layer, above in ((from_json, from_cli), (from_cli, {})):  # a floor set in a higher layer replaces
        for key, other in (("train.min_lr", "train.min_lr_ratio"), ("train.min_lr_ratio", "train.min_lr")):
            if key in layer and other not in layer and other not in above:  # the other form of it below
                values.pop(other, None)  # e.g. --train.min_lr=0 on a preset with min_lr_ratio: no floor
    if from_json:
        errors.extend(_layer_batch_fields(values, from_json, from_cli))
    try:
        cfg = build(values, source)
    except ConfigError as e:
        raise ConfigError(errors + e.messages) from None
    if errors:
        raise ConfigError(errors)
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    return {s: dataclasses.asdict(getattr(cfg, s)) for s in section_fields()}


def to_toml(cfg: TrainConfig) -> str:
    """Resolved config as TOML text (`trellis config show`)."""
    lines = []
    for sec, body in to_dict(cfg).items():
        lines.append(f"[{sec}]")
        for k, v in body.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'
