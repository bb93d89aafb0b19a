"""The typed seam between PEFT prompt learning and the partitioner.

Prompt tuning / P-tuning put virtual tokens in front of the token embeddings; prefix tuning / P-tuning v2
give every decoder block a key/value prefix. On the whole model the PEFT injector (engine/peft/prompt.py)
does both with forward hooks of its own; a pipeline stage does not call the decoder stack, so it has to be
told what to do. The injector returns a `PromptHooks` and the backend passes it to `parallelize()`, which
hands it to the pipeline's stage modules (parallel/pipeline.py, parallel/stage_forward.py) and binds the
tensor-parallel mesh. Nothing is read from attributes set on the HF model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PromptHooks:
    # Prompt tuning / P-tuning: (stage or model, token embeddings [b, s, h]) -> [virtual | embeddings], called by
    # the first stage right after the token embedding (before position embeddings and input norms).
    input_prefix: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    virtual_tokens: int = 0  # how many positions input_prefix puts in front (masks and positions cover them)
    # Prefix tuning / P-tuning v2: (stage or model, batch size, device) -> the read-only key/value prefix cache of
    # every layer; the stage forward offsets positions and the causal mask by `prefix_len`.
    kv_prefix: Callable[[nn.Module, int, torch.device], object] | None = None
    prefix_len: int = 0
    # Module paths kept on the first pipeline stage only (dropped from the others).
    first_stage_only: tuple[str, ...] = ()
    # Module paths with a replica on every pipeline stage: their gradients are summed over pp before each step.
    pp_replicated: tuple[str, ...] = ()
    # Called by parallelize() with the "tp" mesh once the model is sharded (prefix tuning keeps this rank's kv
    # heads of the replicated prefix encoder's output).
    bind_tp_mesh: Callable[[object], None] | None = None
