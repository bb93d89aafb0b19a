"""Hand-built document-packed micro-batches and the unpacked reference every packing test compares with.

A packed row holds whole samples back to back (segment ids 1..k, 0 = padding); the label of a sample's last token
and of padding is -100, as data packing produces them. The reference runs each sample ALONE through the plain HF
model (no mask, positions 0..n-1): what a token sees there is what it must see packed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trellis.engine.data import Batch

IGNORE = -100


def packed_batch(rows: list[list[int]], seq_len: int, vocab: int, seed: int) -> tuple[Batch, list[list[torch.Tensor]]]:
    """A Batch of len(rows) packed rows; row r holds samples of the given lengths (random ids), then padding.
    Returns the batch and, per row, the samples' token ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(rows), seq_len, dtype=torch.int64)
    labels = torch.full((len(rows), seq_len), IGNORE, dtype=torch.int64)
    seg = torch.zeros(len(rows), seq_len, dtype=torch.int32)
    pos = torch.zeros(len(rows), seq_len, dtype=torch.int64)
    samples: list[list[torch.Tensor]] = []
    for r, lengths in enumerate(rows):
        assert sum(lengths) <= seq_len
        at, row = 0, []
        for k, n in enumerate(lengths, 1):
            s = torch.randint(3, vocab, (n,), generator=g)
            ids[r, at:at + n] = s
            labels[r, at:at + n - 1] = s[1:]
            seg[r, at:at + n] = k
            pos[r, at:at + n] = torch.arange(n)
            row.append(s)
            at += n
        pos[r, at:] = torch.arange(seq_len - at)
        samples.append(row)
    return Batch(input_ids=ids, labels=labels, segment_ids=seg, position_ids=pos), samples


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross entropy (0 where the label is ignored), fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                           ignore_index=IGNORE).view(labels.shape)


def alone_token_losses(model, samples: list[list[torch.Tensor]], seq_len: int) -> torch.Tensor:
    """[rows, seq_len]: each counted token's loss with its sample run alone, at its packed position."""
    out = torch.zeros(len(samples), seq_len)
    with torch.no_grad():
        for r, row in enumerate(samples):
            at = 0
            for s in row:
                logits = model(input_ids=s[None]).logits[0, :-1]
                out[r, at:at + len(s) - 1] = token_losses(logits, s[1:])
                at += len(s)
    return out


def alone_loss_sum(model, samples: list[list[torch.Tensor]]) -> torch.Tensor:
    """Sum of every counted token's loss, each sample alone (with grad): the training reference."""
    total = 0.0
    for row in samples:
        for s in row:
            logits = model(input_ids=s[None]).logits[0, :-1]
            total = total + F.cross_entropy(logits.float(), s[1:], reduction="sum")
    return total
