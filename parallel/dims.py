"""ParallelDims: the degrees of each parallel axis and the one DeviceMesh built from them.

Nothing else in trellis computes ranks or process groups by hand: every group comes from a named
axis of this mesh ("pp", "dp", "cp", "tp"; "tp" innermost so tensor-parallel peers are neighbours, which
on GPUs keeps them inside a node; "cp" (context parallel) next, its all-to-alls the next most frequent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trellis.errors import ConfigError

MESH_AXES = ("pp", "dp", "cp", "tp")


@dataclass
class ParallelDims:
    dp: int
    pp: int
    tp: int
    world_size: int
    cp: int = 1
    _mesh: object = field(default=None, init=False, repr=False)
    _data_mesh: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._resolve_and_validate()

    def _resolve_and_validate(self) -> None:
        for name in MESH_AXES:
            v = getattr(self, name)
            if v == 0 or v < -1:
                raise ConfigError(f"parallel.{name}={v}: must be a positive integer, or -1")
        unknown = [n for n in MESH_AXES if getattr(self, n) == -1]
        if len(unknown) > 1:
            raise ConfigError(f"parallel: only one axis may be -1, got {', '.join(unknown)}")
        known = 1
        for n in MESH_AXES:
            if getattr(self, n) != -1:
                known *= getattr(self, n)
        if unknown:
            if self.world_size % known:
                raise ConfigError(
                    f"parallel.{unknown[0]}=-1: world size {self.world_size} is not divisible by the "
                    f"other axes' product {known}; use a world size that is a multiple of {known}")
            setattr(self, unknown[0], self.world_size // known)
        if self.dp * self.pp * self.cp * self.tp != self.world_size:
            cp = f" x cp ({self.cp})" if self.cp > 1 else ""
            raise ConfigError(
                f"parallel: dp ({self.dp}) x pp ({self.pp}){cp} x tp ({self.tp}) = "
                f"{self.dp * self.pp * self.cp * self.tp} but the world size is {self.world_size}; "
                f"make the product equal the number of ranks, or set one axis to -1")

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def data_size(self) -> int:
        """Ranks that hold the same parameters and see different tokens: dp x cp (gradients are summed, and
        ZeRO shards, over them)."""
        return self.dp * self.cp

    def as_dict(self) -> dict[str, int]:
        return {"dp": self.dp, "pp": self.pp, "cp": self.cp, "tp": self.tp, "world_size": self.world_size}

    def build_mesh(self, device_type: str = "cpu"):
        """The world's DeviceMesh, shape (pp, dp, cp, tp), with named axes. Built once, then cached; with cp > 1
        also the flattened ("dp", "cp") axis "dp_cp" (`data_mesh`)."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(device_type, (self.pp, self.dp, self.cp, self.tp), mesh_dim_names=MESH_AXES)
            self._data_mesh = self._mesh["dp", "cp"]._flatten("dp_cp") if self.cp_enabled else self._mesh["dp"]
        return self._mesh

    @property
    def data_mesh(self):
        """The 1-D mesh gradients are reduced and ZeRO shards over: "dp", or "dp_cp" with context parallel."""
        if self._data_mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() has not been called")
        return self._data_mesh

    @property
    def mesh(self):
        if self._mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() has not been called")
        return self._mesh

    def coordinate(self) -> dict[str, int]:
        """This rank's coordinate on each axis, e.g. {"pp": 0, "dp": 1, "cp": 0, "tp": 0}."""
        return {n: self.mesh.get_local_rank(n) for n in MESH_AXES}


def model_split_errors(tp: int, pp: int, *, num_heads: int, num_kv_heads: int, num_layers: int,
                       vocab_size: int, intermediate_size: int, cp: int = 1) -> list[str]:
    """How the model's shapes constrain tp and pp (the one home of these rules: the engine checks them before
    training, the estimator and planner with the same words before they size or propose a layout)."""
    e: list[str] = []

    def divisors(n: int) -> str:
        return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)

    if tp > 1:
        if num_heads % tp:
            e.append(f"parallel.tp={tp} does not divide num_attention_heads={num_heads}; use one of {divisors(num_heads)}")
        if num_kv_heads % tp:
            e.append(f"parallel.tp={tp} does not divide num_key_value_heads={num_kv_heads}; use one of "
                     f"{divisors(num_kv_heads)} (kv heads are sharded, not replicated)")
        if intermediate_size % tp:
            e.append(f"parallel.tp={tp} does not divide the MLP size {intermediate_size}; use one of {divisors(intermediate_size)}")
        if vocab_size % tp:
            e.append(f"parallel.tp={tp} does not divide vocab_size={vocab_size}; pad the vocabulary to a multiple of {tp}")
    # (kv heads need not divide cp: they are replicated to the query heads for the all-to-all,
    # parallel/context_parallel.py)
    if cp > 1 and num_heads % (cp * tp):
        ok = divisors(num_heads // tp) if num_heads % tp == 0 else "1"
        e.append(f"parallel.cp={cp}: the all-to-all over heads needs num_attention_heads={num_heads} divisible by "
                 f"cp x tp = {cp * tp}; use parallel.cp in {ok}")
    if pp > num_layers:
        e.append(f"parallel.pp={pp} is more than the model's {num_layers} layers; use at most {num_layers}")
    return e


def validate_model_dims(dims: ParallelDims, *, num_heads: int, num_kv_heads: int, num_layers: int,
                        vocab_size: int, intermediate_size: int, micro_batches: int,
                        pp_schedule: str = "1f1b") -> None:
    """Model-dependent layout rules (the one home of each), checked before any training step; all problems
    in one error."""
    tp, pp = dims.tp, dims.pp
    e = model_split_errors(tp, pp, num_heads=num_heads, num_kv_heads=num_kv_heads, num_layers=num_layers,
                           vocab_size=vocab_size, intermediate_size=intermediate_size, cp=dims.cp)
    if pp > 1 and micro_batches < pp:
        e.append(f"train.grad_accum={micro_batches}: pipeline parallel needs >= parallel.pp={pp} micro-batches")
    if pp > 1 and pp_schedule in ("interleaved_1f1b", "interleaved_zb") and (num_layers < 2 * pp or micro_batches % pp):
        # two virtual stages per rank (rank and rank + pp), fed round-robin
        e.append(f"parallel.pp_schedule={pp_schedule!r} needs >= {2 * pp} layers (model has {num_layers}) "
                 f"and micro-batches (train.grad_accum={micro_batches}) divisible by parallel.pp={pp}; "
                 "use '1f1b' otherwise")
    if pp > 1 and pp_schedule in ("zbv", "dualpipev") and num_layers < 2 * pp:
        # two virtual stages per rank, V placement (stages r and 2pp - 1 - r)
        e.append(f"parallel.pp_schedule={pp_schedule!r} needs >= {2 * pp} layers for its {2 * pp} stages (model "
                 f"has {num_layers}); use '1f1b' or fewer pipeline ranks")
    if pp > 1 and pp_schedule == "dualpipev" and micro_batches < 2 * pp:
        e.append(f"parallel.pp_schedule='dualpipev' needs >= {2 * pp} micro-batches (one per stage; got "
                 f"train.grad_accum={micro_batches}); raise train.grad_accum or use 'zbv'")
    if e:
        raise ConfigError(e)

