"""parallelize(): the one place where a full HF model becomes this rank's partitioned model.

The steps, in the order the code runs them:
  1. layout checks     - model-dependent rules (parallel/dims.py) on the dims read from the HF config
  2. family surgery    - every layout alike (GPT-2 Conv1D -> Linear, c_attn unfused; parallel/hf_surgery.py)
  3. PEFT injection    - adapters / prompt module on the whole, unsharded model, before TP: the TP plan then
                         shards lora_A / lora_B with their base layer (injecting after DTensor TP is
                         silently wrong); the injector returns the PromptHooks of prompt learning
  4. tensor parallel   - per-family plan (parallel/models/<family>.py) applied by shared code
  4b. context parallel - attention through the all-to-all over heads (parallel/context_parallel.py)
  5. pipeline split    - this rank's stage module(s), original parameter names kept
  6. activation ckpt   - full | selective, per decoder block
  6b. compile          - train.compile: torch.compile per decoder block (parallel/compile.py)
  7. data parallel     - ZeRO-2/3 wrap with FSDP2 here over dp (dp x cp with context parallel); ZeRO-0/1
                         sync grads in the backend
Steps 1-3 and 6 are what every backend shares: the DeepSpeed backend calls parallelize() with
`shard_data_parallel=False` (DeepSpeed's engine shards over dp itself; it runs with tp = pp = 1).
Everything reads its process groups from the named mesh axes; nothing computes ranks by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trellis.errors import ConfigError

from .activation_checkpoint import apply_activation_checkpointing
from .compile import apply_compile
from .context_parallel import ContextParallel, apply_context_parallel, cp_family_errors
from .data_parallel import apply_fsdp, decoder_blocks
from .dims import ParallelDims, validate_model_dims
from .hf_compat import alibi_from_key_positions
from .hf_surgery import prepare_model
from .models import FamilySpec, family_for
from .models.dims import dims_from_hf_config
from .pipeline import StageUnion, build_pipeline
from .prompt_hooks import PromptHooks
from .tensor_parallel import apply_tensor_parallel


@dataclass
class ParallelModel:
    module: torch.nn.Module              # this rank's model: whole model, its pipeline stage, or a StageUnion
                                         # of its two virtual stages (interleaved 1F1B)
    spec: FamilySpec
    pipeline: object | None = None       # parallel.pipeline.Pipeline when pp > 1
    loss_parallel: bool = False          # logits are vocab-sharded DTensors
    fsdp: bool = False
    prompt: PromptHooks | None = None    # PEFT prompt learning's hooks (None without prompt learning)
    cp: ContextParallel | None = None     # this rank's sequence chunk (None without context parallel)

    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]


def parallelize(model: torch.nn.Module, dims: ParallelDims, cfg, *, compute_dtype: torch.dtype,
                inject_peft=None, loss_fn=None, shard_data_parallel: bool = True) -> ParallelModel:
    """Partition `model` for this rank according to `cfg` (a TrainConfig). `inject_peft(model, spec)` adds
    adapters and returns `PromptHooks | None`; it runs on the whole model before TP (step 3).
    `loss_fn(logits, labels) -> scalar` is the per-micro-batch loss the pipeline schedule calls.
    `shard_data_parallel=False`: no FSDP2 wrap (a backend that shards over dp itself)."""
    spec = family_for(model.config.model_type)
    d = dims_from_hf_config(model.config)
    validate_model_dims(dims, num_heads=d.heads, num_kv_heads=d.kv_heads, num_layers=d.layers, vocab_size=d.vocab,
                        intermediate_size=d.ffn, micro_batches=cfg.train.grad_accum,
                        pp_schedule=cfg.parallel.pp_schedule)
    mesh = dims.mesh
    z = cfg.zero
    if dims.cp_enabled and cp_family_errors(spec.name, dims.cp):
        raise ConfigError(cp_family_errors(spec.name, dims.cp))

    prepare_model(model, spec)
    if spec.alibi:  # ALiBi with the 4D block-causal mask of packed batches (parallel/attention.py)
        alibi_from_key_positions(model, spec.backbone)
    prompt = inject_peft(model, spec) if inject_peft is not None else None

    loss_parallel = False
    if dims.tp_enabled:
        apply_tensor_parallel(model, mesh["tp"], spec, sequence_parallel=cfg.parallel.sequence_parallel)
        loss_parallel = True
        if prompt is not None and prompt.bind_tp_mesh is not None:  # prefix tuning: the kv heads of its shard
            prompt.bind_tp_mesh(mesh["tp"])

    cp = apply_context_parallel(model, spec, mesh["cp"]) if dims.cp_enabled else None

    pipeline = None
    module = model
    if dims.pp_enabled:
        pipeline = build_pipeline(model, spec, mesh["pp"], schedule=cfg.parallel.pp_schedule,
                                  n_microbatches=cfg.train.grad_accum, split_mode=cfg.parallel.pp_split,
                                  loss_fn=loss_fn, prompt=prompt)
        module = pipeline.stage_modules[0]
    stage_modules = pipeline.stage_modules if pipeline is not None else [model]

    apply_activation_checkpointing([b for m in stage_modules for b in decoder_blocks(m, spec)], spec,
                                   cfg.activation_checkpointing.mode)
    if cfg.train.compile:  # after TP and checkpointing, before FSDP2 (torchtitan's order)
        apply_compile([b for m in stage_modules for b in decoder_blocks(m, spec)])

    # ZeRO-2/3 over dp (FSDP2); ZeRO-0/1 are handled by the backend's grad sync / optimizer.
    fsdp = shard_data_parallel and z.stage >= 2
    if fsdp:
        for m in stage_modules:
            apply_fsdp(m, decoder_blocks(m, spec), dims.data_mesh, stage=z.stage, compute_dtype=compute_dtype,
                       cpu_offload=z.offload_optimizer == "cpu" or z.offload_param == "cpu",
                       pin_memory=z.pin_memory)

    if pipeline is not None:
        pipeline.make_schedule()
        if len(pipeline.stage_modules) > 1:
            # interleaved 1F1B: two virtual stages; one view of both under the original names
            module = StageUnion(pipeline.stage_modules)
    return ParallelModel(module=module, spec=spec, pipeline=pipeline, loss_parallel=loss_parallel, fsdp=fsdp,
                         prompt=prompt, cp=cp)
