"""SFT on chat records with document packing, end to end through `trellis train`: the real reader, chat template,
loss masks, prepared corpus and packed batches (segment ids, per-sample positions) on every layout. Each layout's
losses equal the 1-process run's (tests/distributed/test_document_packing.py proves that run equal to every
sample run alone through plain HF); a run stopped mid-epoch resumes exactly, also on another dp size."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

WORDS = "the a cat dog ran far away quick brown fox jumps over lazy hello world".split()
# 150 chats of 50-110 tokens (ChatML markers included): about 90 rows of 129 tokens, 1-3 chats per row.
COMMON = ["--data.type=chat", "--data.chat_template=chatml", "--data.packing=document", "--data.seq_len=128",
          "--train.micro_batch_size=2", "--train.schedule=constant", "--train.warmup_steps=0", "--train.lr=1e-3",
          "--logging.progress=none"]


def _chats(path: Path) -> Path:
    rng = random.Random(0)

    def say(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with open(path, "w") as f:
        for i in range(150):
            msgs = [{"role": "user", "content": say(rng.randint(1, 4))},
                    {"role": "assistant", "content": say(rng.randint(1, 6))}]
            if i % 3 == 0:
                msgs.insert(0, {"role": "system", "content": say(2)})
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def _train(repo, work: Path, name: str, *args: str) -> dict[int, float]:
    m = work / f"{name}.jsonl"
    r = subprocess.run([sys.executable, "-m", "trellis", "train", "tiny-llama", *COMMON,
                        f"--data.path={work / 'chats.jsonl'}", f"--data.cache_dir={work / 'cache'}", *args,
                        f"--logging.metrics_file={m}"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {x["step"]: x["loss"] for x in map(json.loads, m.read_text().splitlines())}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    _chats(d / "chats.jsonl")
    return d


@pytest.fixture(scope="module")
def reference(repo, work):
    """1 process, the global batch of dp2 x grad_accum 2 as 4 micro-batches; full fine-tuning and LoRA."""
    full = _train(repo, work, "ref", "--parallel.dp=1", "--train.grad_accum=4", "--train.steps=6")
    lora = _train(repo, work, "ref-lora", "--parallel.dp=1", "--train.grad_accum=4", "--train.steps=3",
                  "--peft.method=lora")
    return full, lora


@pytest.mark.parametrize("layout", [
    ["--parallel.dp=2", "--train.grad_accum=2"],
    ["--parallel.dp=1", "--parallel.tp=2", "--train.grad_accum=4"],
    ["--parallel.dp=1", "--parallel.pp=2", "--train.grad_accum=4"],
    ["--parallel.dp=2", "--parallel.pp=2", "--parallel.tp=2", "--zero.stage=3", "--train.grad_accum=2"],
    ["--parallel.dp=2", "--parallel.tp=2", "--train.grad_accum=2", "--peft.method=lora"],
], ids=["dp2", "tp2", "pp2", "dp2-pp2-tp2-zero3", "lora-dp2-tp2"])
def test_chat_sft_with_document_packing_equals_one_process(repo, work, reference, layout):
    full, lora = reference
    ref = lora if "--peft.method=lora" in layout else full
    got = _train(repo, work, "-".join(a.split("=")[1] for a in layout), *layout, "--train.steps=3")
    delta = max(abs(got[s] - ref[s]) for s in (1, 2, 3))
    print(f"chat SFT, document packing, {' '.join(layout)}: max |Δloss| over 3 steps = {delta:.2e}")
    assert delta <= 1e-5, (got, ref)


def test_chat_sft_resumes_mid_epoch_exactly_and_on_another_dp_size(repo, work, reference):
    """Steps 1-3 at dp2 with a checkpoint (half an epoch: 6 steps x 8 rows < 90 rows), then steps 4-6 resumed at
    dp2 (bit-identical to the uninterrupted run) and at dp1 (equal within fp32 reduction order)."""
    full, _ = reference
    ck = work / "ck"
    _train(repo, work, "first", "--parallel.dp=2", "--train.grad_accum=2", "--train.steps=3",
           f"--checkpoint.dir={ck}")
    straight = _train(repo, work, "straight", "--parallel.dp=2", "--train.grad_accum=2", "--train.steps=6")
    ck1 = work / "ck1"
    shutil.copytree(ck, ck1)
    same = _train(repo, work, "resumed-dp2", "--parallel.dp=2", "--train.grad_accum=2", "--train.steps=6",
                  f"--checkpoint.dir={ck}", "--resume=auto")
    other = _train(repo, work, "resumed-dp1", "--parallel.dp=1", "--train.grad_accum=4", "--train.steps=6",
                   f"--checkpoint.dir={ck1}", "--resume=auto")
    assert sorted(same) == sorted(other) == [4, 5, 6]
    assert all(same[s] == straight[s] for s in same), (same, straight)
    delta = max(abs(other[s] - straight[s]) for s in other)
    print(f"chat SFT resumed dp2 -> dp1 mid-epoch: max |Δloss| steps 4-6 = {delta:.2e}")
    assert delta <= 1e-5
    assert max(abs(straight[s] - full[s]) for s in straight) <= 1e-5  # and the 1-process run agrees
