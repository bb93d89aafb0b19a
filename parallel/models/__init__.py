"""Per-family specs (tensor-parallel plan, structure for the pipeline split, config keys and block linears),
as data: one file per family, each with a module-level `SPEC`; this package finds them (adding a family is
one file)."""

from __future__ import annotations

import importlib
import pkgutil

from trellis.errors import ConfigError

from .base import FamilySpec


def _discover() -> tuple[FamilySpec, ...]:
    mods = (importlib.import_module(f"{__name__}.{m.name}") for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
            if m.name not in ("base", "dims", "checks"))
    return tuple(m.SPEC for m in mods if isinstance(getattr(m, "SPEC", None), FamilySpec))


FAMILIES: tuple[FamilySpec, ...] = _discover()


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str) -> FamilySpec:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    raise ConfigError(f"model type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}")


__all__ = ["FAMILIES", "FamilySpec", "family_for", "supported_model_types"]
