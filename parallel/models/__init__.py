"""Per-family specs (tensor-parallel plan + structure for the pipeline split), as data."""

from __future__ import annotations

from trellis.errors import ConfigError

from . import bloom, gpt2, gpt_neox, llama, opt
from .base import FamilySpec

FAMILIES: tuple[FamilySpec, ...] = (llama.SPEC, gpt2.SPEC, opt.SPEC, bloom.SPEC, gpt_neox.SPEC)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str) -> FamilySpec:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    raise ConfigError(f"model type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}")


__all__ = ["FAMILIES", "FamilySpec", "family_for", "supported_model_types"]
