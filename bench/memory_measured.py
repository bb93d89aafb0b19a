"""Benchmark (not a test): `trellis estimate-memory` vs the peak a real `trellis train` run reaches.

For each case, one config file drives both: `trellis estimate-memory --config case.toml --json` and
`trellis train case.toml` (3 steps, 1 process). The run's `peak_mem_bytes` is the accelerator's peak
allocated bytes (torch.cuda.max_memory_allocated) on a GPU, or the process's peak RSS on CPU (which also
counts the Python/torch runtime, so only the GPU numbers are a like-for-like check). Prints, per case, the
estimate's model states, activations and total next to the measured peak, and the ratio estimate/measured.

The model is a mid-size Llama (default: hidden 1024, 8 layers, ~100M params; vocab 512 = the shipped
tokenizer, which the model must match) generated as a
config.json, randomly initialised: nothing is downloaded.

    python bench/memory_measured.py [--seq 1024] [--mb 4] [--cases fp32,bf16,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "fp32": {"precision": {"dtype": "fp32"}},
    "bf16": {"precision": {"dtype": "bf16"}},
    "bf16-selective": {"precision": {"dtype": "bf16"}, "activation_checkpointing": {"mode": "selective"}},
    "bf16-full-ckpt": {"precision": {"dtype": "bf16"}, "activation_checkpointing": {"mode": "full"}},
    "bf16-lora": {"precision": {"dtype": "bf16"}, "peft": {"method": "lora"}},
    "bf16-qlora": {"precision": {"dtype": "bf16"}, "peft": {"method": "qlora"}},
    "fp16-zero3": {"precision": {"dtype": "fp16"}, "zero": {"stage": 3}},
    "bf16-ds-zero2": {"precision": {"dtype": "bf16"}, "zero": {"backend": "deepspeed", "stage": 2}},
}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_config(path: Path, model_dir: Path, metrics: Path, a, extra: dict) -> None:
    sections = {
        "model": {"path": str(model_dir)},
        "data": {"path": "builtin:demo", "seq_len": a.seq},
        "parallel": {"dp": 1},
        "train": {"micro_batch_size": a.mb, "grad_accum": 1, "steps": a.steps, "lr": 1e-4, "warmup_steps": 0,
                  "schedule": "constant"},
        "logging": {"metrics_file": str(metrics), "progress": "none"},
    }
    for sec, kv in extra.items():
        sections.setdefault(sec, {}).update(kv)
    lines = []
    for sec, kv in sections.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in kv.items()]
        lines.append("")
    path.write_text("\n".join(lines))


def write_model(d: Path, a) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": a.hidden,
        "intermediate_size": a.ffn, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": a.heads, "vocab_size": a.vocab, "max_position_embeddings": max(2048, a.seq),
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32"}))
    return d


def gib(n: float) -> str:
    return f"{n / 2**30:7.3f}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=512)  # the shipped tokenizer's size (the model must match it)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--mb", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json-out", default="")
    a = ap.parse_args()
    trellis = [sys.executable, "-m", "trellis"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = write_model(tmp / "model", a)
        for name in a.cases.split(","):
            cfg, metrics = tmp / f"{name}.toml", tmp / f"{name}.jsonl"
            write_config(cfg, model_dir, metrics, a, CASES[name])
            est = json.loads(subprocess.run([*trellis, "estimate-memory", "--config", str(cfg), "--json"],
                                            check=True, capture_output=True, text=True).stdout)["worst_rank"]
            p = subprocess.run([*trellis, "train", str(cfg)], capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{name}: training failed (exit {p.returncode}): {p.stderr.strip()[-400:]}")
                continue
            recs = [json.loads(x) for x in metrics.read_text().splitlines()]
            peak = max(max(r.get("peak_mem_bytes") or [0]) for r in recs)
            states = sum(est[k] for k in ("params", "grads", "optimizer_states", "master_weights"))
            rows.append({"case": name, "measured_peak": peak, "est_model_states": states,
                         "est_activations": est["activations"], "est_logits": est.get("logits", 0),
                         "est_buffers": est["buffers"], "est_total": est["total"],
                         "ratio": est["total"] / peak if peak else float("nan")})
    print(f"model: llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; micro-batch {a.mb} x seq {a.seq}, "
          f"1 rank")
    print(f"{'case':16} {'states GiB':>10} {'activ GiB':>10} {'total GiB':>10} {'measured GiB':>12} {'est/meas':>8}")
    for r in rows:
        print(f"{r['case']:16} {gib(r['est_model_states']):>10} {gib(r['est_activations']):>10} "
              f"{gib(r['est_total']):>10} {gib(r['measured_peak']):>12} {r['ratio']:8.3f}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
