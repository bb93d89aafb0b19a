"""Backends: what runs forward / backward / the optimizer step behind the Trainer.

`build_backend(cfg, ...)` is the only place that reads `zero.backend`: native (DTensor TP, pipelining,
FSDP2 ZeRO, engine/backends/native.py) or DeepSpeed's engine (engine/backends/deepspeed.py, the only module
that imports deepspeed). Both implement `Backend` (engine/backends/base.py).
"""

from __future__ import annotations
