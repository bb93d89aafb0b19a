"""Tokenized samples and their loss masks (PROVISIONAL: data.type="text" only; the full records module with
prompt/response, chat and preference records replaces this file)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    input_ids: np.ndarray  # int32 [n]: the sample's tokens (EOS appended where the record type ends with one)
    loss_mask: np.ndarray  # uint8 [n]: 1 where the token is a training target


@dataclass
class PreferenceSample:
    chosen: Sample
    rejected: Sample


def encode_batch(data_cfg, tokenizer, records: list[tuple[dict | str, str]]) -> list[Sample | PreferenceSample]:
    """Text records: every token is a target, EOS appended (one batched tokenizer call)."""
    texts = [r if isinstance(r, str) else str(r[data_cfg.text_field]) for r, _ in records]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        a = np.asarray(ids + eos, dtype=np.int32)
        out.append(Sample(a, np.ones(len(a), dtype=np.uint8)))
    return out
