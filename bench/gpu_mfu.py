"""Benchmark (not a test): tokens/s, TFLOP/s, MFU and peak memory of a ~1B Llama on one GPU, through the trellis
Engine (`trellis.initialize` + `engine.train_step`), for eager vs `train.compile`, activation checkpointing
none vs selective, full fine-tuning vs LoRA.

Model: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 kv heads of 64, MLP 8192, vocab 128256, tied
embeddings), random init from a config.json written to a temp dir (no hub, no download); bf16 autocast with fp32
master weights; seq 2048; random token batches (the data pipeline is not what is measured). FLOPs per token are
parallel/flops.py's (the MFU metric's); the peak is the device table's (or $TRELLIS_PEAK_TFLOPS).

    python bench/gpu_mfu.py [--steps 10] [--warmup 3] [--micro-batch 4] [--only eager,compile] [--json]
    python bench/gpu_mfu.py --quick        # CPU, a tiny Llama, 2 steps: the same code path, in seconds

All variants run in this one process, one after the other (the engine of the previous one is freed and the
peak-memory counter reset in between). `--json` prints one JSON object as the last line:
{"device", "peak_tflops", "model", "seq_len", "results": [{"variant", "tokens_per_s", "tflops", "mfu", "hfu",
"peak_mem_bytes", "step_s", "first_step_s", "loss"}], "summary": {variant: {"tokens_per_s_min",
"tokens_per_s_median", "tokens_per_s_max", "runs"}}}.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

LLAMA_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": True, "attention_bias": False,
            "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "use_cache": False}
TINY = dict(LLAMA_1B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
VARIANTS = [(c, ac, ft) for ft in ("full", "lora") for c in ("eager", "compile") for ac in ("none", "selective")]


def run_variant(model_dir: Path, *, compiled: bool, ac: str, ft: str, seq: int, mb: int, steps: int, warmup: int,
                dtype: str) -> dict:
    import torch

    import trellis
    from trellis.parallel.flops import ThroughputMeter, flops_for_config, peak_flops
    from trellis.parallel.models.dims import dims_from_hf_config

    over = [f"--model.path={model_dir}", f"--data.seq_len={seq}", f"--train.micro_batch_size={mb}",
            "--train.grad_accum=1", f"--train.steps={steps + warmup}", f"--precision.dtype={dtype}",
            f"--activation_checkpointing.mode={ac}", f"--train.compile={'true' if compiled else 'false'}",
            "--parallel.dp=1", "--logging.progress=none", "--train.schedule=constant"]
    if ft == "lora":
        over += ["--peft.method=lora", "--peft.r=16"]
    cfg = trellis.load_config({"data": {"path": "builtin:demo"}}, over)
    engine = trellis.initialize(cfg)
    dev = engine.ctx.device
    vocab = _hf_config(model_dir)["vocab_size"]
    g = torch.Generator().manual_seed(0)
    meter = ThroughputMeter(flops_for_config(cfg, dims_from_hf_config(_hf_config(model_dir))), 1,
                            peak_flops(dev, dtype))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, loss = [], None
    for _ in range(steps + warmup):
        ids = torch.randint(3, vocab, (mb, seq + 1), generator=g)
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        res = engine.train_step([batch])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
        loss = res.loss
    step = statistics.median(times[warmup:])
    m = meter(mb * seq, step)
    peak = int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None
    out = {"variant": f"{'compile' if compiled else 'eager'}/ac={ac}/{ft}", "tokens_per_s": mb * seq / step,
           "tflops": m["tflops"], "mfu": m["mfu"], "hfu": m["hfu"], "peak_mem_bytes": peak, "step_s": step,
           "step_s_min": min(times[warmup:]), "step_s_max": max(times[warmup:]), "first_step_s": times[0],
           "loss": loss}
    del engine, res
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _hf_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU, tiny Llama, seq 64, 2 steps (tests the code path)")
    ap.add_argument("--steps", type=int, default=10, help="measured steps per variant (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps (compilation, allocator warm-up)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--only", default="", help="comma list of words a variant must contain, e.g. eager,full")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the variant list this many times, alternating (min/median/max in the JSON)")
    ap.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    a = ap.parse_args(argv)
    import torch

    from trellis.parallel.flops import peak_flops

    if a.quick:
        model, seq, mb, steps, warmup, dtype = TINY, 64, 2, 2, 1, "fp32"
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; run with --quick on a CPU", file=sys.stderr)
            return 2
        model, seq, mb, steps, warmup, dtype = LLAMA_1B, a.seq_len, a.micro_batch, a.steps, a.warmup, "bf16"
    dev = torch.device("cuda") if torch.cuda.is_available() and not a.quick else torch.device("cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_flops(dev, dtype)
    words = [w for w in a.only.split(",") if w]
    variants = [v for v in VARIANTS if all(w in f"{v[0]}/ac={v[1]}/{v[2]}" for w in words)]
    results = []
    with tempfile.TemporaryDirectory() as d:
        model_dir = Path(d) / "llama-1b-shape"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(model))
        print(f"{name}: peak {peak / 1e12 if peak else float('nan'):.3g} TFLOP/s {dtype}; hidden "
              f"{model['hidden_size']} x {model['num_hidden_layers']} layers, seq {seq}, micro-batch {mb}",
              file=sys.stderr)
        print(f"{'variant':<28}{'tok/s':>10}{'TFLOP/s':>10}{'MFU':>8}{'HFU':>8}{'peak mem':>12}{'step s':>9}"
              f"{'1st s':>8}", file=sys.stderr)
        for compiled, ac, ft in [v for _ in range(a.repeats) for v in variants]:
            r = run_variant(model_dir, compiled=compiled == "compile", ac=ac, ft=ft, seq=seq, mb=mb, steps=steps,
                            warmup=warmup, dtype=dtype)
            results.append(r)
            mem = f"{r['peak_mem_bytes'] / 2**30:.1f} GiB" if r["peak_mem_bytes"] is not None else "-"
            pct = (lambda x: f"{x:.1%}" if x is not None else "-")
            print(f"{r['variant']:<28}{r['tokens_per_s']:>10.0f}{r['tflops']:>10.3g}{pct(r['mfu']):>8}"
                  f"{pct(r['hfu']):>8}{mem:>12}{r['step_s']:>9.3f}{r['first_step_s']:>8.1f}", file=sys.stderr,
                  flush=True)
    spread = {}
    for r in results:
        spread.setdefault(r["variant"], []).append(r["tokens_per_s"])
    summary = {k: {"tokens_per_s_min": min(v), "tokens_per_s_median": statistics.median(v),
                   "tokens_per_s_max": max(v), "runs": len(v)} for k, v in spread.items()}
    if a.repeats > 1:
        for k, v in summary.items():
            print(f"{k:<28} tok/s min {v['tokens_per_s_min']:.0f} median {v['tokens_per_s_median']:.0f} "
                  f"max {v['tokens_per_s_max']:.0f} ({v['runs']} runs)", file=sys.stderr)
    if a.json:
        print(json.dumps({"device": name, "peak_tflops": peak / 1e12 if peak else None, "summary": summary,
                          "model": {k: model[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
                          "seq_len": seq, "micro_batch": mb, "dtype": dtype, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
