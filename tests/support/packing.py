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


def alone_loss_sum(model, samples: list[list[torch.Tensor]], n_virtual: int = 0) -> torch.Tensor:
    """Sum of every counted token's loss, each sample alone (with grad): the training reference. `n_virtual`:
    peft's prompt tuning returns logits for its virtual tokens too; they are dropped."""
    total = 0.0
    for row in samples:
        for s in row:
            logits = model(input_ids=s[None]).logits[0, n_virtual:-1]
            total = total + F.cross_entropy(logits.float(), s[1:], reduction="sum")
    return total


def global_batches(cfg, vocab: int, steps: int, pad: bool = False) -> list[list[Batch]]:
    """Per step, the dp * grad_accum micro-batches of the global batch (micro_batch_size rows each), in the
    order the engine's dp ranks take them (rank r: micro-batches [r * accum, (r + 1) * accum)). Document rows
    hold 2-3 samples; `pad` rows one left-padded sample each, given as a user attention_mask (no segment ids)."""
    t, seq = cfg.train, cfg.data.seq_len
    g = torch.Generator().manual_seed(1234)
    out = []
    for step in range(steps):
        mbs = []
        for m in range(t.grad_accum * max(cfg.parallel.dp, 1)):
            rows = []
            for _ in range(t.micro_batch_size):
                k = 1 if pad else int(torch.randint(2, 4, (1,), generator=g))
                lengths = torch.randint(3, seq // k, (k,), generator=g).tolist()
                rows.append(lengths)
            b, samples = packed_batch(rows, seq, vocab, seed=1000 * step + m)
            if pad:  # left-padded, as generation-style data comes: without the mask tokens would see the padding
                b = _left_padded(b)
            mbs.append((b, samples))
        out.append(mbs)
    return out


def _left_padded(b: Batch) -> Batch:
    """One sample per row moved to the row's end: a Batch with only a padding attention_mask."""
    ids, labels, mask = b.input_ids.clone(), b.labels.clone(), (b.segment_ids > 0).long()
    for r in range(ids.shape[0]):
        shift = int((mask[r] == 0).sum())
        ids[r], labels[r], mask[r] = ids[r].roll(shift), labels[r].roll(shift), mask[r].roll(shift)
    return Batch(input_ids=ids, labels=labels, attention_mask=mask)


def reference_losses(model, cfg, batches: list[list[tuple[Batch, list]]], n_virtual: int = 0) -> list[float]:
    """1-process reference: every sample ALONE through `model` (plain HF, or HF + peft's public API), the loss
    normalised by the global batch's counted tokens, plain torch AdamW with the run's settings."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=0.0, foreach=False)
    losses = []
    for step in batches:
        n_tokens = sum(int((b.labels != IGNORE).sum()) for b, _ in step)
        total = 0.0
        for _, samples in step:
            loss = alone_loss_sum(model, samples, n_virtual) / n_tokens
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses
