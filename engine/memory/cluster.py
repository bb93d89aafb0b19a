"""A cluster profile: what one rank of the user's machines achieves, the costs `trellis plan` ranks layouts with.

Pure data and arithmetic (no torch): `trellis plan --calibrate` (engine/plan/calibrate.py) measures a profile and
writes it as JSON; `trellis plan --cluster FILE` loads it; without one, `default_profile(device)` gives
datasheet figures × a documented achievable fraction (DEVICE_DEFAULTS, sources beside each number).

The JSON (docs/PLANNER.md), version 1:
  {"version": 1, "device": "cpu", "source": "measured ...", "ranks_per_node": 4,
   "matmul_flops": {"fp32": F, "bf16": F},                  achieved FLOP/s of one rank (all ranks busy at once)
   "collectives": {op: {"<group size>": {"alpha_s": a, "beta_s_per_byte": b}}},   intra-node, t = a + b·bytes
   "inter_node": {op: {...}},                                optional: groups that span nodes
   "host_device_bytes_per_s": B, "nvme_bytes_per_s": B,      0 = not relevant (a CPU: host memory is device memory)
   "overhead_s": {"layer": t, "tp_layer": t, "step": t,     engine time no FLOP count explains (see below)
                  "elem_layer": t, "ckpt_layer": t, "fsdp_unit": t, "optimizer_param": t}}
op is one of OPS; "bytes" is the payload one rank hands to the collective (what parallel/comm_count.py counts),
so beta folds in the algorithm's wire factor (a ring all-reduce sends 2(n-1)/n of it).
overhead_s: "layer" is the time one decoder layer's forward + backward of one micro-batch costs beyond its
FLOPs (Python and kernel dispatch); "tp_layer" the same for a tensor-parallel layer (the engine's TP path:
DTensor dispatch, sharded kernels), collectives excluded; "step" the per-step fixed cost (optimizer, clipping,
the step's scalar reductions). "elem_layer" is seconds per activation element (token x hidden / tp) per layer
forward + backward beyond the matmul FLOPs (norms, activations, rotary, softmax: what the matmul FLOP/s does not
cover); "ckpt_layer" what full activation checkpointing adds per layer per micro-batch beyond its recomputed
FLOPs (selective: half of it); "fsdp_unit" the cost of one FSDP2 all-gather or reduce-scatter call beyond its
priced payload (hooks, copy-in/out); "optimizer_param" seconds per parameter of the optimizer step (AdamW is
memory-bound: it grows with the parameters a rank updates, 1/(dp x cp) of them under ZeRO). On a GPU these are small next to the FLOPs; on a CPU with a tiny model they
are most of the step. Missing keys read as 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from trellis.errors import ConfigError

VERSION = 1
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
OVERHEAD_KEYS = ("layer", "tp_layer", "step", "elem_layer", "ckpt_layer", "fsdp_unit", "optimizer_param")


@dataclass(frozen=True)
class AlphaBeta:
    """t(bytes) = alpha + beta · bytes: a latency per call and a time per payload byte."""

    alpha: float
    beta: float

    def time(self, nbytes: float, calls: int = 1) -> float:
        return calls * self.alpha + nbytes * self.beta

    def as_dict(self) -> dict:
        return {"alpha_s": self.alpha, "beta_s_per_byte": self.beta}


def fit_alpha_beta(sizes: list[float], times: list[float]) -> AlphaBeta:
    """Least-squares line through (bytes, seconds). Needs ≥ 3 timings over ≥ 2 distinct sizes (two points
    fit any line exactly, so a bad timing would pass unnoticed). A negative intercept or slope (noise on
    a flat curve) is clamped to 0 and the other refitted, so costs are never negative."""
    if len(sizes) != len(times):
        raise ValueError(f"alpha-beta fit: {len(sizes)} sizes but {len(times)} timings")
    if len(sizes) < 3 or len(set(sizes)) < 2:
        raise ValueError(f"alpha-beta fit: needs at least 3 timings over at least 2 message sizes, got "
                         f"{len(sizes)} timing(s) over {len(set(sizes))} size(s)")
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(times) / n
    sxx = sum((x - mx) ** 2 for x in sizes)
    beta = sum((x - mx) * (y - my) for x, y in zip(sizes, times)) / sxx
    alpha = my - beta * mx
    if beta < 0:
        return AlphaBeta(max(my, 0.0), 0.0)
    if alpha < 0:
        return AlphaBeta(0.0, max(sum(x * y for x, y in zip(sizes, times)) / sum(x * x for x in sizes), 0.0))
    return AlphaBeta(alpha, beta)


def _ring_factor(op: str, n: int) -> float:
    """Wire bytes per payload byte of the bandwidth-optimal algorithm on n ranks (payload = one rank's
    input): all-reduce 2(n-1)/n; all-gather (n-1) (its input is one shard); reduce-scatter and all-to-all
    (n-1)/n; a send/recv 1."""
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op == "all_gather":
        return float(n - 1)
    if op in ("reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0


@dataclass(frozen=True)
class ClusterProfile:
    device: str
    source: str
    matmul_flops: dict[str, float]
    collectives: dict[str, dict[int, AlphaBeta]]
    inter_node: dict[str, dict[int, AlphaBeta]] = field(default_factory=dict)
    ranks_per_node: int = 8
    host_device_bytes_per_s: float = 0.0
    nvme_bytes_per_s: float = 0.0
    overhead_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(OVERHEAD_KEYS, 0.0))

    def overhead(self, key: str) -> float:
        return self.overhead_s.get(key, 0.0)

    def flops(self, precision: str) -> float:
        """Achieved matmul FLOP/s of one rank in `precision` (fp16 falls back to bf16's figure)."""
        for key in (precision, "bf16" if precision == "fp16" else precision, "fp32"):
            if key in self.matmul_flops:
                return self.matmul_flops[key]
        raise ConfigError(f"cluster profile ({self.source}): no matmul_flops for {precision}")

    def comm(self, op: str, group: int, nbytes: float, calls: int = 1) -> float:
        """Seconds for `calls` collectives `op` over a group of `group` ranks moving `nbytes` payload in all.
        A group size the profile lacks is scaled from the nearest one it has by the ring algorithm's
        latency steps (n-1) and wire factor; a group spanning nodes uses `inter_node` when given."""
        if group <= 1 or calls == 0:
            return 0.0
        table = self.inter_node if group > self.ranks_per_node and self.inter_node else self.collectives
        fits = table.get(op) or self.collectives.get(op)
        if not fits:
            raise ConfigError(f"cluster profile ({self.source}): no timings for collectives.{op}")
        if group in fits:
            return fits[group].time(nbytes, calls)
        near = min(fits, key=lambda g: (abs(math.log(g / group)), -g))
        ab = fits[near]
        steps = (group - 1) / (near - 1) if op != "send_recv" else 1.0
        wire = _ring_factor(op, group) / _ring_factor(op, near)
        return calls * ab.alpha * steps + nbytes * ab.beta * wire

    def as_dict(self) -> dict:
        out = {"version": VERSION, "device": self.device, "source": self.source, "ranks_per_node": self.ranks_per_node,
               "matmul_flops": dict(self.matmul_flops),
               "collectives": {op: {str(g): ab.as_dict() for g, ab in sorted(fits.items())}
                               for op, fits in self.collectives.items()},
               "host_device_bytes_per_s": self.host_device_bytes_per_s, "nvme_bytes_per_s": self.nvme_bytes_per_s,
               "overhead_s": dict(self.overhead_s)}
        if self.inter_node:
            out["inter_node"] = {op: {str(g): ab.as_dict() for g, ab in sorted(fits.items())}
                                 for op, fits in self.inter_node.items()}
        return out


# ---- built-in defaults ---------------------------------------------------------------------------------------
# Peak figures from the vendors' datasheets (dense bf16 tensor-core TFLOP/s as parallel/flops.py's PEAK_TFLOPS;
# NVLink / PCIe / InfiniBand bandwidths per GPU, one direction) times an achievable fraction, stated here:
#   matmul: 0.60 of dense peak (large-GEMM training MFU reported by Megatron-LM and torchtitan on H100 is 0.4-0.6
#           end to end; the GEMMs themselves reach ~0.7: 0.6 leaves room for the non-GEMM kernels)
#   NVLink all-reduce bus bandwidth: 0.80 of the per-direction NVLink figure (nccl-tests' busbw on DGX
#           systems); latency 10 µs per call intra-node, 25 µs across nodes (nccl-tests small-message times)
#   network: one 400 Gb/s (H100/H200/B200; ConnectX-7 NDR) or 200 Gb/s (A100; HDR) NIC per GPU at 0.80
#   PCIe host↔device: 0.80 of the link (Gen5 x16 64 GB/s, Gen4 x16 32 GB/s); NVMe: 5 GB/s per node
#           (one Gen4 drive's sequential read; DeepSpeed ZeRO-Infinity's docs size by this)
#   overheads: 30 µs per layer per micro-batch (a few dozen kernel launches), 60 µs with TP, 5 ms per step
# "cpu": a 2-core-class development machine measured once by `trellis plan --calibrate` (docs/PLANNER.md);
#   calibrate your own: CPU figures vary by 10x between machines.
_GPU = {  # name: (bf16 TFLOP/s, fp32 TFLOP/s, NVLink GB/s per direction, NIC GB/s, PCIe GB/s)
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989.5 bf16 dense, 67 fp32, NVLink 900 GB/s (450 per direction)
    "H100": (989.5, 67.0, 450.0, 50.0, 64.0),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): same compute as H100 SXM, NVLink 900 GB/s
    "H200": (989.5, 67.0, 450.0, 50.0, 64.0),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80 GB): 312 bf16 dense, 19.5 fp32, NVLink 600 GB/s
    "A100": (312.0, 19.5, 300.0, 25.0, 32.0),
    # NVIDIA DGX B200 datasheet (per GPU: 72 PFLOPS fp8 training / 8 → 2.25 bf16 dense), NVLink 5 1.8 TB/s
    "B200": (2250.0, 75.0, 900.0, 50.0, 64.0),
}
MATMUL_FRACTION, NVLINK_FRACTION, NET_FRACTION, PCIE_FRACTION = 0.60, 0.80, 0.80, 0.80
NVME_BYTES_PER_S = 5e9
_CPU = {"matmul_flops": {"fp32": 2.0e10, "bf16": 4.0e9},  # placeholder scale of a 2-core VM; calibrate
        "alpha_s": 2e-4, "bytes_per_s": 1.0e9, "overhead_s": {"layer": 2e-3, "tp_layer": 2e-2, "step": 2e-2}}


def _links(alpha: float, bus_bytes_per_s: float, sizes: tuple[int, ...]) -> dict[str, dict[int, AlphaBeta]]:
    """A bus bandwidth and a latency as per-op alpha-beta fits (beta = wire factor / bus bandwidth)."""
    return {op: {n: AlphaBeta(alpha, _ring_factor(op, n) / bus_bytes_per_s) for n in sizes} for op in OPS}


def default_profile(device: str = "H100", ranks_per_node: int = 8) -> ClusterProfile:
    """The built-in profile of `device` (H100, H200, A100, B200 or cpu); see the constants above."""
    key = device.upper() if device.lower() != "cpu" else "cpu"
    if key == "cpu":
        c = _CPU
        return ClusterProfile("cpu", "built-in cpu defaults (calibrate: trellis plan --calibrate)",
                              dict(c["matmul_flops"]), _links(c["alpha_s"], c["bytes_per_s"], (2, 4, 8)),
                              ranks_per_node=ranks_per_node, overhead_s={**dict.fromkeys(OVERHEAD_KEYS, 0.0), **c["overhead_s"]})
    if key not in _GPU:
        raise ConfigError(f"--device={device!r}: built-in profiles exist for {', '.join(_GPU)} and cpu; "
                          "for anything else measure one with `trellis plan --calibrate --out cluster.json`")
    bf16, fp32, nvlink, nic, pcie = _GPU[key]
    sizes = tuple(2 ** k for k in range(1, 14))
    return ClusterProfile(
        key, f"built-in {key} defaults (datasheet peaks x achievable fractions, engine/memory/cluster.py)",
        {"bf16": bf16 * 1e12 * MATMUL_FRACTION, "fp16": bf16 * 1e12 * MATMUL_FRACTION,
         "fp32": fp32 * 1e12 * MATMUL_FRACTION},
        _links(10e-6, nvlink * 1e9 * NVLINK_FRACTION, sizes), _links(25e-6, nic * 1e9 * NET_FRACTION, sizes),
        ranks_per_node=ranks_per_node, host_device_bytes_per_s=pcie * 1e9 * PCIE_FRACTION,
        nvme_bytes_per_s=NVME_BYTES_PER_S, overhead_s={**dict.fromkeys(OVERHEAD_KEYS, 0.0), "layer": 30e-6, "tp_layer": 60e-6, "step": 5e-3})


# ---- the JSON file ---------------------------------------------------------------------------------------------
def _number(path: str, key: str, v, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        need = "a positive number" if positive else "a number >= 0"
        raise ConfigError(f"{path}: {key} = {v!r}: must be {need} (re-measure with `trellis plan --calibrate`)")
    return float(v)


def _fits(path: str, key: str, table) -> dict[str, dict[int, AlphaBeta]]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {key} must be an object {{op: {{group size: {{alpha_s, beta_s_per_byte}}}}}}")
    out: dict[str, dict[int, AlphaBeta]] = {}
    for op, fits in table.items():
        if op not in OPS:
            raise ConfigError(f"{path}: {key}.{op}: unknown collective; use {', '.join(OPS)}")
        if not isinstance(fits, dict) or not fits:
            raise ConfigError(f"{path}: {key}.{op} must map group sizes to {{alpha_s, beta_s_per_byte}}")
        out[op] = {}
        for g, ab in fits.items():
            if not str(g).isdigit() or int(g) < 2:
                raise ConfigError(f"{path}: {key}.{op}.{g}: a group size must be an integer >= 2")
            if not isinstance(ab, dict) or set(ab) != {"alpha_s", "beta_s_per_byte"}:
                raise ConfigError(f"{path}: {key}.{op}.{g} must be {{\"alpha_s\": .., \"beta_s_per_byte\": ..}}")
            out[op][int(g)] = AlphaBeta(_number(path, f"{key}.{op}.{g}.alpha_s", ab["alpha_s"]),
                                        _number(path, f"{key}.{op}.{g}.beta_s_per_byte", ab["beta_s_per_byte"]))
    return out


_KEYS = {"version", "device", "source", "ranks_per_node", "matmul_flops", "collectives", "inter_node",
         "host_device_bytes_per_s", "nvme_bytes_per_s", "overhead_s"}


def profile_from_dict(raw, path: str = "cluster profile") -> ClusterProfile:
    """A ClusterProfile from its JSON object; a ConfigError naming `path` and the key for anything wrong."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a JSON object (write one with `trellis plan --calibrate --out {path}`)")
    if raw.get("version") != VERSION:
        raise ConfigError(f"{path}: version = {raw.get('version')!r}: this trellis reads version {VERSION}; "
                          "re-measure with `trellis plan --calibrate`")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(_KEYS))}")
    for key in ("matmul_flops", "collectives"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r} (re-measure with `trellis plan --calibrate`)")
    flops = raw["matmul_flops"]
    if not isinstance(flops, dict) or not flops:
        raise ConfigError(f"{path}: matmul_flops must be an object {{dtype: FLOP/s}}, e.g. {{\"bf16\": 5e14}}")
    overhead = raw.get("overhead_s", {})
    if not isinstance(overhead, dict) or set(overhead) - set(OVERHEAD_KEYS):
        raise ConfigError(f"{path}: overhead_s must be an object with keys {', '.join(OVERHEAD_KEYS)}")
    rpn = raw.get("ranks_per_node", 8)
    if isinstance(rpn, bool) or not isinstance(rpn, int) or rpn < 1:
        raise ConfigError(f"{path}: ranks_per_node = {rpn!r}: must be an integer >= 1")
    return ClusterProfile(
        device=str(raw.get("device", "unknown")), source=str(raw.get("source", path)),
        matmul_flops={k: _number(path, f"matmul_flops.{k}", v, positive=True) for k, v in flops.items()},
        collectives=_fits(path, "collectives", raw["collectives"]),
        inter_node=_fits(path, "inter_node", raw["inter_node"]) if "inter_node" in raw else {},
        ranks_per_node=rpn,
        host_device_bytes_per_s=_number(path, "host_device_bytes_per_s", raw.get("host_device_bytes_per_s", 0.0)),
        nvme_bytes_per_s=_number(path, "nvme_bytes_per_s", raw.get("nvme_bytes_per_s", 0.0)),
        overhead_s={k: _number(path, f"overhead_s.{k}", overhead.get(k, 0.0)) for k in OVERHEAD_KEYS})


def load_profile(path: str | Path) -> ClusterProfile:
    """Read a cluster JSON (`trellis plan --cluster FILE`)."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--cluster={path}: no such file; write one with `trellis plan --calibrate --out {path}`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--cluster={path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--cluster={path}: not JSON (line {e.lineno}: {e.msg})") from None
    return profile_from_dict(raw, str(path))


def save_profile(profile: ClusterProfile, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(profile.as_dict(), indent=1) + "\n")
    tmp.replace(p)
