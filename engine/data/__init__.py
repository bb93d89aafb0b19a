"""Text → packed token sequences → deterministic, dp-sharded, resumable global batches.

The sample order is a pure function of (seed, epoch): step `s` consumes global samples
[s*G, (s+1)*G) of the concatenated per-epoch permutations, where G is the global batch size. Each dp
rank takes one contiguous block of that global batch, split into micro-batches. So the data position
is just the number of steps taken, and a run resumed on another dp size (same global batch) sees
exactly the same samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trellis.configs import PRESET_DIR
from trellis.errors import ConfigError
from trellis.parallel.loss import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "Batch", "GlobalBatchSampler", "PackedDataset", "build_dataset", "global_token_count"]


def builtin_corpus_path() -> Path:
    return PRESET_DIR / "data" / "corpus.txt"


def _files(path: str) -> list[Path]:
    if path == "builtin:demo":
        return [builtin_corpus_path()]
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl", ".json") and f.is_file())
        if files:
            return files
        raise ConfigError(f"data.path={path!r}: directory holds no .txt or .jsonl files")
    raise ConfigError(f"data.path={path!r}: no such file or directory (use 'builtin:demo' for the shipped corpus)")


def read_documents(path: str, fmt: str = "auto", text_field: str = "text") -> list[str]:
    docs: list[str] = []
    for f in _files(path):
        kind = fmt if fmt != "auto" else ("jsonl" if f.suffix in (".jsonl", ".json") else "text")
        if kind == "text":
            docs.append(f.read_text(encoding="utf-8", errors="replace"))
            continue
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"data.path: {f}:{lineno} is not valid JSON; use data.format='text' for plain text") from None
            if not isinstance(rec, dict) or text_field not in rec:
                raise ConfigError(f"data.text_field={text_field!r}: missing in {f}:{lineno}; set data.text_field")
            docs.append(str(rec[text_field]))
    return docs


def pack(token_ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut one token stream into rows of seq_len+1 tokens (input = row[:-1], labels = row[1:])."""
    n = len(token_ids) // (seq_len + 1)
    return token_ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def tokenize_documents(docs: list[str], tokenizer) -> np.ndarray:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for d in docs:
        stream.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    return np.asarray(stream, dtype=np.int64)


@dataclass
class Batch:
    """One micro-batch. The contract every backend, the pipeline and the Python API share:

    - input_ids [b, s] int64; labels [b, s] int64 next-token targets, IGNORE_INDEX (-100) where a position is
      not counted (prompt/user tokens, padding, the last token of a packed sample);
    - segment_ids [b, s] int32 or None: 0 = padding, k >= 1 = the k-th sample of its row. Attention stays inside
      a segment (block-diagonal causal mask). None = each row is one causal sequence (concat packing);
    - position_ids [b, s] int64 or None: per-sample positions (0 at each sample's first token); None = 0..s-1;
    - attention_mask [b, s] 1/0 or None: a padding mask as users pass it (Python API); it means the same as
      segment_ids = attention_mask (one sample per row);
    - extra: any other keys a user's loss function reads (Python API), moved to the device with the batch.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


class PackedDataset:
    """Fixed-length sequences with a deterministic per-epoch order."""

    def __init__(self, rows: np.ndarray, *, seed: int, shuffle: bool):
        if len(rows) == 0:
            raise ConfigError("data: the corpus is shorter than one sequence; lower data.seq_len or add text")
        self.rows = rows
        self.seed = seed
        self.shuffle = shuffle
        self._perm_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if self.shuffle:
                self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))}
            else:
                self._perm_cache = {epoch: np.arange(len(self.rows))}
        return self._perm_cache[epoch]

    def sample(self, global_index: int) -> np.ndarray:
        epoch, pos = divmod(global_index, len(self.rows))
        return self.rows[self._order(epoch)[pos]]


class GlobalBatchSampler:
    """Hands each dp rank its micro-batches for a step; state = steps consumed."""

    def __init__(self, dataset: PackedDataset, *, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int):
        self.ds = dataset
        self.mb = micro_batch_size
        self.accum = grad_accum
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.step = 0

    @property
    def global_batch_size(self) -> int:
        return self.mb * self.accum * self.dp_size

    def micro_batches(self, step: int | None = None) -> list[Batch]:
        """This rank's `grad_accum` micro-batches for `step` (default: the next one)."""
        step = self.step if step is None else step
        base = step * self.global_batch_size + self.dp_rank * self.mb * self.accum
        out = []
        for a in range(self.accum):
            rows = np.stack([self.ds.sample(base + a * self.mb + j) for j in range(self.mb)])
            t = torch.from_numpy(rows)
            out.append(Batch(input_ids=t[:, :-1].contiguous(), labels=t[:, 1:].contiguous()))
        return out

    def next(self) -> list[Batch]:
        batches = self.micro_batches(self.step)
        self.step += 1
        return batches

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_consumed": self.step * self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        if "samples_consumed" in state and state["samples_consumed"] % self.global_batch_size:
            raise ConfigError(
                f"resume: the checkpoint consumed {state['samples_consumed']} samples, not a multiple of the "
                f"global batch size {self.global_batch_size}; resume with the global batch it was trained with")
        self.step = state["samples_consumed"] // self.global_batch_size if "samples_consumed" in state else state["step"]


def global_token_count(micro_batches: list[Batch], group=None) -> int:
    """Counted (non-ignored) target tokens of one step over `group`: the loss normaliser."""
    n = torch.tensor([sum(int((b.labels != IGNORE_INDEX).sum()) for b in micro_batches)], dtype=torch.float64)
    dist.all_reduce(n, group=group)
    return int(n.item())


def build_dataset(data_cfg, tokenizer, seed: int, hold_out: int = 0) -> tuple[PackedDataset, PackedDataset | None]:
    """(train, eval) datasets; eval holds the last `hold_out` sequences when > 0."""
    docs = read_documents(data_cfg.path, data_cfg.format, data_cfg.text_field)
    rows = pack(tokenize_documents(docs, tokenizer), data_cfg.seq_len)
    if hold_out and hold_out >= len(rows):
        raise ConfigError(f"train.eval_batches: needs {hold_out} held-out sequences but the corpus has {len(rows)}")
    train_rows, eval_rows = (rows[:-hold_out], rows[-hold_out:]) if hold_out else (rows, None)
    train = PackedDataset(train_rows, seed=seed, shuffle=data_cfg.shuffle)
    ev = PackedDataset(eval_rows, seed=seed, shuffle=False) if eval_rows is not None else None
    return train, ev
