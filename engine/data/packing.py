"""Packing: which tokens of a prepared corpus make each training row, and the rows themselves.

Every row is a buffer of seq_len + 1 tokens: input = buf[:-1], the label at t is buf[t+1] when that token is a
target (loss_mask) and, for document/pad packing, belongs to the same sample as t; else IGNORE_INDEX.

- concat: windows of seq_len + 1 tokens of the documents' stream (crossing document boundaries, no index needed);
- document: whole samples placed greedily in corpus order (next-fit: a sample that does not fit the current row
  starts the next one; a sample is never split), segment_ids 1..k and position_ids restarting per sample;
- pad: one sample per row, padded with the tokenizer's pad id (EOS when it has none), segment_ids 1 / 0.
  Preference records are pairs: one item = a chosen and a rejected row.

A sample longer than seq_len + 1 tokens is cut to seq_len + 1 (data.truncation = "right") or dropped ("drop"); a
sample left with no counted target is dropped. The index for document/pad (which documents, how long, which row)
depends on (seq_len, packing, truncation, split) and is cached beside the manifest, memory-mapped on later starts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trellis.errors import ConfigError
from trellis.parallel.loss import IGNORE_INDEX

from .batch import Batch
from .corpus import Corpus
from .sampler import ItemDataset


def resolve_packing(data_cfg, record_type: str) -> str:
    """data.packing "auto": concat for text, pad for preference, document otherwise."""
    if data_cfg.packing != "auto":
        return data_cfg.packing
    return {"text": "concat", "preference": "pad"}.get(record_type, "document")


def pack(token_ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut one in-memory token stream into rows of seq_len+1 tokens (input = row[:-1], labels = row[1:])."""
    n = len(token_ids) // (seq_len + 1)
    return token_ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def split_units(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) record ids: a seeded random `fraction` of the n records (at least one) for eval, both sorted
    so each side keeps corpus order."""
    n_eval = min(max(1, round(fraction * n)), n - 1) if n > 1 else 0
    perm = np.random.default_rng([seed, 0xE7A1]).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


@dataclass
class PackingStats:
    truncated: int = 0  # samples cut to seq_len + 1 tokens
    dropped: int = 0  # samples (or pairs) dropped: too long with truncation "drop", or no target left


class CorpusDataset(ItemDataset):
    """Rows of a prepared corpus under one packing mode; `units` (record ids; None = all) selects a split."""

    def __init__(self, corpus: Corpus, *, seq_len: int, packing: str, truncation: str, seed: int, shuffle: bool,
                 units: np.ndarray | None = None, split: str = "all"):
        self.corpus, self.seq_len, self.packing, self.truncation = corpus, seq_len, packing, truncation
        self.preference = corpus.record_type == "preference"
        if self.preference and packing != "pad":
            raise ConfigError(f"data.packing={packing!r}: preference records need packing 'pad' (or 'auto')")
        self.stats = PackingStats()
        if packing == "concat":
            self._init_concat(units)
        else:
            self._load_or_build(units, split)
        super().__init__(seed=seed, shuffle=shuffle)

    # ---- concat: windows over the stream of the selected documents ------------------------------------------
    def _init_concat(self, units: np.ndarray | None) -> None:
        L1 = self.seq_len + 1
        if units is None:  # the whole corpus: the stream is the token shard itself
            self._docs, self._cum = None, None
            total = len(self.corpus.tokens)
        else:
            lens = self.corpus.doc_lengths()[units]
            self._docs, self._cum = units, np.concatenate([[0], np.cumsum(lens)])
            total = int(self._cum[-1])
        self._n = total // L1

    def _stream(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.corpus
        if self._docs is None:
            return c.tokens[start:start + n], c.loss_mask[start:start + n]
        toks, masks = [], []
        j = int(np.searchsorted(self._cum, start, side="right")) - 1
        while n > 0:
            off = start - int(self._cum[j])
            d = int(self._docs[j])
            a = int(c.doc_offsets[d]) + off
            take = min(n, int(c.doc_offsets[d + 1]) - a)
            toks.append(c.tokens[a:a + take])
            masks.append(c.loss_mask[a:a + take])
            start, n, j = start + take, n - take, j + 1
        return np.concatenate(toks), np.concatenate(masks)

    # ---- document / pad: a cached index of (document, length) segments per row --------------------------------
    def _load_or_build(self, units: np.ndarray | None, split: str) -> None:
        # (v2: the index holds each segment's counted targets, seg_tgt)
        d = self.corpus.dir / "packing" / f"{self.packing}-L{self.seq_len}-{self.truncation}-{split}-v2"
        if (d / "stats.json").is_file():
            arrays = tuple(np.load(d / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in _INDEX_ARRAYS)
            stats = json.loads((d / "stats.json").read_text())
        else:
            arrays, stats = self._build(units)
            _save_index(d, arrays, stats)  # a read-only corpus directory keeps the index in memory only
        self.seg_doc, self.seg_len, self.row_ptr, self.row_len, seg_tgt = arrays
        # counted targets per row (what collate's labels count): the loss normaliser without a collective
        self.row_tgt = (np.add.reduceat(np.asarray(seg_tgt), self.row_ptr[:-1]) if len(seg_tgt)
                        else np.zeros(0, np.int64))
        self.stats = PackingStats(**stats)
        rows = len(self.row_ptr) - 1
        self._n = rows // 2 if self.preference else rows  # a preference item = rows 2i (chosen), 2i+1 (rejected)

    def _build(self, units: np.ndarray | None) -> tuple[tuple[np.ndarray, ...], dict]:
        c, L1 = self.corpus, self.seq_len + 1
        lens_all, tgt_all = c.doc_lengths(), c.doc_targets
        units = np.arange(c.num_units) if units is None else np.asarray(units)
        docs = np.stack([2 * units, 2 * units + 1], axis=1) if self.preference else units[:, None]
        lens = np.minimum(lens_all[docs], L1)
        tgt = np.asarray(tgt_all[docs], dtype=np.int64).copy()
        long = lens_all[docs] > L1
        truncated = int(long.any(axis=1).sum())
        if self.truncation == "drop":
            keep = ~long.any(axis=1)
        else:  # right: recount the targets of the cut samples from the mask
            for i, k in zip(*np.nonzero(long)):
                a = int(c.doc_offsets[docs[i, k]])
                tgt[i, k] = int(c.loss_mask[a + 1:a + L1].sum())
            keep = np.ones(len(units), dtype=bool)
        keep &= (tgt > 0).all(axis=1)
        dropped = int((~keep).sum())
        docs, lens = docs[keep], lens[keep]
        seg_doc, seg_len = docs.reshape(-1).astype(np.int64), lens.reshape(-1).astype(np.int64)
        seg_tgt = tgt[keep].reshape(-1).astype(np.int64)  # a segment's targets: loss_mask[o + 1:o + n] of its doc
        if self.packing == "pad" or len(seg_doc) == 0:
            row_ptr = np.arange(len(seg_doc) + 1, dtype=np.int64)
        else:
            starts, room = [], 0
            for i, n in enumerate(seg_len.tolist()):
                if n > room:
                    starts.append(i)
                    room = L1
                room -= n
            row_ptr = np.asarray(starts + [len(seg_doc)], dtype=np.int64)
        row_len = np.add.reduceat(seg_len, row_ptr[:-1]) if len(seg_len) else np.zeros(0, np.int64)
        return (seg_doc, seg_len, row_ptr, row_len, seg_tgt), {"truncated": truncated if self.truncation == "right" else 0,
                                                      "dropped": dropped}

    # ---- rows -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def _rows(self, items: list[int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """(tokens, mask, segment, position) buffers of seq_len + 1 for each row of `items`."""
        L1, c = self.seq_len + 1, self.corpus
        if self.packing == "concat":
            return [(*self._stream(i * L1, L1), None, None) for i in items]
        rows = []
        for r in self._row_ids(items):
            a, b = int(self.row_ptr[r]), int(self.row_ptr[r + 1])
            tok = np.full(L1, c.pad_id, dtype=np.int64)
            mask = np.zeros(L1, dtype=np.uint8)
            seg = np.zeros(L1, dtype=np.int32)
            pos = np.zeros(L1, dtype=np.int64)
            at = 0
            for k, s in enumerate(range(a, b), 1):
                d, n = int(self.seg_doc[s]), int(self.seg_len[s])
                o = int(c.doc_offsets[d])
                tok[at:at + n] = c.tokens[o:o + n]
                mask[at:at + n] = c.loss_mask[o:o + n]
                seg[at:at + n] = k
                pos[at:at + n] = np.arange(n)
                at += n
            rows.append((tok, mask, seg, pos))
        return rows

    def collate(self, items: list[int]) -> Batch:
        rows = self._rows(items)
        tok = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
        mask = torch.from_numpy(np.stack([r[1] for r in rows]).astype(bool))
        target = mask[:, 1:]
        seg = pos = None
        if rows[0][2] is not None:
            s = torch.from_numpy(np.stack([r[2] for r in rows]))
            target = target & (s[:, 1:] == s[:, :-1]) & (s[:, :-1] != 0)
            seg = s[:, :-1].contiguous()
            pos = torch.from_numpy(np.stack([r[3] for r in rows]))[:, :-1].contiguous()
        labels = torch.where(target, tok[:, 1:], torch.full_like(tok[:, 1:], IGNORE_INDEX))
        return Batch(input_ids=tok[:, :-1].contiguous(), labels=labels.contiguous(), segment_ids=seg, position_ids=pos)

    def _row_ids(self, items) -> list[int]:
        """Index rows of `items`; preference: the chosen rows of all pairs, then their rejected rows."""
        if self.preference:
            return [2 * int(i) for i in items] + [2 * int(i) + 1 for i in items]
        return [int(i) for i in items]

    def input_tokens(self, items: np.ndarray) -> int:
        """Non-padding input positions of these items' rows (from the index; no row materialised)."""
        if self.packing == "concat":
            return len(items) * self.seq_len
        items = np.asarray(items, dtype=np.int64)
        rows = np.concatenate([2 * items, 2 * items + 1]) if self.preference else items
        return int(np.minimum(np.asarray(self.row_len[rows]), self.seq_len).sum())

    def target_tokens(self, items: np.ndarray) -> int:
        """Counted targets (labels != -100) of these items' rows, from the index (no row materialised)."""
        items = np.asarray(items, dtype=np.int64)
        if self.packing == "concat":
            L1 = self.seq_len + 1
            return sum(int(self._stream(int(i) * L1 + 1, L1 - 1)[1].sum()) for i in items)
        rows = np.concatenate([2 * items, 2 * items + 1]) if self.preference else items
        return int(self.row_tgt[rows].sum())


_INDEX_ARRAYS = ("seg_doc", "seg_len", "row_ptr", "row_len", "seg_tgt")


def _save_index(d: Path, arrays: tuple[np.ndarray, ...], stats: dict) -> None:
    """Write the index atomically (temp dir + rename); silently skipped where the corpus is read-only."""
    tmp = d.parent / f".{d.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        tmp.mkdir(parents=True)
        for k, a in zip(_INDEX_ARRAYS, arrays):
            np.save(tmp / f"{k}.npy", a, allow_pickle=False)
        (tmp / "stats.json").write_text(json.dumps(stats))
        os.rename(tmp, d)
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
