"""examples/*.py run as plain `python script.py` (world size 1: trellis.initialize makes a local gloo group)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script,args", [("custom_loss.py", []), ("bring_your_own_model.py", []),
                                         ("train_loop.py", []), ("dpo.py", []), ("dpo.py", ["--peft.method=qlora"])],
                         ids=["custom_loss", "bring_your_own_model", "train_loop", "dpo", "dpo-qlora"])
def test_example_runs_as_plain_python(script, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    out = subprocess.run([sys.executable, str(REPO / "examples" / script), *args], capture_output=True, text=True,
                         timeout=300, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(line.split()[3]) for line in out.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), out.stdout
    if script == "dpo.py":  # LoRA's B = 0: policy == reference at step 1
        assert abs(losses[0] - math.log(2)) < 1e-6 and losses[2] < losses[0], out.stdout
