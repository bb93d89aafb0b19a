"""Benchmark (not a test): tokens/s per layout relative to 1 process, and collective payload bytes per
step per mesh axis next to the theoretical payload for that layout.

Bytes are counted by a comm-counting mode active inside every rank: the c10d Python API (all_reduce,
broadcast, send/recv, ...) is wrapped, and DTensor's functional collectives are seen through a
TorchDispatchMode. Each call is attributed to the mesh axis whose process group it used. "Payload" is the
size of the tensor handed to the collective (what one rank contributes), not wire bytes, which depend
on the algorithm (a ring all-reduce moves 2(n-1)/n of it).

    .venv/bin/python bench/layouts.py [--steps 6] [--layouts 1,dp2,tp2,pp2,dp2tp2,pp2tp2,dp2pp2tp2]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYOUTS = {
    "1": dict(dp=1, pp=1, tp=1), "dp2": dict(dp=2, pp=1, tp=1), "tp2": dict(dp=1, pp=1, tp=2),
    "pp2": dict(dp=1, pp=2, tp=1), "dp2tp2": dict(dp=2, pp=1, tp=2), "pp2tp2": dict(dp=1, pp=2, tp=2),
    "dp2pp2tp2": dict(dp=2, pp=2, tp=2),
}
GLOBAL_BATCH, SEQ, MICRO = 8, 128, 1


def _count_worker(rank: int, world: int, layout: dict, steps: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    from trellis import configs
    from trellis.engine.distributed import init_distributed
    from trellis.engine.trainer import Trainer
    from trellis.parallel.models import family_for

    ctx = init_distributed(300.0)
    accum = GLOBAL_BATCH // (MICRO * layout["dp"])
    cfg = configs.load("tiny-llama", {"parallel.dp": layout["dp"], "parallel.pp": layout["pp"], "parallel.tp": layout["tp"],
                                      "train.micro_batch_size": MICRO, "train.grad_accum": accum, "train.steps": steps,
                                      "data.seq_len": SEQ, "logging.progress": "none", "logging.metrics_file": ""})
    trainer = Trainer(cfg, ctx)
    mesh = trainer.dims.mesh
    axis_of = {}
    for axis in ("pp", "dp", "tp"):
        axis_of[tuple(dist.get_process_group_ranks(mesh[axis].get_group()))] = axis
    counts: dict[str, int] = defaultdict(int)
    active = {"on": False}

    def axis_for(group) -> str:
        # by ranks: a mesh axis spanning the whole world may be the default group itself
        ranks = tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
        return axis_of.get(ranks, "world")

    def wrap(name):
        fn = getattr(dist, name)

        def counted(tensor, *args, **kwargs):
            if active["on"] and torch.is_tensor(tensor):
                group = kwargs.get("group")
                if group is None:
                    group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
                counts[axis_for(group)] += tensor.numel() * tensor.element_size()
            return fn(tensor, *args, **kwargs)

        setattr(dist, name, counted)

    # (isend/irecv stay unwrapped: P2POp checks their identity; batch_isend_irecv is counted below)
    for name in ("all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor"):
        wrap(name)

    class FunctionalCollectives(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            collective = any(k in func.__name__ for k in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all",
                                                            "broadcast"))  # not wait_tensor / autograd wrappers
            if active["on"] and func.namespace == "_c10d_functional" and collective and args \
                    and torch.is_tensor(args[0]):
                from torch.distributed.distributed_c10d import _resolve_process_group

                group_name = args[-1] if isinstance(args[-1], str) else kwargs.get("group_name")
                # by ranks, like the c10d path: DTensor may hold its own group object for a mesh axis
                axis = f"other:{func.__name__}"
                if isinstance(group_name, str):
                    axis = axis_of.get(tuple(dist.get_process_group_ranks(_resolve_process_group(group_name))), axis)
                counts[axis] += args[0].numel() * args[0].element_size()
            return func(*args, **kwargs)

    # P2P of the pipeline schedule uses batch_isend_irecv with P2POp objects.
    orig_batch = dist.batch_isend_irecv

    def batch(ops):
        if active["on"]:
            for op in ops:
                counts["pp"] += op.tensor.numel() * op.tensor.element_size()
        return orig_batch(ops)

    dist.batch_isend_irecv = batch
    import torch.distributed.pipelining.stage as stage_mod

    stage_mod.dist.batch_isend_irecv = batch
    # warm-up step (shape inference, first allocations) is not counted
    trainer.backend.train_step(trainer.sampler.next(), 1e-4)
    active["on"] = True
    import time

    t0 = time.perf_counter()
    with FunctionalCollectives():
        for _ in range(steps):
            trainer.backend.train_step(trainer.sampler.next(), 1e-4)
    dt = (time.perf_counter() - t0) / steps
    active["on"] = False
    params_local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in trainer.backend.params)
    return {"rank": rank, "step_s": dt, "bytes": {k: v // steps for k, v in counts.items()},
            "params_local": params_local, "hidden": trainer.hf_config.hidden_size,
            "layers": trainer.hf_config.num_hidden_layers, "vocab": trainer.hf_config.vocab_size,
            "tp_plan": dict(family_for(trainer.hf_config.model_type).tp_plan)}


def theory(layout: dict, r: dict) -> dict[str, int]:
    """Payload bytes per step for one rank (fp32), hand-derived:
    dp: one all-reduce of this rank's gradients (+ 3 tiny scalars: tokens, loss, stop flag).
    tp: per decoder layer and micro-batch, 2 activation all-reduces forward (attention out, MLP out) of
        b*s*h floats, and in backward one all-reduce of the input gradient per column-parallel linear: DTensor
        reduces each Partial input gradient on its own (Llama: q, k, v, gate, up = 5), where Megatron sums them
        first and reduces twice (attention input, MLP input); on the first stage the vocab-parallel embedding's
        forward all-reduce (its backward reduces nothing: token ids have no gradient), on the last stage the
        column-parallel head's input gradient. The Megatron figure is printed next to it.
    pp: per micro-batch one activation send forward and one gradient send backward of b*s*h floats per
        stage boundary, counted on both sides (send + recv)."""
    dp, pp, tp = layout["dp"], layout["pp"], layout["tp"]
    accum = GLOBAL_BATCH // (MICRO * dp)
    act = MICRO * SEQ * r["hidden"] * 4
    out = {}
    if dp > 1:
        out["dp"] = r["params_local"] * 4
    if tp > 1:
        layers_here = r["layers"] // pp
        col = sum(style.startswith("colwise") for style in r["tp_plan"].values())
        ends = act + (act if pp == 1 else 0)  # rank 0: the embedding's forward all-reduce (+ the head's input grad)
        out["tp"] = accum * ((2 + col) * layers_here * act + ends)
        out["tp_megatron"] = accum * (4 * layers_here * act + ends)
    if pp > 1:
        out["pp"] = accum * 2 * act
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.distributed.harness import run_ranks

    rows = []
    base = None
    for name in args.layouts.split(","):
        lay = LAYOUTS[name]
        world = lay["dp"] * lay["pp"] * lay["tp"]
        res = run_ranks(world, _count_worker, lay, args.steps, timeout=900)
        step_s = max(r["step_s"] for r in res)
        tok_s = GLOBAL_BATCH * SEQ / step_s
        base = base or tok_s
        r0 = res[0]
        rows.append((name, world, tok_s, tok_s / base, r0["bytes"], theory(lay, r0)))
    print(f"tiny-llama, global batch {GLOBAL_BATCH} x {SEQ} tokens, fp32, gloo on this machine's CPU cores")
    print(f"{'layout':<11}{'ranks':>6}{'tokens/s':>10}{'vs 1 proc':>10}   payload bytes/step on rank 0: counted (theory)")
    for name, world, tok_s, rel, counted, th in rows:
        parts = [f"{ax}={counted.get(ax, 0):,} ({th.get(ax, 0):,})" for ax in ("dp", "tp", "pp") if ax in th or counted.get(ax)]
        if "tp_megatron" in th:
            parts.append(f"[tp Megatron-style {th['tp_megatron']:,}]")
        extra = {k: v for k, v in counted.items() if k not in ("dp", "tp", "pp")}
        parts += [f"{k}={v:,}" for k, v in extra.items()]
        print(f"{name:<11}{world:>6}{tok_s:>10.0f}{rel:>10.2f}   " + "  ".join(parts))
    Path("runs").mkdir(exist_ok=True)
    Path("runs/bench_layouts.json").write_text(json.dumps(rows, default=str, indent=1))


if __name__ == "__main__":
    main()
