"""`trellis train` by epochs on 2 ranks with a seeded eval split evaluated every 2 steps: the length, the
metrics records (tokens, input_tokens, eval_loss) and the one-time preparation by rank 0."""

import json
import subprocess
import sys

from trellis.engine.data import split_units
from trellis.engine.tokenizer import load_tokenizer, shipped_tokenizer_path


def test_epochs_eval_interval_and_input_tokens(tmp_path, repo):
    words = "the a cat dog ran far away quick brown fox jumps over lazy hello world".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 11)) for i in range(60)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    m = tmp_path / "m.jsonl"
    r = subprocess.run([sys.executable, "-m", "trellis", "train", "configs/tiny-llama.toml", f"--data.path={src}",
                        "--data.seq_len=16", "--data.eval_fraction=0.2", "--train.eval_batches=1",
                        "--train.eval_interval=2", "--train.epochs=2", "--train.steps=0", "--train.micro_batch_size=2",
                        "--train.grad_accum=1", "--train.warmup_steps=0", f"--data.cache_dir={tmp_path / 'cache'}",
                        f"--logging.metrics_file={m}", "--logging.progress=plain"],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    tok = load_tokenizer(str(shipped_tokenizer_path()))
    train_units, _ = split_units(60, 0.2, seed=1234)
    n_tokens = sum(len(tok(texts[i], add_special_tokens=False)["input_ids"]) + 1 for i in train_units)
    rows = n_tokens // 17
    steps = 2 * rows // 4  # epochs x rows // global batch (2 x 1 x dp 2)
    recs = [json.loads(line) for line in m.read_text().splitlines()]
    assert [x["step"] for x in recs] == list(range(1, steps + 1))
    assert [x["step"] for x in recs if "eval_loss" in x] == list(range(2, steps + 1, 2))
    assert all(x["input_tokens"] == x["step"] * 4 * 16 for x in recs)  # concat rows have no padding
    assert recs[-1]["tokens"] == steps * 4 * 16
    assert f"{rows // 4} steps/epoch" in r.stderr and " eval_loss " in r.stderr
    assert r.stderr.count("data: preparing") == 1  # rank 0 prepared; rank 1 waited for it
