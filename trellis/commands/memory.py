"""`trellis estimate-memory` (per-rank bytes of one layout) and `trellis plan` (rank feasible layouts)."""

from __future__ import annotations

import argparse
import json
import re

from trellis.errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_COUNT = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_bytes(text: str, flag: str = "--gpu-mem") -> float:
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{flag}={text!r}: write a size like 80GB, 79.6GiB or 24e9")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_count(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKmMbBtT]?)\s*", str(text))
    if not m:
        raise ConfigError(f"--params={text!r}: write a count like 7B, 6.7e9 or 350M")
    return int(float(m.group(1)) * _COUNT[m.group(2).lower()])


def fmt(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="HF model dir, config.json, shipped model (tiny-llama) or preset (llama-2-7b)")
    g.add_argument("--params", help="raw parameter count, e.g. 7.5B (classic model-states accounting)")
    for dim in ("hidden", "layers", "heads", "kv-heads", "vocab", "ffn"):
        g.add_argument(f"--{dim}", type=int, default=0, help=f"model dim for --params ({dim})")
    p.add_argument("--config", help="a trellis training config (TOML); flags given explicitly override it")


def _add_training_args(p: argparse.ArgumentParser, layout: bool) -> None:
    g = p.add_argument_group("training")
    if layout:
        g.add_argument("--dp", type=int, default=None, help="data-parallel degree (ZeRO shards over it); default 1")
        g.add_argument("--tp", type=int, default=None, help="tensor-parallel degree; default 1")
        g.add_argument("--pp", type=int, default=None, help="pipeline-parallel degree (the worst stage is reported); default 1")
        g.add_argument("--cp", type=int, default=None,
                       help="context-parallel degree (the sequence split over cp ranks; ZeRO shards over dp x cp); default 1")
        g.add_argument("--zero", type=int, default=None, choices=[0, 1, 2, 3],
                       help="ZeRO stage: 1 shards optimizer state, 2 also grads, 3 also params")
        g.add_argument("--offload-optimizer", choices=["none", "cpu", "nvme"], default=None,
                       help="where the optimizer state lives (nvme: DeepSpeed ZeRO-Infinity)")
        g.add_argument("--offload-param", choices=["none", "cpu", "nvme"], default=None,
                       help="where ZeRO-3 parameters live between uses")
        g.add_argument("--activation-checkpointing", choices=["none", "selective", "full"], default=None,
                       help="recompute activations in backward: full blocks, or attention only (selective)")
        g.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch per rank")
        g.add_argument("--grad-accum", type=int, default=None,
                       help="micro-batches per optimizer step (pipeline: micro-batches in flight)")
        from trellis.parallel.pipeline import SCHEDULES

        g.add_argument("--pp-schedule", choices=list(SCHEDULES), default=None,
                       help="pipeline schedule (how many micro-batches' activations a stage holds)")
        g.add_argument("--sequence-parallel", action="store_true", default=None,
                       help="shard norm/dropout activations over tp")
    g.add_argument("--backend", choices=["native", "deepspeed"], default=None,
                   help="ZeRO semantics (default: deepspeed with --params, else the config's / native)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="compute dtype (trainable params keep fp32 master weights)")
    g.add_argument("--optimizer", choices=["adamw", "adamw8bit", "sgd"], default=None,
                   help="optimizer state per trainable param: adamw 8 B, adamw8bit 2 B, sgd 0 B")
    g.add_argument("--peft", choices=["none", "lora", "rslora", "dora", "qlora", "ia3"], default=None,
                   help="adapter method: only the adapters get grads and optimizer state")
    g.add_argument("--lora-r", type=int, default=None, help="LoRA rank r (default 8)")
    g.add_argument("--lora-targets", default=None, help="comma-separated module names (default: all linears)")
    g.add_argument("--quant", choices=["none", "nf4", "fp4", "int8"], default=None,
                   help="quantized frozen base weights (bitsandbytes)")
    g.add_argument("--double-quant", action="store_true", default=None,
                   help="also quantize the 4-bit quantization constants (QLoRA double quant)")
    g.add_argument("--seq-len", type=int, default=None, help="0 = model states only")
    g.add_argument("--gpu-mem", default=None, help="device memory per GPU, e.g. 80GB")
    g.add_argument("--gpus-per-node", type=int, default=8,
                   help="ranks per node (host RAM per node sums their CPU offload); default 8")
    g.add_argument("--host-mem", default=None, help="host RAM per node for CPU offload, e.g. 512GB")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate-memory", help="per-rank memory of a training layout (no GPU needed)")
    _add_model_args(p)
    _add_training_args(p, layout=True)
    p.add_argument("--explain", action="store_true", help="print the formula behind each line")
    p.add_argument("--json", action="store_true", help="machine-readable output (bytes; keys documented)")
    p.add_argument("--plot", metavar="PNG", help="stacked bars per rank (every pipeline stage for pp > 1)")
    p.set_defaults(func=_estimate)
    q = sub.add_parser("plan", help="enumerate layouts that fit, ranked by a throughput model")
    _add_model_args(q)
    _add_training_args(q, layout=False)
    q.add_argument("--gpus", type=int, help="total GPUs to lay out (dp x tp x pp); required unless --calibrate")
    q.add_argument("--global-batch", type=int, default=0, help="sequences per optimizer step (0 = any)")
    q.add_argument("--top", type=int, default=5, help="how many ranked layouts to print (default 5)")
    q.add_argument("--show-rejected", action="store_true", help="list infeasible layouts and why")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--plot", metavar="PNG", help="stacked bars of the top layouts")
    c = q.add_argument_group("cluster profile (docs/PLANNER.md)")
    c.add_argument("--cluster", metavar="FILE", help="rank with this measured profile (from --calibrate)")
    c.add_argument("--device", default="H100", help="built-in profile without --cluster: H100 (default), H200, "
                                                    "A100, B200 or cpu")
    c.add_argument("--calibrate", action="store_true",
                   help="measure this machine's profile (matmul FLOP/s, collectives, overheads) and write it")
    c.add_argument("--nproc", type=int, default=0,
                   help="--calibrate/--validate: local ranks to start (default: the GPUs, else 2); under a "
                        "launcher or Slurm the job's ranks are used")
    c.add_argument("--out", metavar="FILE", default="cluster.json", help="--calibrate: where (default cluster.json)")
    c.add_argument("--validate", action="store_true",
                   help="run the top --top and a few low-ranked layouts for a few steps here; print predicted "
                        "vs measured step time and their rank correlation")
    c.add_argument("--validate-steps", type=int, default=4, help="--validate: timed steps per layout (default 4)")
    q.set_defaults(func=_plan)


def _from_config(path: str) -> dict:
    """Setup fields from a trellis training config (the same TOML `trellis train` reads)."""
    from trellis import configs

    from trellis.configs.validate import base_quantization

    cfg = configs.load(path, [])
    peft = cfg.peft.method
    quant = base_quantization(cfg)
    return {"model": cfg.model.path, "dp": max(cfg.parallel.dp, 1), "tp": cfg.parallel.tp, "pp": cfg.parallel.pp,
            "cp": cfg.parallel.cp,
            "zero": cfg.zero.stage, "backend": cfg.zero.backend, "offload_optimizer": cfg.zero.offload_optimizer,
            "offload_param": cfg.zero.offload_param, "precision": cfg.precision.dtype,
            "optimizer": cfg.train.optimizer, "peft": peft, "lora_r": cfg.peft.r,
            "lora_targets": tuple(cfg.peft.target_modules), "quant": quant, "double_quant": cfg.peft.double_quant,
            "activation_checkpointing": cfg.activation_checkpointing.mode,
            "micro_batch": cfg.train.micro_batch_size, "seq_len": cfg.data.seq_len, "grad_accum": cfg.train.grad_accum,
            "pp_schedule": cfg.parallel.pp_schedule, "sequence_parallel": cfg.parallel.sequence_parallel}


def build(args) -> tuple:
    """(ModelDims, TrainingSetup) from flags, a config file, or both (explicit flags win)."""
    from trellis.engine.memory.estimator import TrainingSetup
    from trellis.engine.memory.models import dims_from_params, resolve_model, with_overrides

    base = _from_config(args.config) if args.config else {}
    model = args.model or base.pop("model", None)
    base.pop("model", None)
    if args.params and args.model:
        raise ConfigError("give --model or --params, not both")
    if args.params:
        d = dims_from_params(parse_count(args.params), hidden=args.hidden, layers=args.layers, heads=args.heads,
                             kv_heads=args.kv_heads, vocab=args.vocab, ffn=args.ffn)
        base.setdefault("backend", "deepspeed")
        base.setdefault("precision", "bf16")
    elif model:
        d = with_overrides(resolve_model(model), hidden=args.hidden, layers=args.layers, heads=args.heads,
                           kv_heads=args.kv_heads, vocab=args.vocab, ffn=args.ffn)
        base.setdefault("backend", "native")
    else:
        raise ConfigError("missing model: pass --model NAME|DIR|config.json, --params N, or --config FILE.toml")
    for key in TrainingSetup.__dataclass_fields__:
        v = getattr(args, key, None)
        if v is not None and key not in ("gpu_mem", "host_mem", "lora_targets"):
            base[key] = v
    if args.lora_targets:
        base["lora_targets"] = tuple(t for t in args.lora_targets.split(",") if t)
    if args.gpu_mem:
        base["gpu_mem"] = parse_bytes(args.gpu_mem)
    if args.host_mem:
        base["host_mem"] = parse_bytes(args.host_mem, "--host-mem")
    base["gpus_per_node"] = args.gpus_per_node
    return d, TrainingSetup(**base)


def _estimate(args) -> int:
    from trellis.engine.memory.estimator import estimate

    d, s = build(args)
    est = estimate(d, s)
    if args.plot:
        from trellis.engine.memory.plot import plot_ranks

        plot_ranks([(r.label, r) for r in est.ranks], args.plot, title=f"{d.name}: per-rank memory",
                   gpu_mem=s.gpu_mem)
    if args.json:
        print(json.dumps(est.as_dict(), indent=2))
    else:
        print(render(est, explain=args.explain))
    return 0 if est.fits is not False and est.host_fits is not False else 1


ROWS = (("params", "params"), ("grads", "grads"), ("optimizer_states", "optimizer state"),
        ("master_weights", "fp32 master weights"), ("activations", "activations"), ("logits", "logits (fp32)"),
        ("buffers", "buffers"), ("comm_buffers", "comm buffers"), ("allocator", "allocator allowance"))


def render(est, explain: bool = False) -> str:
    from trellis.engine.memory.models import total_params

    d, s = est.dims, est.setup
    lines = [f"model {d.name} ({d.family}, {total_params(d) / 1e9:.3f}B params) | dp={s.dp} tp={s.tp} pp={s.pp} "
             f"zero={s.zero} ({s.backend}) {s.precision} {s.optimizer}"
             + (f" peft={s.peft}" if s.peft != "none" else "") + (f" quant={s.quant}" if s.quant != "none" else "")
             + (f" | micro_batch={s.micro_batch} seq={s.seq_len} ckpt={s.activation_checkpointing}" if s.seq_len
                else " | model states only (--seq-len for activations)")]
    heads = [r.label + (" *" if i == est.worst and len(est.ranks) > 1 else "") for i, r in enumerate(est.ranks)]
    w = max(22, *(len(h) + 2 for h in heads))
    lines.append(f"{'':<22}" + "".join(f"{h:>{w}}" for h in heads))
    for key, title in ROWS:
        lines.append(f"{title:<22}" + "".join(f"{fmt(getattr(r, key)):>{w}}" for r in est.ranks))
    lines.append(f"{'total (GPU)':<22}" + "".join(f"{fmt(r.total):>{w}}" for r in est.ranks))
    if any(r.cpu_offload for r in est.ranks):
        lines.append(f"{'offloaded to CPU':<22}" + "".join(f"{fmt(r.cpu_offload):>{w}}" for r in est.ranks))
        host = f"host RAM per node: {fmt(est.host_ram_per_node())} ({min(s.gpus_per_node, s.world)} ranks)"
        if s.host_mem:
            diff = s.host_mem - est.host_ram_per_node()
            host += (f" vs --host-mem {fmt(s.host_mem)}: " +
                     (f"fits with {fmt(diff)} to spare" if diff >= 0 else f"does NOT fit: {fmt(-diff)} over"))
        lines.append(host)
    if any(r.nvme_offload for r in est.ranks):
        lines.append(f"{'offloaded to NVMe':<22}" + "".join(f"{fmt(r.nvme_offload):>{w}}" for r in est.ranks))
    wr = est.worst_rank
    if len(est.ranks) > 1:
        lines.append(f"worst rank: {wr.label} (global rank {wr.first_rank}), {fmt(wr.total)}")
    if s.gpu_mem:
        diff = s.gpu_mem - wr.total
        verdict = f"fits with {fmt(diff)} to spare" if diff >= 0 else f"does NOT fit: {fmt(-diff)} over"
        lines.append(f"vs --gpu-mem {fmt(s.gpu_mem)}: {verdict}")
    lines += [f"note: {n}" for n in est.notes]
    if explain:
        lines.append("")
        lines.append("formulas (Ψ = trainable params on this rank's tp/pp shard, Nd = dp):")
        lines += [f"  {k:<17} {v}" for k, v in est.formulas.items()]
        lines += deepspeed_side_by_side(est)
    return "\n".join(lines)


def model_states_gpu(r) -> float:
    """GPU bytes of the model states (what DeepSpeed's estimator covers): params, grads, optimizer state,
    master weights and the ZeRO-3 working memory (buffers of a model-states-only estimate)."""
    return r.params + r.grads + r.optimizer_states + r.master_weights + r.buffers


def deepspeed_side_by_side(est) -> list[str]:
    """--explain with --backend deepspeed at ZeRO-2/3: trellis' figures next to DeepSpeed's own estimator."""
    import dataclasses
    import math

    from trellis.engine.memory.estimator import estimate, largest_module_params
    from trellis.engine.memory.models import total_params

    d, s = est.dims, est.setup
    if s.backend != "deepspeed" or s.zero not in (2, 3) or s.tp * s.pp != 1 or s.peft != "none":
        return []
    try:
        from trellis.engine.backends.deepspeed_estimator import deepspeed_estimate
    except ImportError:
        return ["", "DeepSpeed's own estimator: deepspeed is not installed (pip install deepspeed)"]
    per_node = min(s.gpus_per_node, s.world)
    nodes = math.ceil(s.world / per_node)
    ds = deepspeed_estimate(total_params=total_params(d), largest_layer_params=int(largest_module_params(d)),
                            gpus_per_node=per_node, nodes=nodes, zero=s.zero,
                            offload_optimizer=s.offload_optimizer != "none", offload_param=s.offload_param != "none")
    mine = estimate(d, dataclasses.replace(s, seq_len=0))  # model states only, as DeepSpeed's formula
    w = mine.worst_rank
    fn = "estimate_zero3_model_states_mem_needs" if s.zero == 3 else "estimate_zero2_model_states_mem_needs"
    return ["", f"vs DeepSpeed's own estimator ({fn}, {nodes} node(s) x {per_node} GPUs; model states only; "
                "its CPU figure includes its 1.5x buffer factor):",
            f"  {'':<22}{'trellis':>14}{'DeepSpeed':>14}",
            f"  {'per GPU':<22}{fmt(model_states_gpu(w)):>14}{fmt(ds.gpu_bytes):>14}",
            f"  {'CPU per node':<22}{fmt(mine.host_ram_per_node()):>14}{fmt(ds.cpu_bytes):>14}",
            "  trellis counts what a live DeepSpeed engine allocates (validated on CPU): the gradient partition "
            "twice at the step (compute dtype + fp32), the ZeRO-3 largest module gathered + its grads"]


def cluster_profile(args):
    from trellis.engine.memory.cluster import default_profile, load_profile

    if args.cluster:
        return load_profile(args.cluster)
    return default_profile(args.device, args.gpus_per_node)


def _plan(args) -> int:
    if args.calibrate:
        from trellis.engine.plan.calibrate import run_calibration

        return run_calibration(args.nproc, args.out)
    from trellis.engine.memory.planner import plan, render_plan

    if not args.gpus:
        raise ConfigError("plan needs --gpus N (the GPUs to lay out), or --calibrate to measure this machine")
    d, s = build(args)
    if not s.gpu_mem:
        raise ConfigError("plan needs --gpu-mem, e.g. --gpu-mem 80GB")
    result = plan(d, s, gpus=args.gpus, global_batch=args.global_batch, cluster=cluster_profile(args))
    if args.validate:
        from trellis.engine.plan.validate import validate

        return validate(args, d, result)
    if args.plot and result.feasible:
        from trellis.engine.memory.plot import plot_ranks

        plot_ranks([(c.name, c.estimate.worst_rank) for c in result.feasible[: args.top]], args.plot,
                   title=f"{d.name} on {args.gpus} GPUs: worst rank per layout", gpu_mem=s.gpu_mem)
    if args.json:
        print(json.dumps(result.as_dict(args.top), indent=2))
    else:
        print(render_plan(result, args.top, show_rejected=args.show_rejected))
    return 0 if result.feasible else 1
