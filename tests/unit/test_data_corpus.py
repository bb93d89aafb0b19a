"""Prepared corpora, packing (concat / document / pad), truncation, eval splits, epochs: against hand-tokenized
references (the shipped tokenizer called directly), with real multiprocessing and real memory maps."""

import json
import subprocess
import sys

import numpy as np
import pytest

from trellis import configs
from trellis.cli import main
from trellis.engine.data import corpus as corpus_mod
from trellis.engine.data import CorpusDataset, GlobalBatchSampler, build_dataset, load_corpus, prepare, split_units
from trellis.engine.data.sources import builtin_corpus_path
from trellis.engine.tokenizer import load_tokenizer, shipped_tokenizer_path, train_bpe_tokenizer
from trellis.errors import ConfigError

TOK = load_tokenizer(str(shipped_tokenizer_path()))
EOS = TOK.eos_token_id
# token counts with the shipped tokenizer (+ EOS): 5, 8, 2, 13, 1
HAND = ["the cat", "hello world", "x", "a dog ran far away", ""]


def _ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"] + [EOS]


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _cfg(tmp_path, **data):
    over = {"data.cache_dir": str(tmp_path / "cache"), "data.seq_len": 16}
    over.update({f"data.{k}": v for k, v in data.items()})
    return configs.load("tiny-llama", over)


def _words(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = "the a cat dog ran far away quick brown fox jumps over lazy hello world again and".split()
    return [" ".join(rng.choice(vocab, size=int(rng.integers(1, 30)))) for _ in range(n)]


def _all(ds) -> list:
    out = []
    for i in range(0, len(ds), 7):
        b = ds.collate(list(range(i, min(i + 7, len(ds)))))
        out.append(tuple(None if t is None else t.numpy() for t in (b.input_ids, b.labels, b.segment_ids,
                                                                     b.position_ids)))
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        all((x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))
            for x, y in zip(ra, rb)) for ra, rb in zip(a, b))


def test_concat_rows_equal_the_token_stream_windows(tmp_path):
    """Today's packing: the corpus' tokens + EOS cut into seq_len+1 windows; the held-out tail stays the tail."""
    cfg = _cfg(tmp_path, seq_len=32)
    stream = _ids(builtin_corpus_path().read_text(encoding="utf-8", errors="replace"))
    n = len(stream) // 33
    rows = np.asarray(stream[: n * 33]).reshape(n, 33)
    train, ev = build_dataset(cfg.data, TOK, seed=0, hold_out=10)
    assert len(train) == n - 10 and len(ev) == 10
    b = train.collate(list(range(len(train))))
    assert np.array_equal(b.input_ids.numpy(), rows[:-10, :-1]) and np.array_equal(b.labels.numpy(), rows[:-10, 1:])
    assert b.segment_ids is None and b.position_ids is None
    e = ev.collate(list(range(10)))
    assert np.array_equal(e.input_ids.numpy(), rows[-10:, :-1])
    s = GlobalBatchSampler(train, micro_batch_size=2, grad_accum=3, dp_rank=0, dp_size=2)
    assert s.input_tokens(0, 2) == 2 * 12 * 32


def test_document_packing_hand_case(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", HAND)
    ds, _ = build_dataset(_cfg(tmp_path, path=str(src), packing="document", seq_len=12, shuffle=False).data, TOK, 0)
    # next-fit over 13-token rows: [the cat | hello world] [x + padding] [a dog ran far away]; "" has no target
    assert len(ds) == 3 and (ds.stats.truncated, ds.stats.dropped) == (0, 1)
    b = ds.collate([0, 1, 2])
    cat, hello, x, dog = (_ids(t) for t in HAND[:4])
    P = -100
    assert b.input_ids[0].tolist() == cat + hello[:-1]
    assert b.labels[0].tolist() == cat[1:] + [P] + hello[1:]
    assert b.segment_ids[0].tolist() == [1] * 5 + [2] * 7
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    assert b.input_ids[1].tolist() == x + [TOK.pad_token_id] * 10
    assert b.labels[1].tolist() == [x[1]] + [P] * 11
    assert b.segment_ids[1].tolist() == [1, 1] + [0] * 10 and b.position_ids[1].tolist()[:2] == [0, 1]
    assert b.input_ids[2].tolist() == dog[:-1] and b.labels[2].tolist() == dog[1:]
    assert b.segment_ids[2].tolist() == [1] * 12 and b.position_ids[2].tolist() == list(range(12))
    assert ds.input_tokens(np.arange(3)) == 12 + 2 + 12


def test_pad_packing_and_truncation_counts(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", HAND)
    corpus = load_corpus(_cfg(tmp_path).data, TOK, str(src), log=lambda m: None)
    kw = dict(seq_len=6, packing="pad", seed=0, shuffle=False)
    right = CorpusDataset(corpus, truncation="right", **kw)
    # 7-token rows: "hello world" (8) and the dog (13) are cut, "" (1 token, no target) dropped
    assert len(right) == 4 and (right.stats.truncated, right.stats.dropped) == (2, 1)
    b = right.collate([0, 1, 2, 3])
    cat, hello, x, dog = (_ids(t) for t in HAND[:4])
    assert b.input_ids[0].tolist() == cat + [0] and b.labels[0].tolist() == cat[1:] + [-100] * 2
    assert b.segment_ids[0].tolist() == [1] * 5 + [0] and b.input_ids[1].tolist() == hello[:6]
    assert b.labels[1].tolist() == hello[1:7] and b.labels[3].tolist() == dog[1:7]
    drop = CorpusDataset(corpus, truncation="drop", **kw)
    assert len(drop) == 2 and (drop.stats.truncated, drop.stats.dropped) == (0, 3)
    assert drop.collate([1]).input_ids[0].tolist()[:2] == x
    # the index is cached beside the manifest, keyed by (packing, seq_len, truncation, split)
    assert {p.name for p in (corpus.dir / "packing").iterdir()} == {"pad-L6-right-all-v2", "pad-L6-drop-all-v2"}
    # the loss normaliser from the index (no row materialised) == the collated labels' count, by hand for two rows
    assert right.target_tokens(np.array([0])) == len(cat) - 1 and right.target_tokens(np.array([1])) == 6
    assert right.target_tokens(np.arange(4)) == int((b.labels != -100).sum())


def test_prepared_directory_gives_bit_identical_batches(tmp_path, monkeypatch):
    """`trellis data prepare --out` with 2 worker processes == the trainer's on-the-fly cache (1 process)."""
    monkeypatch.setattr(corpus_mod, "_CHUNK_RECORDS", 16)  # 19 tasks over the 2 workers, results kept in order
    src = tmp_path / "src"
    src.mkdir()
    texts = _words(300, 1)
    _jsonl(src / "a.jsonl", texts[:150])
    _jsonl(src / "b.jsonl", texts[150:])
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "tiny-llama", f"--data.path={src}", "--out", str(out), "--num-proc", "2",
                 "--data.seq_len=16"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["records"] == 300 and m["token_dtype"] == "uint16" and m["prepare"]["num_proc"] == 2
    assert m["counts"]["tokens"] == sum(len(_ids(t)) for t in texts)
    for packing in ("concat", "document", "pad"):
        a, _ = build_dataset(_cfg(tmp_path, path=str(out), packing=packing).data, TOK, 3)
        b, _ = build_dataset(_cfg(tmp_path, path=str(src), packing=packing).data, TOK, 3)
        assert len(a) > 10 and _same(_all(a), _all(b)), packing


def test_changed_source_or_tokenizer_invalidates_the_cache(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", _words(50, 2))
    notes: list[str] = []
    cfg = _cfg(tmp_path, path=str(src))
    first = load_corpus(cfg.data, TOK, str(src), log=notes.append)
    assert load_corpus(cfg.data, TOK, str(src), log=notes.append).dir == first.dir and len(notes) == 1
    src.write_text(src.read_text().replace("the", "thy", 1))  # same size and (maybe) mtime, new content
    second = load_corpus(cfg.data, TOK, str(src), log=notes.append)
    assert "stale" in notes[-1] and "changed" in notes[-1] and second.dir == first.dir
    new = [json.loads(line)["text"] for line in src.read_text().splitlines()]
    assert np.asarray(second.tokens).tolist() == sum((_ids(t) for t in new), [])
    train_bpe_tokenizer([str(builtin_corpus_path())], str(tmp_path / "tok.json"), vocab_size=300)
    other = load_tokenizer(str(tmp_path / "tok.json"))
    third = load_corpus(cfg.data, other, str(src), log=notes.append)
    assert "preparing" in notes[-1] and third.dir != first.dir and len(notes) == 3
    assert int(np.asarray(third.tokens).max()) < 300
    # a prepared directory given as data.path must match: another tokenizer or record type is refused
    with pytest.raises(ConfigError, match=r"prepared.*another tokenizer.*trellis data prepare"):
        load_corpus(cfg.data, other, str(first.dir))
    m = json.loads((first.dir / "manifest.json").read_text())
    (first.dir / "manifest.json").write_text(json.dumps(dict(m, record_type="chat")))
    with pytest.raises(ConfigError, match="record type 'chat'"):
        load_corpus(cfg.data, TOK, str(first.dir))


def test_bad_prepared_corpus_and_empty_data(tmp_path, capsys):
    src = _jsonl(tmp_path / "d.jsonl", _words(20, 4))
    out = tmp_path / "p"
    prepare(_cfg(tmp_path).data, TOK, out, 1, str(src))
    tokens = out / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(ConfigError, match=r"tokens\.bin.*truncated or corrupt.*prepare it again"):
        load_corpus(_cfg(tmp_path).data, TOK, str(out))
    empty = _jsonl(tmp_path / "e.jsonl", [])
    assert main(["data", "prepare", "tiny-llama", f"--data.path={empty}", "--out", str(tmp_path / "q")]) == 2
    assert "no records" in capsys.readouterr().err and not (tmp_path / "q").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")  # never replaced by a preparation
    with pytest.raises(ConfigError, match="not a prepared corpus"):
        prepare(_cfg(tmp_path).data, TOK, tmp_path / "mine", 1, str(src))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_eval_fraction_split_is_seeded_and_disjoint(tmp_path):
    tr, ev = split_units(40, 0.37, seed=5)  # 14.8 records: 15
    assert len(ev) == 15 and len(tr) == 25 and not set(tr) & set(ev) and sorted([*tr, *ev]) == list(range(40))
    assert np.array_equal(split_units(40, 0.37, seed=5)[1], ev) and not np.array_equal(split_units(40, 0.37, 6)[1], ev)
    texts = _words(40, 7)
    src = _jsonl(tmp_path / "d.jsonl", texts)
    cfg = configs.load("tiny-llama", {"data.path": str(src), "data.packing": "pad", "data.eval_fraction": 0.37,
                                      "data.seq_len": 32, "train.eval_batches": 1, "train.seed": 5,
                                      "data.cache_dir": str(tmp_path / "c")})
    train, evd = build_dataset(cfg.data, TOK, seed=5)
    got = [b.input_ids[0][b.segment_ids[0] == 1].tolist() for b in (evd.collate([i]) for i in range(len(evd)))]
    assert got == [_ids(texts[i])[:32] for i in sorted(set(ev))]  # corpus order, whole samples (or cut at 33)
    assert len(train) == 25


def test_epochs_set_the_length_and_conflicts_are_refused(tmp_path):
    assert configs.load("tiny-llama", {"train.steps": 0}).train.steps == 10  # 0 = not given: the default
    d = configs.load("tiny-llama", {"train.steps": 0, "train.epochs": 2}).train
    assert (d.steps, d.epochs) == (0, 2)  # resolved from the dataset at start-up
    with pytest.raises(ConfigError, match=r"train\.steps=200 and train\.epochs=2 both set.*train\.steps=0"):
        configs.load("tiny-llama", {"train.epochs": 2})
    with pytest.raises(ConfigError, match=r"train\.eval_interval=5 needs train\.eval_batches"):
        configs.load("tiny-llama", {"train.eval_interval": 5})
    ds, _ = build_dataset(_cfg(tmp_path, path=str(_jsonl(tmp_path / "d.jsonl", HAND)), packing="pad").data, TOK, 0)
    with pytest.raises(ConfigError, match=r"has 4 rows.*fewer than one batch of 8"):
        GlobalBatchSampler(ds, micro_batch_size=2, grad_accum=2, dp_rank=0, dp_size=2)


_RSS = """
import sys
from trellis import configs
from trellis.engine.data import GlobalBatchSampler, build_dataset
from trellis.engine.tokenizer import load_tokenizer, shipped_tokenizer_path
tok = load_tokenizer(str(shipped_tokenizer_path()))
cfg = configs.load("tiny-llama", {"data.path": sys.argv[1], "data.seq_len": 32, "data.packing": sys.argv[2]})
def anon():  # KiB of anonymous resident memory: what a rank holds itself (mapped shard pages are page cache)
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])
base = anon()
train, _ = build_dataset(cfg.data, tok, 0)
s = GlobalBatchSampler(train, micro_batch_size=4, grad_accum=2, dp_rank=0, dp_size=1)
for _ in range(5):
    s.next()
print(anon() - base)
"""


def test_dataset_build_memory_is_flat_in_the_corpus_size(tmp_path):
    """A 10x larger prepared corpus does not raise the resident (anonymous) memory of building the dataset and
    taking steps."""
    text = builtin_corpus_path().read_text()
    dirs = []
    for k in (1, 10):
        src = tmp_path / f"c{k}.txt"
        src.write_text(text * k)  # 0.17 MB and 1.7 MB of text: 0.15 / 1.5 MB of uint16 tokens
        dirs.append(prepare(_cfg(tmp_path).data, TOK, tmp_path / f"p{k}", 1, str(src)).dir)
    procs = [subprocess.Popen([sys.executable, "-c", _RSS, str(d), "concat"], stdout=subprocess.PIPE, text=True)
             for d in dirs]
    rss = [int(p.communicate(timeout=120)[0].split()[-1]) for p in procs]
    assert rss[1] - rss[0] < 768, rss  # KiB: the 10x corpus read into memory would add >= 1.3 MB
