"""Print the docs table: trellis' DeepSpeed accounting vs DeepSpeed's own model-states estimator.

    python tools/deepspeed_estimator_table.py

Llama-2-7B / 13B / 70B, bf16, Adam, ZeRO-2/3 with and without CPU offload, on 1 x 8 and 4 x 8 GPUs. Per GPU
and per node (CPU) bytes of the model states only (no activations), as DeepSpeed's formula covers.
"""

from __future__ import annotations


from trellis.commands.memory import fmt, model_states_gpu
from trellis.engine.backends.deepspeed_estimator import deepspeed_estimate
from trellis.engine.memory.estimator import TrainingSetup, estimate, largest_module_params
from trellis.engine.memory.models import resolve_model, total_params


def rows():
    for model in ("llama-2-7b", "llama-2-13b", "llama-2-70b"):
        d = resolve_model(model)
        for nodes in (1, 4):
            for zero, off in ((2, False), (2, True), (3, False), (3, True)):
                s = TrainingSetup(backend="deepspeed", dp=8 * nodes, zero=zero, precision="bf16",
                                  offload_optimizer="cpu" if off else "none",
                                  offload_param="cpu" if off and zero == 3 else "none")
                est = estimate(d, s)
                ds = deepspeed_estimate(total_params=total_params(d), largest_layer_params=int(largest_module_params(d)),
                                        gpus_per_node=8, nodes=nodes, zero=zero, offload_optimizer=off,
                                        offload_param=off and zero == 3)
                yield (model, f"{nodes} x 8", f"ZeRO-{zero}" + (" + offload" if off else ""),
                       model_states_gpu(est.worst_rank), ds.gpu_bytes, est.host_ram_per_node(), ds.cpu_bytes)


def main() -> None:
    print("| model | GPUs | stage | trellis GPU | DeepSpeed GPU | trellis CPU / node | DeepSpeed CPU / node |")
    print("|---|---|---|---|---|---|---|")
    for m, g, st, tg, dg, tc, dc in rows():
        print(f"| {m} | {g} | {st} | {fmt(tg)} | {fmt(dg)} | {fmt(tc)} | {fmt(dc)} |")


if __name__ == "__main__":
    main()
