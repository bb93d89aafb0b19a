"""Deterministic, dp-sharded, resumable global batches over a dataset of items (rows, or preference pairs).

The item order is a pure function of (seed, epoch): step `s` consumes global items [s*G, (s+1)*G) of the
concatenated per-epoch permutations, where G is the global batch size. Each dp rank takes one contiguous block of
that global batch, split into micro-batches. So the data position is just the number of steps taken, and a run
resumed on another dp size (same global batch) sees exactly the same items.
"""

from __future__ import annotations

import numpy as np
import torch

from trellis.errors import ConfigError

from .batch import IGNORE_INDEX, Batch


class ItemDataset:
    """Base of the datasets the sampler draws from: `len` items, `collate(items) -> Batch` and
    `input_tokens(items)` (non-padding input positions); the per-epoch order lives here."""

    def __init__(self, *, seed: int, shuffle: bool):
        self.seed = seed
        self.shuffle = shuffle
        self._perm_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        raise NotImplementedError

    def collate(self, items: list[int]) -> Batch:
        raise NotImplementedError

    def input_tokens(self, items: np.ndarray) -> int:
        raise NotImplementedError

    def target_tokens(self, items: np.ndarray) -> int:
        """Counted targets (labels != -100) of these items: the loss normaliser's share. Generic: collate and
        count; datasets that know it from an index override this."""
        items = [int(i) for i in items]
        return sum(int((self.collate(items[a:a + 256]).labels != IGNORE_INDEX).sum()) for a in range(0, len(items), 256))

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            n = len(self)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_cache = {epoch: perm}
        return self._perm_cache[epoch]

    def item(self, global_index: int) -> int:
        epoch, pos = divmod(global_index, len(self))
        return int(self._order(epoch)[pos])

    def items(self, start: int, n: int) -> np.ndarray:
        """The items at global indices [start, start + n), epoch by epoch."""
        out, n_items = [], len(self)
        while n > 0:
            epoch, pos = divmod(start, n_items)
            take = min(n, n_items - pos)
            out.append(self._order(epoch)[pos:pos + take])
            start, n = start + take, n - take
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class PackedDataset(ItemDataset):
    """In-memory rows of seq_len + 1 tokens (concat semantics: labels = row[1:])."""

    def __init__(self, rows: np.ndarray, *, seed: int, shuffle: bool):
        if len(rows) == 0:
            raise ConfigError("data: the corpus is shorter than one sequence; lower data.seq_len or add text")
        self.rows = rows
        super().__init__(seed=seed, shuffle=shuffle)

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, global_index: int) -> np.ndarray:
        return self.rows[self.item(global_index)]

    def collate(self, items: list[int]) -> Batch:
        t = torch.from_numpy(np.stack([self.rows[i] for i in items]))
        return Batch(input_ids=t[:, :-1].contiguous(), labels=t[:, 1:].contiguous())

    def input_tokens(self, items: np.ndarray) -> int:
        return len(items) * (self.rows.shape[1] - 1)

    def target_tokens(self, items: np.ndarray) -> int:
        return len(items) * (self.rows.shape[1] - 1)  # every label counts


class StepBatches(list):
    """One step's micro-batches of this dp rank (a list of Batch) and `global_tokens`: the counted targets of
    the whole global batch, every dp rank's, as the sampler knows them. The backends use it as the loss
    normaliser instead of a collective before the first forward, and confirm it in the step's one scalar
    all-reduce afterwards (a loop that changed labels still gets the exact normaliser: engine/backends/base.py)."""

    global_tokens: int | None = None


class GlobalBatchSampler:
    """Hands each dp rank its micro-batches for a step; state = steps consumed."""

    def __init__(self, dataset: ItemDataset | None, *, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int,
                 name: str = "the training set"):
        self.ds = dataset
        self.mb = micro_batch_size
        self.accum = grad_accum
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.step = 0  # dataset None: only the data position (the Engine's, saved by checkpoints)
        if dataset is not None and len(dataset) < self.global_batch_size:
            raise ConfigError(
                f"data: {name} has {len(dataset)} rows (pairs for preference data), fewer than one batch of "
                f"{self.global_batch_size} (micro_batch_size {micro_batch_size} x {grad_accum} micro-batches x dp "
                f"{dp_size}); add data, lower data.seq_len or the batch")

    @property
    def global_batch_size(self) -> int:
        return self.mb * self.accum * self.dp_size

    def micro_batches(self, step: int | None = None) -> "StepBatches":
        """This rank's `grad_accum` micro-batches for `step` (default: the next one), with the step's global
        count of counted targets (every dp rank's: the loss normaliser, known here without a collective)."""
        step = self.step if step is None else step
        base = step * self.global_batch_size + self.dp_rank * self.mb * self.accum
        out = StepBatches(self.ds.collate(self.ds.items(base + a * self.mb, self.mb).tolist())
                          for a in range(self.accum))
        out.global_tokens = self.ds.target_tokens(self.ds.items(step * self.global_batch_size, self.global_batch_size))
        return out

    def input_tokens(self, first_step: int, num_steps: int = 1) -> int:
        """Non-padding input positions of the global batches (every dp rank's) of steps [first, first + num),
        from the packing index alone: no row is materialised and no collective is needed."""
        g, total, chunk = self.global_batch_size, 0, 1 << 20
        start, end = first_step * g, (first_step + num_steps) * g
        for a in range(start, end, chunk):
            total += self.ds.input_tokens(self.ds.items(a, min(chunk, end - a)))
        return total

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


class ItemSlice(ItemDataset):
    """Items [start, stop) of another dataset (today's held-out tail for evaluation), with its own order."""

    def __init__(self, base: ItemDataset, start: int, stop: int, *, seed: int, shuffle: bool):
        self.base, self.start, self.stop = base, start, stop
        self.stats, self.packing = getattr(base, "stats", None), getattr(base, "packing", "concat")
        super().__init__(seed=seed, shuffle=shuffle)

    def __len__(self) -> int:
        return self.stop - self.start

    def collate(self, items: list[int]) -> Batch:
        return self.base.collate([self.start + i for i in items])

    def input_tokens(self, items: np.ndarray) -> int:
        return self.base.input_tokens(np.asarray(items) + self.start)

    def target_tokens(self, items: np.ndarray) -> int:
        return self.base.target_tokens(np.asarray(items) + self.start)
