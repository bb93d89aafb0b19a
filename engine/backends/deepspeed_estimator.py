"""DeepSpeed's own model-states estimator, for the side-by-side of `trellis estimate-memory --explain`.

DeepSpeed ships pure functions (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`,
the ones behind `estimate_zero3_model_states_mem_needs_all_cold`) over a parameter count, the largest layer's
parameter count and the GPU count. They are a formula, not a measurement: trellis' own DeepSpeed accounting
(engine/memory/estimator.py) is validated against a live DeepSpeed engine; this module only reports what
DeepSpeed's formula says, for comparison. `import deepspeed` stays in engine/backends/deepspeed*.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeepSpeedEstimate:
    zero: int
    offload_optimizer: bool
    offload_param: bool
    gpu_bytes: float  # per GPU
    cpu_bytes: float  # per node (DeepSpeed's additional_buffer_factor 1.5 included, as it prints)


def deepspeed_estimate(*, total_params: int, largest_layer_params: int, gpus_per_node: int, nodes: int, zero: int,
                       offload_optimizer: bool, offload_param: bool) -> DeepSpeedEstimate | None:
    """DeepSpeed's estimate of the per-GPU and per-node CPU bytes of the model states (cold: no model instance,
    the `..._all_cold` variants), or None for a stage DeepSpeed has no estimator for (0, 1)."""
    if zero == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node=gpus_per_node,
                                                         num_nodes=nodes, cpu_offload=offload_optimizer)
        return DeepSpeedEstimate(2, offload_optimizer, False, float(gpu), float(cpu))
    if zero == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        # DeepSpeed's cpu_offload_params only applies together with cpu_offload (its own options table)
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total_params, largest_layer_params,
                                                            num_gpus_per_node=gpus_per_node, num_nodes=nodes,
                                                            cpu_offload=offload_optimizer,
                                                            cpu_offload_params=offload_optimizer and offload_param,
                                                            zero_init=True)
        return DeepSpeedEstimate(3, offload_optimizer, offload_optimizer and offload_param, float(gpu), float(cpu))
    return None
