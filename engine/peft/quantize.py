"""QLoRA's config policy: whether and how a run's frozen decoder-block linears are quantized (4 bit or int8).

The quantized linears themselves (bitsandbytes; 4 bit in both placements: the full linear at tp == 1, each
rank's shard under tp > 1; int8 at tp == 1 only) are parallel/quant4bit.py; this module only turns `cfg.peft`
into a `QuantSpec` (or None). For int8, double_quant and compute_dtype do not apply (LLM.int8 has neither).
"""

from __future__ import annotations

import torch

from trellis.configs.validate import base_quantization
from trellis.errors import ConfigError
from trellis.parallel.quant4bit import QuantSpec

__all__ = ["QuantSpec", "quant_spec"]


def quant_spec(cfg) -> QuantSpec | None:
    q = base_quantization(cfg)
    if q == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"peft.quantize_base={q!r} needs bitsandbytes: pip install bitsandbytes") from None
    dt = torch.bfloat16 if cfg.peft.compute_dtype == "bf16" else torch.float32
    return QuantSpec(q, cfg.peft.double_quant, dt)
