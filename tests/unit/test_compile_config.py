"""train.compile's config rules: the combinations that cannot run compiled are refused by name."""

from __future__ import annotations

import pytest

from trellis import configs
from trellis.configs.validate import compile_errors
from trellis.errors import ConfigError


def test_compile_with_deepspeed_is_refused():
    with pytest.raises(ConfigError) as e:
        configs.load("tiny-llama", {"train.compile": True, "zero.backend": "deepspeed"})
    assert any("train.compile=true" in m and "zero.backend='deepspeed'" in m for m in e.value.messages)
    assert configs.load("tiny-llama", {"train.compile": True}).train.compile is True


@pytest.mark.parametrize("schedule", ["zbv", "interleaved_zb", "dualpipev"])
def test_compile_with_zero_bubble_schedules_is_refused(schedule):
    cfg = configs.load("tiny-llama", {"train.compile": True, "parallel.pp": 2, "train.grad_accum": 2})
    assert compile_errors(cfg) == []  # 1F1B compiles
    cfg.parallel.pp_schedule = schedule  # the names another change adds to the schema's Literal
    (msg,) = compile_errors(cfg)
    assert "train.compile=true" in msg and "parallel.pp_schedule" in msg and "zero-bubble" in msg
    cfg.train.compile = False
    assert compile_errors(cfg) == []


def test_compile_with_tensor_parallel_is_refused():
    with pytest.raises(ConfigError) as e:
        configs.load("tiny-llama", {"train.compile": True, "parallel.tp": 2})
    assert any("train.compile=true needs parallel.tp=1" in m for m in e.value.messages)
