"""Count the collectives a piece of code issues, per mesh axis: {axis: {op: {"calls", "bytes"}}}.

    with count_collectives(mesh) as counts:
        loss.backward()
    counts.calls("tp", "all_reduce"), counts.bytes("tp")

Two paths reach a process group and both are seen:
- the c10d Python API (`dist.all_reduce`, `broadcast`, `all_gather_into_tensor`, `reduce_scatter_tensor`,
  `all_to_all_single`, `batch_isend_irecv` of the pipeline schedule): wrapped for the duration of the block;
- functional collectives (`torch.ops._c10d_functional.*`, what DTensor's redistribute and its op rules issue):
  seen through a TorchDispatchMode (not `wait_tensor`).
A call is attributed to the mesh axis whose ranks its group spans (by ranks: DTensor may hold its own group
object for an axis, and an axis spanning the whole world may be the default group); anything else is "world"
(a 1-rank group: "single-rank"). "bytes" is the payload one rank hands to the collective (the input tensor), not wire bytes, which
depend on the algorithm (a ring all-reduce moves 2(n-1)/n of it). For batch_isend_irecv every op's tensor is
counted (send and receive sides), under op "p2p".

The dispatch mode costs a Python call per aten op: time code outside this context, count inside it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

_C10D = ("all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single",
         "reduce_scatter_single", "all_to_all_single", "all_gather", "all_gather_object", "reduce_scatter",
         "all_to_all", "broadcast_object_list", "reduce", "gather", "scatter", "barrier", "send", "recv", "isend",
         "irecv")
_OUT_IN = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single", "reduce_scatter_single",
           "all_to_all_single")  # (output, input, ...): the payload is the input
_FUNCTIONAL = ("all_reduce", "all_reduce_coalesced", "all_gather_into_tensor", "all_gather_into_tensor_coalesced",
               "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced", "all_to_all_single", "broadcast")


# one op name whichever API issued it
_OP_NAME = {"all_gather_single": "all_gather_into_tensor", "reduce_scatter_single": "reduce_scatter_tensor"}


class CommCounts:
    """{axis: {op: {"calls": n, "bytes": b}}} with small accessors."""

    def __init__(self):
        self.by_axis: dict[str, dict[str, dict[str, int]]] = defaultdict(
            lambda: defaultdict(lambda: {"calls": 0, "bytes": 0}))
        self.active = True  # False: still installed, not counting (a bench's warm-up)

    def add(self, axis: str, op: str, nbytes: int) -> None:
        if not self.active:
            return
        entry = self.by_axis[axis][op]
        entry["calls"] += 1
        entry["bytes"] += int(nbytes)

    def calls(self, axis: str, op: str | None = None) -> int:
        ops = self.by_axis.get(axis, {})
        return sum(v["calls"] for k, v in ops.items() if op is None or k == op)

    def bytes(self, axis: str, op: str | None = None) -> int:
        ops = self.by_axis.get(axis, {})
        return sum(v["bytes"] for k, v in ops.items() if op is None or k == op)

    def snapshot(self) -> dict[str, int]:
        """Calls per op over every axis, e.g. {"all_reduce": 3}."""
        out: dict[str, int] = defaultdict(int)
        for ops in self.by_axis.values():
            for op, v in ops.items():
                out[op] += v["calls"]
        return dict(out)

    def total(self) -> int:
        return sum(self.snapshot().values())

    def as_dict(self) -> dict:
        return {a: {op: dict(v) for op, v in ops.items()} for a, ops in self.by_axis.items()}


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def _axis_names(mesh) -> dict[tuple[int, ...], str]:
    out: dict[tuple[int, ...], str] = {}
    if mesh is None:
        return out
    names = mesh.mesh_dim_names or tuple(str(i) for i in range(mesh.ndim))
    for i, name in enumerate(names):
        group = mesh.get_group(i) if mesh.mesh_dim_names is None else mesh[name].get_group()
        ranks = tuple(dist.get_process_group_ranks(group))
        if len(ranks) > 1:  # a 1-rank axis moves nothing; its (no-op) collectives stay "single-rank"
            out.setdefault(ranks, name)
    return out


@contextlib.contextmanager
def count_collectives(mesh=None) -> Iterator[CommCounts]:
    """Count the collectives issued inside the block on this rank, attributed to `mesh`'s named axes
    (a DeviceMesh, or None: everything is "world"/"other")."""
    counts = CommCounts()
    axis_of = _axis_names(mesh)

    def axis_for(group) -> str:
        ranks = tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
        return axis_of.get(ranks, "single-rank" if len(ranks) == 1 else "world")

    saved: list[tuple[object, str, object]] = []

    def patch(owner, name, fn):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, fn)

    def wrap(name, orig):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            if group is None:
                group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
            first = args[0] if args else None
            if name in _OUT_IN:  # FSDP2 passes (output=, input=) by keyword
                src = args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_tensor"))
            else:
                src = first if first is not None else kwargs.get("tensor")
            counts.add(axis_for(group), _OP_NAME.get(name, name), _nbytes(src))
            return orig(*args, **kwargs)

        counted.__trellis_counted__ = True
        return counted

    orig_batch = dist.batch_isend_irecv

    def batch(ops):
        for op in ops:
            counts.add(axis_for(op.group), "p2p", _nbytes(op.tensor))
        return orig_batch(ops)

    class Functional(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(issubclass(t, DTensor) for t in types):
                # let DTensor desugar the op first, with this mode still active: the collectives it issues
                # inside an op (loss parallel's cross-entropy, say) are then seen (torch's CommDebugMode does so)
                return NotImplemented
            kwargs = kwargs or {}
            if func.namespace == "_c10d_functional" and func.overloadpacket.__name__ in _FUNCTIONAL and args:
                from torch.distributed.distributed_c10d import _resolve_process_group

                op = func.overloadpacket.__name__
                group_name = args[-1] if isinstance(args[-1], str) else kwargs.get("group_name")
                axis = f"other:{op}"
                if isinstance(group_name, str):
                    axis = axis_for(_resolve_process_group(group_name))
                first = args[0]
                nbytes = sum(_nbytes(t) for t in first) if isinstance(first, (list, tuple)) else _nbytes(first)
                counts.add(axis, op.replace("_coalesced", ""), nbytes)
            return func(*args, **kwargs)

    try:
        # both namespaces (torch.distributed and distributed_c10d: DeepSpeed's comm module calls either), one
        # wrapper per function object, so a call is counted once whichever name it used
        from torch.distributed import distributed_c10d as c10d

        wrapped: dict[int, object] = {}
        for owner in (dist, c10d):
            for name in _C10D:
                fn = getattr(owner, name, None)
                if fn is not None and not getattr(fn, "__trellis_counted__", False):
                    patch(owner, name, wrapped.setdefault(id(fn), wrap(name, fn)))
        patch(dist, "batch_isend_irecv", batch)  # the pipeline schedules call it through the module
        with Functional():
            yield counts
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


__all__ = ["CommCounts", "count_collectives"]
