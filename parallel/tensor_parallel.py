"""Apply a family's tensor-parallel plan (parallel/models/<family>.py) with DTensor.

- Linear layers in a decoder block: "colwise" (out-features sharded) / "rowwise" (in-features sharded,
  output all-reduced), the Megatron pairing; fused head-major QKV (BLOOM, NeoX) shards contiguously,
  which keeps whole heads on a rank.
- Embedding: vocab-parallel (RowwiseParallel on nn.Embedding: out-of-shard ids are masked, partial
  outputs all-reduced). LM head: column-parallel with vocab-sharded DTensor logits; the loss runs on
  them under `loss_parallel` (parallel/loss.py). Tied embeddings stay tied: both sides use Shard(0).
- Attention modules that size their reshapes from an attribute (num_heads, split_size) get the local
  value; BLOOM's model-level ALiBi tensor is sliced to the local heads by a pre-hook.
- Sequence parallel is not implemented yet (configs/validate.py rejects parallel.sequence_parallel).
- Adapters (PEFT): a LoRA-wrapped linear takes its base's style (base_layer + lora_B colwise, lora_A
  replicated; or base_layer + lora_A rowwise, lora_B replicated) - see parallel/peft_tp.py.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from .models.base import FamilySpec

_HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "split_size", "embed_dim",
               "hidden_size")


def _style(kind: str):
    if kind in ("colwise", "colwise_qkv_headmajor"):
        return ColwiseParallel()
    if kind == "rowwise":
        return RowwiseParallel()
    raise ValueError(f"unknown tensor-parallel style {kind!r}")


def _localize_attention_attrs(block: nn.Module, spec: FamilySpec, tp: int) -> None:
    attn = block.get_submodule(spec.attention)
    for a in _HEAD_ATTRS:
        v = getattr(attn, a, None)
        if isinstance(v, int) and v % tp == 0:
            setattr(attn, a, v // tp)


def _alibi_local_heads_hook(tp_rank: int, tp: int, n_heads: int):
    def hook(module, args, kwargs):
        alibi = kwargs.get("alibi")
        if alibi is not None and alibi.shape[0] % n_heads == 0:
            b = alibi.shape[0] // n_heads
            local = n_heads // tp
            kwargs["alibi"] = alibi.view(b, n_heads, *alibi.shape[1:])[:, tp_rank * local:(tp_rank + 1) * local] \
                .reshape(b * local, *alibi.shape[1:])
        return args, kwargs

    return hook


def apply_tensor_parallel(model: nn.Module, tp_mesh, spec: FamilySpec) -> None:
    from .peft_tp import adapter_plan

    tp = tp_mesh.size()
    tp_rank = tp_mesh.get_local_rank()
    embed = model.get_submodule(spec.embed_tokens)
    head = model.get_submodule(spec.lm_head)
    tied = head.weight is embed.weight

    # Model level: vocab-parallel embedding, column-parallel head with vocab-sharded logits.
    parallelize_module(model, tp_mesh, {
        spec.embed_tokens: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        spec.lm_head: ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False),
    })
    if tied:
        head.weight = embed.weight  # both Shard(0) over the vocab: one parameter, gradients from both uses

    n_heads = getattr(model.config, "num_attention_heads", None) or getattr(model.config, "n_head")
    for block in model.get_submodule(spec.layers):
        plan: dict = {}
        for path, kind in spec.tp_plan.items():
            plan.update(adapter_plan(block, path, _style(kind), kind))
        parallelize_module(block, tp_mesh, plan)
        _localize_attention_attrs(block, spec, tp)
        if spec.alibi:
            block.get_submodule(spec.attention).register_forward_pre_hook(
                _alibi_local_heads_hook(tp_rank, tp, n_heads), with_kwargs=True)


def sharded_vocab(model: nn.Module, spec: FamilySpec) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(model.get_submodule(spec.lm_head).weight, DTensor)


__all__ = ["apply_tensor_parallel", "sharded_vocab"]
