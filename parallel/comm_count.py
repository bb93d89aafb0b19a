"""Counting torch.distributed collectives: how many calls (and tensor bytes) of each kind a piece of code makes.

`CollectiveCounter` replaces the eager collectives of `torch.distributed` (the names in `COLLECTIVES`, in both
`torch.distributed` and `torch.distributed.distributed_c10d`) with counting wrappers while it is installed, and
puts the originals back on exit. Every caller that looks the function up at call time is counted: trellis
(`dist.all_reduce(...)`), DeepSpeed's `deepspeed.comm` (its TorchBackend calls `torch.distributed.<op>`), torch's
DDP/FSDP helpers written in Python. Not counted: functional collectives (`torch.ops._c10d_functional`, what
DTensor issues) and C++-internal ones (DDP's reducer buckets).

    with CollectiveCounter() as cc:
        ...                      # cc.counts: {"all_reduce": 3, ...}; cc.bytes: tensor bytes per kind
        cc.active = False        # pause counting (still installed)

Used by the benches (bench/deepspeed_overhead.py --count) and the planner; not on any training path.
"""

from __future__ import annotations

import functools
from collections import Counter

import torch

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list",
               "reduce", "gather", "scatter", "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv")


def _tensor_bytes(args, kwargs) -> int:
    n = 0
    for a in (*args, *kwargs.values()):
        if torch.is_tensor(a):
            n += a.numel() * a.element_size()
        elif isinstance(a, (list, tuple)):
            n += sum(t.numel() * t.element_size() for t in a if torch.is_tensor(t))
    return n


class CollectiveCounter:
    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.active = True
        self._saved: list[tuple[object, str, object]] = []

    def total(self) -> int:
        return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def _wrap(self, name: str, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.active:
                self.counts[name] += 1
                self.bytes[name] += _tensor_bytes(args, kwargs)
            return fn(*args, **kwargs)

        counted.__trellis_counted__ = True
        return counted

    def __enter__(self) -> CollectiveCounter:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        wrapped: dict[int, object] = {}
        for mod in (dist, c10d):
            for name in COLLECTIVES:
                fn = getattr(mod, name, None)
                if fn is None or getattr(fn, "__trellis_counted__", False):
                    continue
                # the same function object in both namespaces gets one wrapper (counted once per call)
                new = wrapped.setdefault(id(fn), self._wrap(name, fn))
                self._saved.append((mod, name, fn))
                setattr(mod, name, new)
        return self

    def __exit__(self, *exc) -> None:
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)
        self._saved.clear()
