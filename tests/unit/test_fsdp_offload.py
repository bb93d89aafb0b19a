"""zero.pin_memory reaches the native backend's FSDP2 CPU offload (issue 14: it was hard-coded off), and on
a machine without an accelerator, where torch cannot pin, it is a ConfigError naming the key. No processes:
fully_shard is recorded, not run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trellis.errors import ConfigError
from trellis.parallel import data_parallel


class _Unit(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def set_gradient_divide_factor(self, f):
        pass

    def set_force_sum_reduction_for_comms(self, v):
        pass


def _record(monkeypatch, accelerator: bool) -> list:
    import torch.distributed.fsdp as fsdp

    seen = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda m, **kw: seen.append(kw["offload_policy"]))
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: accelerator)
    return seen


@pytest.mark.parametrize("pin", [True, False])
def test_pin_memory_reaches_the_cpu_offload_policy(monkeypatch, pin):
    from torch.distributed.fsdp import CPUOffloadPolicy

    seen = _record(monkeypatch, accelerator=True)
    root, block = _Unit(), _Unit()
    data_parallel.apply_fsdp(root, [block], None, stage=3, compute_dtype=torch.float32, cpu_offload=True,
                             pin_memory=pin)
    assert len(seen) == 2 and all(isinstance(p, CPUOffloadPolicy) and p.pin_memory is pin for p in seen)


def test_pin_memory_without_an_accelerator_is_a_config_error(monkeypatch):
    _record(monkeypatch, accelerator=False)
    with pytest.raises(ConfigError, match="zero.pin_memory=true .* set zero.pin_memory=false"):
        data_parallel.apply_fsdp(_Unit(), [_Unit()], None, stage=3, compute_dtype=torch.float32, cpu_offload=True,
                                 pin_memory=True)
    # without offload nothing is pinned: no error
    data_parallel.apply_fsdp(_Unit(), [_Unit()], None, stage=3, compute_dtype=torch.float32, cpu_offload=False,
                             pin_memory=True)


def test_parallelize_passes_zero_pin_memory():
    """The config key is what parallelize() hands to apply_fsdp (read in the source: no process group here)."""
    import inspect

    from trellis.parallel import parallelize

    src = inspect.getsource(parallelize.parallelize)
    assert "pin_memory=z.pin_memory" in src
