"""bench/gpu_mfu.py --quick on the CPU: the GPU benchmark's code path (Engine, FLOP model, peak, --json) runs and
its figures are consistent with each other (the bench's arithmetic; its numbers are not asserted)."""

import json
import os
import subprocess
import sys


def test_gpu_mfu_quick_runs_the_engine_path(tmp_path, repo):
    env_cache = {"TRELLIS_CACHE": str(tmp_path), "TRELLIS_PEAK_TFLOPS": "0.05"}  # no calibration in CI
    r = subprocess.run([sys.executable, "bench/gpu_mfu.py", "--quick", "--only", "eager,ac=none", "--json"],
                       cwd=repo, capture_output=True, text=True, timeout=300, env={**os.environ, **env_cache})
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["peak_tflops"] == 0.05 and doc["seq_len"] == 64
    assert [x["variant"] for x in doc["results"]] == ["eager/ac=none/full", "eager/ac=none/lora"]
    full, lora = doc["results"]
    for x in doc["results"]:
        assert x["tokens_per_s"] == 2 * 64 / x["step_s"] and x["tflops"] > 0
        assert abs(x["mfu"] - x["tflops"] / 0.05) < 1e-12
        assert x["loss"] > 0
    # the same model: LoRA does no weight-gradient matmuls, so fewer FLOPs per token (time-independent)
    assert lora["tflops"] / lora["tokens_per_s"] < full["tflops"] / full["tokens_per_s"]
