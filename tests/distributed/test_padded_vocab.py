"""A padded vocabulary (Qwen2.5, Pythia, OPT, BLOOM publish embeddings larger than their tokenizers): a tiny Llama
checkpoint directory with vocab_size 576 next to the shipped 512-token tokenizer trains on tp2 (576 rows split
288/288: the second shard holds the 64 padded rows) and on dp2 with HF's own first loss (HF's 1-process model on
the same global batch), and its exports load with `from_pretrained`, tokenizer files and generation config included.

One 2-rank launch: tp2 and dp2 full fine-tuning, and a QLoRA dp2 run for `export merged`.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from trellis import configs

from .harness import run_ranks
from .workers import train_scenarios

pytestmark = pytest.mark.distributed

PADDED = 576  # 512 tokens rounded up to a multiple of 64 (and 576 % 2 == 0: tp2 shards it evenly)
BASE = {"train.steps": 1, "train.micro_batch_size": 2, "train.grad_accum": 1, "train.lr": 1e-3,
        "train.schedule": "constant", "train.warmup_steps": 0, "data.seq_len": 32, "logging.progress": "none"}


def _padded_checkpoint(tmp_path):
    """A real HF checkpoint directory (config.json + model.safetensors) with 64 padded embedding rows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = json.loads((configs.PRESET_DIR / "models" / "tiny-llama" / "config.json").read_text())
    hf["vocab_size"] = PADDED
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf), dtype=torch.float32)
    d = tmp_path / "padded-llama"
    model.save_pretrained(str(d))
    return d


def _hf_first_loss(model_dir, ov: dict, dp: int) -> float:
    """HF's own model (from_pretrained of the directory) on trellis' first global batch: sum CE / counted tokens."""
    from transformers import AutoModelForCausalLM

    from trellis.engine.data import GlobalBatchSampler, build_dataset
    from trellis.engine.tokenizer import find_tokenizer, load_tokenizer

    cfg = configs.load("tiny-llama", ov)
    tok = load_tokenizer(find_tokenizer(model_dir, cfg.model.tokenizer))
    data, _ = build_dataset(cfg.data, tok, cfg.train.seed)
    sampler = GlobalBatchSampler(data, micro_batch_size=cfg.train.micro_batch_size,
                                 grad_accum=cfg.train.grad_accum * dp, dp_rank=0, dp_size=1)  # the global batch
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()  # as build_model (dropout is 0 in this config)
    batches = sampler.next()
    assert max(int(b.labels.max()) for b in batches) < len(tok) == 512  # padded rows are never targets
    n = sum(int((b.labels != -100).sum()) for b in batches)
    with torch.no_grad():
        total = sum(F.cross_entropy(model(input_ids=b.input_ids).logits.flatten(0, 1), b.labels.flatten(),
                                    reduction="sum").item() for b in batches)
    return total / n


def _check_hf_dir(out, state: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 512 and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    gen = GenerationConfig.from_pretrained(str(out))
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 0)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model.config.vocab_size == PADDED and model.get_input_embeddings().weight.shape[0] == PADDED
    if state is not None:  # the exported weights are the trained ones
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k
    return model


def test_padded_vocab_trains_on_tp2_and_dp2_with_hfs_first_loss_and_exports_load(tmp_path):
    from trellis.engine.checkpoint.convert import to_hf
    from trellis.engine.peft.export import export_merged, merged_dtype_note
    from trellis.parallel.hf_surgery import to_hf_state_dict

    ckpt = _padded_checkpoint(tmp_path)
    ov = {**BASE, "model.path": str(ckpt)}
    hf_loss = {dp: _hf_first_loss(ckpt, ov, dp) for dp in (1, 2)}

    def scenario(name, **extra):
        return {"overrides": {**ov, "logging.metrics_file": str(tmp_path / f"{name}.jsonl"),
                              "checkpoint.dir": str(tmp_path / f"ck-{name}"), **extra}}

    runs = dict(zip(("tp2", "dp2", "qlora"), run_ranks(2, train_scenarios, [
        scenario("tp2", **{"parallel.dp": 1, "parallel.tp": 2}), scenario("dp2", **{"parallel.dp": 2}),
        scenario("qlora", **{"parallel.dp": 2, "peft.method": "qlora"})], timeout=400)[0]))
    for name, out in runs.items():
        ref = hf_loss[1 if name == "tp2" else 2]
        d = abs(out["records"][0]["loss"] - ref)
        print(f"padded vocab {name}: first loss {out['records'][0]['loss']:.7f}, HF {ref:.7f}, |Δ| {d:.1e}")
        # fp32; tp2 reassociates the vocab-parallel softmax and the row-parallel sums, dp2 the token sums over ranks
        # (a few ulp of a loss ~6.4);
        # QLoRA's first loss is on the 4-bit base, compared loosely (the adapters start at B = 0).
        assert d <= (1e-6 if name != "qlora" else 5e-2), (name, d)

    for name in ("tp2", "dp2"):
        out = runs[name]
        hf_dir = to_hf(tmp_path / f"ck-{name}" / "step-1", tmp_path / f"hf-{name}")
        _check_hf_dir(hf_dir, to_hf_state_dict(out["state"], "llama"))

    merged = export_merged(tmp_path / "ck-qlora", tmp_path / "merged")
    _check_hf_dir(merged)
    note = merged_dtype_note(merged)
    assert note.startswith("float32 weights") and "4-bit nf4 base" in note, note
