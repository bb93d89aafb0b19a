"""Data pipeline: packing, determinism, dp sharding, resumable position."""

import numpy as np
import pytest

from trellis import configs
from trellis.engine.data import GlobalBatchSampler, PackedDataset, build_dataset, pack
from trellis.engine.data.records import encode_batch
from trellis.engine.data.sources import iter_records
from trellis.engine.tokenizer import load_tokenizer, shipped_tokenizer_path
from trellis.errors import ConfigError


def test_pack_shapes_and_shift():
    rows = pack(np.arange(100), 9)
    assert rows.shape == (10, 10)
    ds = PackedDataset(rows, seed=0, shuffle=False)
    b = GlobalBatchSampler(ds, micro_batch_size=2, grad_accum=1, dp_rank=0, dp_size=1).next()[0]
    assert (b.labels[:, :-1] == b.input_ids[:, 1:]).all()


def _samples(sampler, steps):
    out = []
    for _ in range(steps):
        out.append(np.concatenate([b.input_ids.numpy() for b in sampler.next()]))
    return out


def test_dp_ranks_partition_the_global_batch_in_the_same_order():
    ds = PackedDataset(pack(np.arange(5000), 15), seed=3, shuffle=True)
    single = _samples(GlobalBatchSampler(ds, micro_batch_size=2, grad_accum=4, dp_rank=0, dp_size=1), 3)
    r0 = _samples(GlobalBatchSampler(ds, micro_batch_size=2, grad_accum=2, dp_rank=0, dp_size=2), 3)
    r1 = _samples(GlobalBatchSampler(ds, micro_batch_size=2, grad_accum=2, dp_rank=1, dp_size=2), 3)
    for s, a, b in zip(single, r0, r1):
        assert (np.concatenate([a, b]) == s).all()


def test_resume_position_continues_the_same_order():
    ds = PackedDataset(pack(np.arange(5000), 15), seed=3, shuffle=True)
    straight = _samples(GlobalBatchSampler(ds, micro_batch_size=2, grad_accum=2, dp_rank=0, dp_size=1), 6)
    a = GlobalBatchSampler(ds, micro_batch_size=2, grad_accum=2, dp_rank=0, dp_size=1)
    _samples(a, 3)
    b = GlobalBatchSampler(ds, micro_batch_size=2, grad_accum=2, dp_rank=0, dp_size=1)
    b.load_state_dict(a.state_dict())
    assert all((x == y).all() for x, y in zip(_samples(b, 3), straight[3:]))


def test_epochs_reshuffle_deterministically():
    ds = PackedDataset(pack(np.arange(400), 9), seed=1, shuffle=True)
    first = [ds.sample(i)[0] for i in range(40)]
    second = [ds.sample(40 + i)[0] for i in range(40)]
    assert sorted(first) == sorted(second) and first != second
    ds2 = PackedDataset(pack(np.arange(400), 9), seed=1, shuffle=True)
    assert [ds2.sample(i)[0] for i in range(80)] == first + second


def test_shipped_corpus_and_tokenizer():
    tok = load_tokenizer(str(shipped_tokenizer_path()))
    assert len(tok) == 512
    cfg = configs.load("tiny-llama")
    train, _ = build_dataset(cfg.data, tok, seed=0)
    b = train.collate(list(range(len(train))))
    assert len(train) > 400 and b.input_ids.shape[1] == cfg.data.seq_len
    assert b.input_ids.max() < 512


def test_jsonl_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "hello"}\n{"text": "world"}\n')
    data = configs.load("tiny-llama").data
    assert [r["text"] for r, _ in iter_records(data, str(f))] == ["hello", "world"]
    data.text_field = "body"
    tok = load_tokenizer(shipped_tokenizer_path())
    with pytest.raises(ConfigError, match="data.text_field"):
        encode_batch(data, tok, list(iter_records(data, str(f))))
    with pytest.raises(ConfigError, match="data.path"):
        list(iter_records(data, str(tmp_path / "missing.txt")))
