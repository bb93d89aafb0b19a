"""Per rank, the parameter bytes held equal the expected share for pipeline, tensor and 3D layouts, ZeRO 0-3.

MEASURED: after one training step, every live parameter of the rank's module (DTensor -> its local shard),
numel x element size, per FQN; also cross-checked against the backend's memory_report()['params'].
EXPECTED: derived here from the 1-process HF model's named_parameters (no trellis code) and the documented
layout rules:
- mesh (pp, dp, tp), tp innermost: rank = (pp_idx * dp + dp_idx) * tp + tp_idx;
- pipeline "even" split: stage s holds layers [s*L/pp, (s+1)*L/pp) (remainder to the first stages), stage 0
  also the embedding, the last stage the final norm and lm_head;
- Llama TP plan: q/k/v/gate/up column-parallel (weight rows split), o/down row-parallel (weight columns
  split), vocab-parallel embedding and lm_head (vocab rows split), norms replicated;
- ZeRO-0/1 keep the whole (pp/tp-local) parameter on every dp rank; ZeRO-2/3 (FSDP2 fully_shard) keep
  dp-chunk `dp_idx` of dim 0 of it: torch.chunk sizes, ceil(n/dp) rows, the last chunk(s) smaller or empty.
The per-FQN comparison is exact: it needs no tolerance for uneven padding because the chunk rule is exact.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from .harness import run_ranks
from .workers import train_scenarios

pytestmark = pytest.mark.distributed

MODEL_DIR = Path(__file__).resolve().parents[2] / "configs" / "models" / "tiny-llama"
ONE_STEP = {"train.steps": 1, "train.micro_batch_size": 1, "train.grad_accum": 2, "train.schedule": "constant",
            "train.warmup_steps": 0, "data.seq_len": 32, "logging.progress": "none"}


def _layout(dp=1, pp=1, tp=1, zero=0) -> dict:
    return {"parallel.dp": dp, "parallel.pp": pp, "parallel.tp": tp, "zero.stage": zero}


GROUPS = {
    2: {"pp2 z0": _layout(pp=2)},
    4: {**{f"dp2·pp2 z{z}": _layout(dp=2, pp=2, zero=z) for z in range(4)},
        "pp2·tp2 z0": _layout(pp=2, tp=2),
        **{f"dp2·tp2 z{z}": _layout(dp=2, tp=2, zero=z) for z in range(4)}},
    8: {f"dp2·pp2·tp2 z{z}": _layout(dp=2, pp=2, tp=2, zero=z) for z in (1, 3)},
}

# ---- the expected share: HF model + the documented rules only -----------------------------------------

COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


def _hf_params() -> tuple[dict[str, tuple[tuple[int, ...], int]], int]:
    """FQN -> (shape, element size) of the unsharded model, and its number of decoder layers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(MODEL_DIR))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return ({n: (tuple(p.shape), p.element_size()) for n, p in model.named_parameters()},
            config.num_hidden_layers)


def _chunk(n: int, parts: int, i: int) -> int:
    """Size of torch.chunk(range(n), parts)[i] (0 when that chunk does not exist)."""
    c = math.ceil(n / parts)
    return max(0, min(c, n - i * c))


def _stage_of(name: str, num_layers: int, pp: int) -> int:
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        base, rem = divmod(num_layers, pp)
        bounds = [0]
        for s in range(pp):
            bounds.append(bounds[-1] + base + (1 if s < rem else 0))
        return next(s for s in range(pp) if bounds[s] <= layer < bounds[s + 1])
    if name.startswith("model.embed_tokens."):
        return 0
    if name.startswith(("model.norm.", "lm_head.")):
        return pp - 1
    raise AssertionError(f"no stage rule for {name}")


def _tp_dim(name: str) -> int | None:
    if name.startswith(("model.embed_tokens.", "lm_head.")):
        return 0  # vocab-parallel
    if any(f".{m}.weight" in name for m in COLWISE):
        return 0  # out features
    if any(f".{m}.weight" in name for m in ROWWISE):
        return 1  # in features
    assert "norm" in name, f"no TP rule for {name}"
    return None  # replicated


def expected_bytes(hf, num_layers: int, rank: int, lay: dict) -> dict[str, int]:
    dp, pp, tp, zero = (lay["parallel.dp"], lay["parallel.pp"], lay["parallel.tp"], lay["zero.stage"])
    p_idx, rest = divmod(rank, dp * tp)
    d_idx, t_idx = divmod(rest, tp)
    out = {}
    for name, (shape, esize) in hf.items():
        if pp > 1 and _stage_of(name, num_layers, pp) != p_idx:
            continue
        shape = list(shape)
        dim = _tp_dim(name)
        if tp > 1 and dim is not None:
            shape[dim] = _chunk(shape[dim], tp, t_idx)
        if zero >= 2 and dp > 1:
            shape[0] = _chunk(shape[0], dp, d_idx)
        out[name] = math.prod(shape) * esize
    return out


# ---- the measurement (inside the ranks) ------------------------------------------------------------------

_trainers: list = []


def _keep(trainer, rank) -> None:
    _trainers.append(trainer)


def measure_shares(rank: int, world: int, scenarios: list[dict]) -> list[dict]:
    """train_scenarios with a hook that keeps each Trainer; then every live parameter's local bytes."""
    from torch.distributed.tensor import DTensor

    _trainers.clear()
    results = train_scenarios(rank, world, [{**sc, "hook": _keep} for sc in scenarios])
    out = []
    for trainer, res in zip(_trainers, results):
        held = {}
        for name, p in trainer.backend.module.named_parameters():
            t = p.to_local() if isinstance(p, DTensor) else p
            held[name] = t.numel() * t.element_size()
        out.append({"held": held, "report_params": res["memory"]["params"]})
    return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    d = tmp_path_factory.mktemp("shares")
    out = {}
    for world, cases in GROUPS.items():
        scenarios = [{"overrides": {**ONE_STEP, **lay, "logging.metrics_file": str(d / f"{world}-{i}.jsonl")}}
                     for i, lay in enumerate(cases.values())]
        per_rank = run_ranks(world, measure_shares, scenarios, timeout=400)
        for i, name in enumerate(cases):
            out[name] = [per_rank[r][i] for r in range(world)]
    return out


CASES = [(name, world, lay) for world, cases in GROUPS.items() for name, lay in cases.items()]


@pytest.mark.parametrize("name,world,lay", CASES, ids=[c[0] for c in CASES])
def test_per_rank_param_bytes_are_the_expected_share(measured, name, world, lay):
    hf, num_layers = _hf_params()
    full = sum(math.prod(s) * e for s, e in hf.values())
    bad = []
    for rank, got in enumerate(measured[name]):
        want = expected_bytes(hf, num_layers, rank, lay)
        total_got, total_want = sum(got["held"].values()), sum(want.values())
        print(f"{name} rank {rank}: measured {total_got} B (memory_report {got['report_params']} B), "
              f"expected {total_want} B = {total_want / full:.4f} of the model's {full} B")
        if got["held"] != want:
            diff = sorted(set(got["held"]) ^ set(want)) + sorted(
                k for k in set(got["held"]) & set(want) if got["held"][k] != want[k])
            bad.append(f"rank {rank}: {[(k, got['held'].get(k), want.get(k)) for k in diff[:6]]}")
        if got["report_params"] != total_want:
            bad.append(f"rank {rank}: memory_report params {got['report_params']} != expected {total_want}")
    assert not bad, "\n".join(bad)
    # every parameter element is held somewhere: the dp/tp/pp shares cover the model (norms once per tp rank)
    dp, tp = lay["parallel.dp"], lay["parallel.tp"]
    replicas = dp if lay["zero.stage"] < 2 else 1
    norm = sum(math.prod(s) * e for n, (s, e) in hf.items() if _tp_dim(n) is None)
    held = sum(sum(r["held"].values()) for r in measured[name])
    assert held == replicas * (full + (tp - 1) * norm), (held, full, norm)
