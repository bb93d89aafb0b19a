"""Document packing is exact on every family: each token's loss in a packed row (3 samples of different lengths +
padding; 2 samples in the second row) equals its loss with its sample run alone, unpacked, through the plain HF
model (no mask, positions 0..n-1) — on the whole model (what every non-pipeline layout runs) and through the two
pipeline stage modules of pp2 chained in one process (parallel/stage_forward.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.support.packing import alone_token_losses, packed_batch, token_losses
from trellis import configs
from trellis.engine.model import build_model
from trellis.parallel.attention import block_causal_mask, model_inputs, positions_from_segments, stage_layout
from trellis.parallel.hf_compat import alibi_from_key_positions
from trellis.parallel.hf_surgery import prepare_model
from trellis.parallel.models import family_for
from trellis.parallel.pipeline import build_stage_module, split_layers

FAMILIES = ("tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-bloom", "tiny-neox", "tiny-qwen3", "tiny-phi3", "tiny-gemma2")
SEQ = 32
ROWS = [[7, 11, 9], [13, 12]]  # then padding


def _model(name: str):
    model, _ = build_model(configs.load("tiny-llama", {"model.path": name}).model, seed=0)
    model.eval()
    spec = family_for(model.config.model_type)
    prepare_model(model, spec)
    if spec.alibi:
        alibi_from_key_positions(model, spec.backbone)
    return model, spec


def _pp2_logits(model, spec, ids, layout) -> torch.Tensor:
    """The two stages of pp2 (even split), chained in-process: stage 0 hands (h, segment_ids, positions) on."""
    ranges = split_layers(len(model.get_submodule(spec.layers)), 2, "even")
    first = build_stage_module(copy.deepcopy(model), spec, 0, 2, ranges[0])
    last = build_stage_module(copy.deepcopy(model), spec, 1, 2, ranges[1])
    out = first(ids, *layout)
    assert isinstance(out, tuple) and len(out) == 3 and not out[1].is_floating_point()
    return last(*out)


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_row_token_losses_equal_each_sample_alone(name):
    model, spec = _model(name)
    b, samples = packed_batch(ROWS, SEQ, model.config.vocab_size, seed=0)
    counted = b.labels != -100
    ref = alone_token_losses(model, samples, SEQ)
    with torch.no_grad():
        kw = model_inputs(b.input_ids, segment_ids=b.segment_ids, position_ids=b.position_ids, dtype=torch.float32,
                          device="cpu")
        whole = token_losses(model(**kw).logits, b.labels)
        layout = stage_layout(b.input_ids, b.segment_ids, b.position_ids, None)
        staged = token_losses(_pp2_logits(model, spec, b.input_ids, layout), b.labels)
    d_whole = (whole - ref)[counted].abs().max().item()
    d_staged = (staged - ref)[counted].abs().max().item()
    print(f"{name}: max per-token |Δ| whole model {d_whole:.1e}, pp2 stages {d_staged:.1e}")
    assert d_whole <= 1e-6 and d_staged <= 1e-6


def test_concat_batch_is_todays_call():
    """No segments, mask or positions: exactly input_ids (sdpa keeps its is_causal path, losses bit-identical)."""
    ids = torch.randint(0, 100, (2, 8))
    kw = model_inputs(ids, dtype=torch.float32, device="cpu")
    assert list(kw) == ["input_ids"] and torch.equal(kw["input_ids"], ids)
    assert stage_layout(ids, None, None, None) is None


def test_mask_and_positions_by_hand():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    assert positions_from_segments(seg).tolist() == [[0, 1, 0, 1, 2, 0]]
    keep = block_causal_mask(seg, torch.float32)[0, 0] == 0
    expect = torch.tensor([[1, 0, 0, 0, 0, 0],
                           [1, 1, 0, 0, 0, 0],
                           [0, 0, 1, 0, 0, 0],
                           [0, 0, 1, 1, 0, 0],
                           [0, 0, 1, 1, 1, 0],
                           [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(keep, expect)
    # prefix tuning: 2 key/value-only columns in front, visible to every query
    keep = block_causal_mask(seg, torch.float32, prefix_len=2)[0, 0] == 0
    assert keep.shape == (6, 8) and keep[:, :2].all() and torch.equal(keep[:, 2:], expect)
    # prompt tuning: 2 virtual tokens in front (queries and keys), causal among themselves, seen by every token
    keep = block_causal_mask(seg, torch.float32, virtual_tokens=2)[0, 0] == 0
    assert keep.shape == (8, 8) and keep[2:, :2].all() and torch.equal(keep[:2, :2], torch.ones(2, 2).tril().bool())
    assert not keep[:2, 2:].any() and torch.equal(keep[2:, 2:], expect)
