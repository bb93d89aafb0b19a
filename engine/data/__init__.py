"""Records → prepared (memory-mapped) corpus → packed rows → deterministic, dp-sharded, resumable global batches.

Modules, one concern each: sources (where records come from), records (tokenized samples and loss masks),
corpus (tokenize once into memory-mapped shards + manifest), packing (rows of seq_len + 1 tokens: concat,
document, pad), sampler (the global-batch order: a pure function of seed, epoch and step), batch (the micro-batch
contract). `build_dataset` is the entry point the trainer uses.
"""

from __future__ import annotations

from trellis.errors import ConfigError

from .batch import IGNORE_INDEX, Batch, global_token_count, local_token_count, map_tensors
from .corpus import Corpus, load_corpus, prepare
from .packing import CorpusDataset, PackingStats, pack, resolve_packing, split_units
from .sampler import GlobalBatchSampler, ItemDataset, ItemSlice, PackedDataset, StepBatches

__all__ = ["IGNORE_INDEX", "Batch", "Corpus", "CorpusDataset", "GlobalBatchSampler", "ItemDataset", "PackedDataset",
           "PackingStats", "StepBatches", "build_dataset", "global_token_count", "load_corpus", "local_token_count",
           "pack", "prepare"]


def build_dataset(data_cfg, tokenizer, seed: int, hold_out: int = 0, *, rank: int = 0, num_proc: int = 0,
                  log=print) -> tuple[ItemDataset, ItemDataset | None]:
    """(train, eval) datasets. The eval set is data.eval_path's corpus, else a seeded data.eval_fraction of the
    records, else (when `hold_out` > 0) the last `hold_out` rows; None when none is asked for."""
    corpus = load_corpus(data_cfg, tokenizer, data_cfg.path, rank=rank, num_proc=num_proc, log=log)
    packing = resolve_packing(data_cfg, corpus.record_type)
    truncation = getattr(data_cfg, "truncation", "right")

    def rows(c: Corpus, units=None, split: str = "all", shuffle: bool = data_cfg.shuffle) -> CorpusDataset:
        return CorpusDataset(c, seq_len=data_cfg.seq_len, packing=packing, truncation=truncation, seed=seed,
                             shuffle=shuffle, units=units, split=split)

    if data_cfg.eval_path:
        ev_corpus = load_corpus(data_cfg, tokenizer, data_cfg.eval_path, rank=rank, num_proc=num_proc,
                                field="data.eval_path", log=log)
        return rows(corpus), rows(ev_corpus, shuffle=False)
    if data_cfg.eval_fraction:
        if corpus.num_units < 2:
            raise ConfigError(f"data.eval_fraction={data_cfg.eval_fraction}: data.path has {corpus.num_units} "
                              "record(s), too few to split; add records or use data.eval_path")
        train_units, eval_units = split_units(corpus.num_units, data_cfg.eval_fraction, seed)
        split = f"frac{data_cfg.eval_fraction:g}-seed{seed}"
        return rows(corpus, train_units, f"{split}-train"), rows(corpus, eval_units, f"{split}-eval", False)
    full = rows(corpus)
    if not hold_out:
        return full, None
    if hold_out >= len(full):
        raise ConfigError(f"train.eval_batches: needs {hold_out} held-out rows but the corpus has {len(full)}; "
                          "lower train.eval_batches or set data.eval_path")
    n = len(full) - hold_out
    return ItemSlice(full, 0, n, seed=seed, shuffle=data_cfg.shuffle), ItemSlice(full, n, len(full), seed=seed,
                                                                                  shuffle=False)
