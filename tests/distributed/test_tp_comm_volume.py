"""Tensor parallel moves Megatron-LM's collective volume, counted on a real tp2 run.

The package's comm-counting mode (parallel/comm_count.py) counts every collective of one forward and,
separately, of its backward on the "tp" axis of a real 2-rank gloo mesh, for tiny models of several families
(q/k/v Linears, GPT-2's unfused c_attn, NeoX's fused head-major QKV). The expected figures are Megatron's,
written out here from the layer structure: per decoder layer one all-reduce of the hidden states (b x s x h
floats) after the attention output and one after the MLP output forward, and one of the attention input's and
one of the MLP input's gradient backward; plus the vocab-parallel embedding's forward all-reduce and the
column-parallel head's input-gradient all-reduce, and the vocab-parallel cross-entropy's three all-reduces of
b x s floats (max, sum of exponentials, target logit: Megatron's vocab_parallel_cross_entropy does the same
three). With sequence parallel each of the four per-layer all-reduces becomes an all-gather of the sequence
slice (b x s/tp x h handed in) and a reduce-scatter of the full hidden states, forward and backward; trellis
adds one all-gather per layer at the block boundary (forward: the block's output, backward: its input's
gradient), because the residual stream is replicated between blocks (parallel/tensor_parallel.py says why),
and the sequence-parallel norms' weight gradients are all-reduced (h floats each).
Before the local-shard linears, DTensor's styles all-reduced every column-parallel linear's input gradient on
its own (Llama 5, GPT-2 4, NeoX 2 per layer in backward): this test failed there.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch

from .harness import run_ranks
from .test_tensor_parallel import BATCH, HIDDEN, LAYERS, SEQ, _batch, tiny_model

pytestmark = pytest.mark.distributed

FLOAT = 4
ACT = BATCH * SEQ * HIDDEN * FLOAT  # one micro-batch's hidden states, fp32
CE = 3 * BATCH * SEQ * FLOAT        # the vocab-parallel cross-entropy's three all-reduces
NORMS = 2                           # sequence-parallel norms per Llama layer (input, post-attention)
LORA_R = 4


def _count_case(family: str, sp: bool, mesh, lora: bool = False) -> dict:
    from trellis.parallel.comm_count import count_collectives
    from trellis.parallel.hf_surgery import prepare_model
    from trellis.parallel.loss import causal_lm_loss_sum, loss_parallel_context
    from trellis.parallel.models import family_for
    from trellis.parallel.tensor_parallel import apply_tensor_parallel

    spec = family_for(family)
    model = copy.deepcopy(tiny_model(family))
    prepare_model(model, spec)
    if lora:
        from trellis import configs
        from trellis.engine.peft.inject import make_injector

        make_injector(configs.load("tiny-llama", {"peft.method": "lora", "peft.r": LORA_R}))(model, spec)
    apply_tensor_parallel(model, mesh["tp"], spec, sequence_parallel=sp)
    ids, labels = _batch(0)
    with loss_parallel_context(True):
        with count_collectives(mesh) as fwd:
            loss_sum, n = causal_lm_loss_sum(model(input_ids=ids).logits, labels)
        with count_collectives(mesh) as bwd:
            (loss_sum / n).backward()
    return {"family": family, "sp": sp, "lora": lora, "fwd": fwd.as_dict().get("tp", {}), "bwd": bwd.as_dict().get("tp", {})}


def count_worker(rank: int, world: int, cases: list[tuple[str, bool]]) -> list[dict]:
    import torch.distributed as dist

    from trellis.parallel.dims import ParallelDims

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    mesh = ParallelDims(dp=1, pp=1, tp=2, world_size=world).build_mesh("cpu")
    return [_count_case(f, sp, mesh, lora) for f, sp, lora in cases]


def test_tp_collectives_are_megatrons():
    cases = [("llama", False, False), ("gpt2", False, False), ("gpt_neox", False, False), ("llama", True, False),
             ("llama", False, True)]
    ranks = run_ranks(2, count_worker, cases, timeout=300)
    L = LAYERS
    megatron = {  # op: (calls, bytes) on the tp axis for one micro-batch
        "fwd": {"all_reduce": (2 * L + 1 + 3, (2 * L + 1) * ACT + CE)},
        "bwd": {"all_reduce": (2 * L + 1, (2 * L + 1) * ACT)},
    }
    sequence_parallel = {
        "fwd": {"all_reduce": (1 + 3, ACT + CE), "all_gather_into_tensor": (2 * L + L, (2 * L + L) * ACT // 2),
                "reduce_scatter_tensor": (2 * L, 2 * L * ACT)},
        "bwd": {"all_reduce": (1 + NORMS * L, ACT + NORMS * L * HIDDEN * FLOAT),
                "all_gather_into_tensor": (2 * L + L, (2 * L + L) * ACT // 2),
                "reduce_scatter_tensor": (2 * L, 2 * L * ACT)},
    }
    # LoRA on every Llama linear: the branch of a column-parallel linear shares the block's input all-reduce
    # (no r x tokens input-gradient all-reduce of its own); its replicated lora_A's weight gradient, a partial
    # sum, is all-reduced (r x h, 5 per layer: q, k, v, gate, up); a row-parallel linear's lora_A output
    # (r x tokens) is all-reduced forward (o, down: 2 per layer). The base is frozen, so the first block's
    # attention input (norm of the embedding) needs no gradient: its all-reduce is rightly absent.
    lora = {
        "fwd": {"all_reduce": (2 * L + 1 + 3 + 2 * L, (2 * L + 1) * ACT + CE + 2 * L * BATCH * SEQ * LORA_R * FLOAT)},
        "bwd": {"all_reduce": (2 * L + 5 * L, 2 * L * ACT + 5 * L * LORA_R * HIDDEN * FLOAT)},
    }
    for r, res in enumerate(ranks):
        for c in res:
            name = f"rank{r} {c['family']}{' +sp' if c['sp'] else ''}{' +lora' if c['lora'] else ''}"
            print(f"{name}: fwd {c['fwd']}  bwd {c['bwd']}")
            expected = lora if c["lora"] else sequence_parallel if c["sp"] else megatron
            for direction in ("fwd", "bwd"):
                got = {op: (v["calls"], v["bytes"]) for op, v in c[direction].items()}
                assert got == expected[direction], (name, direction, got, expected[direction])
