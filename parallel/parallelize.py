"""parallelize(): the one place where a full HF model becomes this rank's partitioned model.

The order is fixed and documented (DESIGN.md):
  1. tensor parallel   - per-family plan (parallel/models/<family>.py) applied by shared code
  2. PEFT injection    - adapters derive their sharding from the base layer's TP style
  3. pipeline split    - this rank's stage module(s), original parameter names kept
  4. activation ckpt   - full | selective, per decoder block
  5. data parallel     - ZeRO-2/3 wrap with FSDP2 here; ZeRO-0/1 sync grads in the backend
Everything reads its process groups from the named mesh axes; nothing computes ranks by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trellis.errors import ConfigError

from .activation_checkpoint import apply_activation_checkpointing
from .data_parallel import apply_fsdp, decoder_blocks
from .dims import ParallelDims, validate_model_dims
from .hf_surgery import prepare_model
from .models import FamilySpec, family_for


@dataclass
class ParallelModel:
    module: torch.nn.Module              # this rank's model: whole model, its pipeline stage, or a StageUnion
                                         # of its two virtual stages (interleaved 1F1B)
    spec: FamilySpec
    dims: ParallelDims
    blocks: list[torch.nn.Module]
    pipeline: object | None = None       # parallel.pipeline.Pipeline when pp > 1
    loss_parallel: bool = False          # logits are vocab-sharded DTensors
    fsdp: bool = False
    notes: list[str] = field(default_factory=list)

    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]


def parallelize(model: torch.nn.Module, dims: ParallelDims, cfg, *, compute_dtype: torch.dtype,
                inject_peft=None, loss_fn=None) -> ParallelModel:
    """Partition `model` for this rank according to `cfg` (a TrainConfig). `inject_peft(model, spec)`
    adds adapters; it runs after TP is planned but before the base is sharded (see step 2).
    `loss_fn(logits, labels) -> scalar` is the per-micro-batch loss the pipeline schedule calls."""
    from trellis.engine.model import model_dims

    spec = family_for(model.config.model_type)
    d = model_dims(model.config)
    validate_model_dims(dims, num_heads=d["num_heads"], num_kv_heads=d["num_kv_heads"], num_layers=d["num_layers"],
                        vocab_size=d["vocab_size"], intermediate_size=d["intermediate_size"],
                        micro_batches=cfg.train.grad_accum)
    mesh = dims.mesh
    z = cfg.zero

    # 0. family surgery that every layout shares (GPT-2 Conv1D -> Linear, unfused c_attn)
    prepare_model(model, spec)

    # 2 before 1 in code order: adapters must exist before the base is sharded, so the TP plan can
    # shard lora_A/lora_B with their base layer (injecting after DTensor TP is silently wrong).
    if inject_peft is not None:
        inject_peft(model, spec)

    # 1. tensor parallel
    loss_parallel = False
    if dims.tp_enabled:
        from .tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"], spec, sequence_parallel=cfg.parallel.sequence_parallel)
        loss_parallel = True
        for m in model.modules():  # modules that ask for the tp mesh (PEFT prefix: the k/v heads of its shard)
            if hasattr(m, "trellis_tp_mesh"):
                m.trellis_tp_mesh = mesh["tp"]

    # 3. pipeline split
    pipeline = None
    module = model
    if dims.pp_enabled:
        from .pipeline import build_pipeline

        pipeline = build_pipeline(model, spec, mesh["pp"], schedule=cfg.parallel.pp_schedule,
                                  n_microbatches=cfg.train.grad_accum, split_mode=cfg.parallel.pp_split, loss_fn=loss_fn)
        module = pipeline.stage_modules[0]

    stage_modules = pipeline.stage_modules if pipeline is not None else [model]
    blocks = [b for m in stage_modules for b in decoder_blocks(m, spec)]

    # 4. activation checkpointing
    apply_activation_checkpointing(blocks, spec, cfg.activation_checkpointing.mode)

    # 5. ZeRO-2/3 over dp (FSDP2); ZeRO-0/1 are handled by the backend's grad sync / optimizer.
    fsdp = z.stage >= 2
    if fsdp:
        if z.offload_optimizer == "cpu" and z.stage != 3:
            raise ConfigError("zero.offload_optimizer='cpu' natively needs zero.stage=3")
        dp_mesh = mesh["dp"]
        for m in stage_modules:
            apply_fsdp(m, decoder_blocks(m, spec), dp_mesh, stage=z.stage, compute_dtype=compute_dtype,
                       cpu_offload=z.offload_optimizer == "cpu" or z.offload_param == "cpu")

    if pipeline is not None:
        pipeline.make_schedule()
        if len(pipeline.stage_modules) > 1:
            # interleaved 1F1B: two virtual stages; one view of both under the original names
            from .pipeline import StageUnion

            module = StageUnion(pipeline.stage_modules)
    return ParallelModel(module=module, spec=spec, dims=dims, blocks=blocks, pipeline=pipeline,
                         loss_parallel=loss_parallel, fsdp=fsdp)
