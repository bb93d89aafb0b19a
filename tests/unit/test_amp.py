"""Dynamic loss scaler semantics (hand-derived sequences)."""

import pytest

from trellis.engine.amp import DynamicLossScaler, LossScaleUnderflow


def test_growth_after_window_clean_steps():
    s = DynamicLossScaler(scale=2.0 ** 4, window=3, hysteresis=1, min_scale=1)
    seen = []
    for _ in range(7):
        s.update(False)
        seen.append(s.scale)
    assert seen == [16, 16, 32, 32, 32, 64, 64]


def test_overflow_halves_and_resets_window():
    s = DynamicLossScaler(scale=64, window=2, hysteresis=1, min_scale=1)
    s.update(False)
    s.update(True)
    assert s.scale == 32
    s.update(False)
    assert s.scale == 32  # window restarted by the overflow
    s.update(False)
    assert s.scale == 64


def test_hysteresis_delays_the_first_halving():
    s = DynamicLossScaler(scale=64, window=100, hysteresis=3, min_scale=1)
    s.update(True)
    s.update(True)
    assert s.scale == 64  # two overflows absorbed by hysteresis 3
    s.update(True)
    assert s.scale == 32
    s.update(True)
    assert s.scale == 16  # hysteresis used up: every further overflow halves


def test_minimum_scale_is_a_clear_error():
    s = DynamicLossScaler(scale=4, window=100, hysteresis=1, min_scale=2)
    s.update(True)
    assert s.scale == 2
    with pytest.raises(LossScaleUnderflow, match="precision.min_loss_scale=2"):
        s.update(True)


def test_state_roundtrip():
    s = DynamicLossScaler(scale=64, window=5, hysteresis=2, min_scale=1)
    s.update(True)
    s.update(False)
    t = DynamicLossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
