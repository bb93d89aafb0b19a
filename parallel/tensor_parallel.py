"""Apply a family's tensor-parallel plan (parallel/models/<family>.py) with DTensor.

- Linear layers in a decoder block: "colwise" (out-features sharded) / "rowwise" (in-features sharded,
  output all-reduced), the Megatron pairing, computed on local shards with Megatron's f / g collectives
  (parallel/tp_linear.py): one input-gradient all-reduce per attention block and one per MLP, and no
  DTensor dispatch in the blocks' hot path; the parameters stay DTensors. Fused head-major QKV (BLOOM, NeoX: the fused output is
  [heads, 3, head_dim]) shards contiguously, which keeps whole heads on a rank. GPT-2's [q | k | v] c_attn
  is unfused into three Linears by parallel/hf_surgery.py, so each of q, k, v is sharded on its own.
- GQA: k/v projections are sharded by kv heads like q (validate_model_dims requires tp | num_kv_heads).
- Embedding: vocab-parallel (RowwiseParallel on nn.Embedding: out-of-shard ids are masked, partial
  outputs all-reduced). LM head: column-parallel with vocab-sharded DTensor logits; the loss runs on
  them under `loss_parallel` (parallel/loss.py). Tied embeddings stay tied: both sides are Shard(0) over
  the vocab, so after parallelizing we point lm_head.weight at the embedding's DTensor again (one
  parameter; its gradient sums the embedding and head contributions, as in the unsharded model).
- Attention modules that size their reshapes from an attribute (num_heads, split_size) get the local
  value; BLOOM's model-level ALiBi tensor (built for all heads with the global slopes) is sliced to this
  rank's heads by a pre-hook.
- Sequence parallel (optional): HF builds the causal mask, ALiBi and rotary tables at model level from
  the full sequence, so the residual stream stays replicated *between* decoder blocks and each block is
  wrapped Replicate -> Shard(1) -> Replicate. Inside a block the norms and residual adds run on this
  rank's sequence slice; attention / MLP inputs are all-gathered (their gradient reduce-scattered: one per
  attention / MLP) and the row-parallel outputs are reduce-scattered back to Shard(1) (in place of the
  all-reduce). The family's `sp_plan` names the norms
  and the gathered modules.
- Adapters (PEFT): a LoRA-wrapped linear takes its base's style (parallel/peft_tp.py).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from trellis.errors import ConfigError

from .collectives import gather_seq
from .models import FAMILIES
from .models.base import FamilySpec
from .peft_tp import adapter_plan
from .tp_linear import LocalColwise, LocalRowwise, SharedInput

_HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "split_size", "embed_dim",
               "hidden_size")


def _style(kind: str, sequence_parallel: bool, shared: SharedInput):
    if kind in ("colwise", "colwise_qkv_headmajor"):
        # under sequence parallel the gather module's reduce-scatter reduces the input gradient
        return LocalColwise(None if sequence_parallel else shared)
    if kind == "rowwise":
        return LocalRowwise(sequence_parallel)
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


# ---- sequence parallel: hooks that move the hidden states between Replicate and Shard(1) -----------

def _relayout(x, mesh, src, dst):
    """Local tensor (or DTensor) laid out as `src` -> local tensor laid out as `dst`, differentiably
    (the backward does the inverse collective: all-gather <-> slice, reduce-scatter)."""
    d = x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, (src,), run_check=False)
    return d.redistribute(mesh, (dst,)).to_local()


def _map_hidden_input(fn):
    """A forward pre-hook applying `fn` to the hidden states: the first positional argument, or the
    `hidden_states` keyword (Llama calls self_attn with keywords, the other families positionally)."""
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        raise RuntimeError(f"sequence parallel: no hidden states among the inputs of {type(module).__name__}")

    return hook


def _map_hidden_output(fn):
    """A forward hook applying `fn` to a block's output hidden states (a tensor, or a tuple's first item)."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    return hook


def _apply_sequence_parallel(block: nn.Module, spec: FamilySpec, tp_mesh) -> None:
    tp = tp_mesh.size()
    group = tp_mesh.get_group()

    def shard_seq(x):
        if x.shape[1] % tp:
            raise ConfigError(f"parallel.sequence_parallel needs the sequence length ({x.shape[1]}) to be divisible by "
                              f"parallel.tp={tp}; set data.seq_len to a multiple of {tp}")
        return _relayout(x, tp_mesh, Replicate(), Shard(1))

    block.register_forward_pre_hook(_map_hidden_input(shard_seq), with_kwargs=True)
    block.register_forward_hook(_map_hidden_output(lambda x: _relayout(x, tp_mesh, Shard(1), Replicate())))
    for path, kind in spec.sp_plan.items():
        mod = block.get_submodule(path)
        if kind == "norm":
            # use_local_output: residual adds (some inside HF attention/MLP modules) mix the norm's output
            # with plain local tensors.
            parallelize_module(mod, tp_mesh, SequenceParallel(use_local_output=True))
        elif kind == "gather":  # all-gather forward, reduce-scatter of the summed input gradient backward
            mod.register_forward_pre_hook(_map_hidden_input(lambda x: gather_seq(x, group)), with_kwargs=True)
        else:
            raise ValueError(f"unknown sequence-parallel kind {kind!r} in the {spec.name} spec")


def _grad_in_param_layout(param):
    """Some DTensor backward rules return a gradient in another layout than its parameter's:
    - the vocab-parallel embedding's gradient comes back Replicate (a full vocab x hidden tensor on every
      rank) although the weight is Shard(0) -> slice it locally (no comm);
    - sequence-parallel LayerNorm weight/bias gradients come back Partial (each rank's sum over its
      sequence slice) -> all-reduce them (hidden-sized vectors).
    Code that works on local shards (ZeRO-1 grad sync, per-mesh grad norms, optimizers on to_local())
    needs grad.to_local() to be laid out like param.to_local(), so each contribution is brought to the
    parameter's layout before it is accumulated."""
    def hook(grad):
        if isinstance(grad, DTensor) and grad.placements != param.placements:
            return grad.redistribute(param.device_mesh, param.placements)
        return grad

    return hook


def _check_sequence_parallel(model: nn.Module, spec: FamilySpec) -> None:
    if not spec.sp_plan:
        ok = sorted(t for f in FAMILIES if f.sp_plan for t in f.model_types)
        raise ConfigError(f"parallel.sequence_parallel is not supported for model type {model.config.model_type!r} "
                          f"(supported: {', '.join(ok)}); set parallel.sequence_parallel=false")
    if any(hasattr(m, "base_layer") for m in model.modules()):
        # The row-parallel LoRA branch (peft_tp.py) produces a replicated output that cannot be added to
        # the base's sequence-sharded one; it needs its own reduce-scatter first.
        raise ConfigError("parallel.sequence_parallel does not support PEFT adapters yet; set "
                          "parallel.sequence_parallel=false or remove the [peft] section")


def apply_tensor_parallel(model: nn.Module, tp_mesh, spec: FamilySpec, *, sequence_parallel: bool = False) -> None:
    """Shard `model` (an HF *ForCausalLM, after hf_surgery.prepare_model and PEFT injection) in place over
    the 1-D `tp_mesh`."""
    if sequence_parallel:
        _check_sequence_parallel(model, spec)
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
        shared = SharedInput(tp_mesh.get_group())  # one f per distinct input of the block's colwise linears
        block.register_forward_pre_hook(shared.reset)
        block.register_forward_hook(shared.reset)
        plan: dict = {}
        for path, kind in spec.tp_plan.items():
            plan.update(adapter_plan(block, path, _style(kind, sequence_parallel, shared), kind))
        parallelize_module(block, tp_mesh, plan)
        for path in spec.tp_head_norms:  # per-head norms: input sharded over heads (dim 2), weight Replicate
            norm = block.get_submodule(path)
            frozen = {n for n, p in norm.named_parameters() if not p.requires_grad}  # PEFT: a frozen base
            parallelize_module(norm, tp_mesh, SequenceParallel(sequence_dim=2, use_local_output=True))
            for n, p in norm.named_parameters():
                p.requires_grad_(n not in frozen)  # distributing makes new Parameters (requires_grad=True)
        _localize_attention_attrs(block, spec, tp)
        if spec.alibi:
            block.get_submodule(spec.attention).register_forward_pre_hook(
                _alibi_local_heads_hook(tp_rank, tp, n_heads), with_kwargs=True)
        if sequence_parallel:
            _apply_sequence_parallel(block, spec, tp_mesh)
    for p in model.parameters():
        if isinstance(p, DTensor) and p.requires_grad:
            p.register_hook(_grad_in_param_layout(p))


def tp_local_numel(model: nn.Module) -> int:
    """Elements of parameters this rank stores (DTensor local shards; a tied weight counted once)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


__all__ = ["apply_tensor_parallel", "tp_local_numel"]
