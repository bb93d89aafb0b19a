"""Lazy imports (issue 22): a plain LoRA run imports neither bitsandbytes (peft would import it whenever it is
installed, 1.3 s of torch.compile machinery) nor deepspeed; a QLoRA base in the same process still gets peft's
bitsandbytes layers. Each check runs in a fresh interpreter: sys.modules of this pytest process says nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("bitsandbytes", "deepspeed", "datasets", "pyarrow")


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_entry_and_lora_injection_import_no_bitsandbytes_and_qlora_after_it_still_quantizes():
    got = _run(f"""
import json, sys
import torch
import trellis.engine.run, trellis.engine.trainer, trellis.engine.api  # what `trellis train` / the API import
entry = sorted(m for m in {HEAVY + ("peft",)!r} if m in sys.modules)
from trellis import configs
from trellis.engine.model import build_model
from trellis.engine.peft.inject import make_injector
from trellis.parallel.models import family_for

def inject(method):
    cfg = configs.load("tiny-llama", {{"parallel.dp": 1, "peft.method": method}})
    model = build_model(cfg.model, seed=cfg.train.seed)[0]
    make_injector(cfg)(model, family_for("llama"))
    return model

lora = inject("lora")
after_lora = sorted(m for m in {HEAVY!r} if m in sys.modules)
n_lora = sum(type(m).__module__ == "peft.tuners.lora.layer" for m in lora.modules())
import peft.helpers
from peft import import_utils
seen_by_peft = import_utils.is_bnb_4bit_available()
qlora = inject("qlora")  # same process: peft was imported with bitsandbytes hidden
q = qlora.model.layers[0].self_attn.q_proj
x = torch.randint(0, qlora.config.vocab_size, (1, 8))
qlora(input_ids=x).logits.sum().backward()
print(json.dumps({{"entry": entry, "after_lora": after_lora, "n_lora": n_lora, "bnb_seen_after_lora": seen_by_peft,
                  "bnb_seen_after_qlora": import_utils.is_bnb_4bit_available(),
                  "helpers_bnb": peft.helpers.bnb is not None,
                  "q_base": f"{{type(q.base_layer).__module__}}.{{type(q.base_layer).__name__}}",
                  "q_grad": q.lora_A["default"].weight.grad is not None}}))
""")
    assert got["entry"] == [], got  # the training entry imports no optional package (peft only for PEFT)
    assert got["after_lora"] == [], got
    assert got["n_lora"] > 0 and got["bnb_seen_after_lora"] is False  # LoRA injected; peft saw no bitsandbytes
    # QLoRA afterwards: peft sees bitsandbytes again, the base is 4-bit and the adapter trains
    assert got["bnb_seen_after_qlora"] is True and got["helpers_bnb"] is True, got
    assert got["q_base"] == "bitsandbytes.nn.modules.Linear4bit" and got["q_grad"], got
