"""Prompt learning in place: prompt tuning, P-tuning and prefix tuning / P-tuning v2 without peft's wrapper.

peft implements virtual tokens by wrapping the model (PeftModel builds `inputs_embeds` itself), which
the partitioned engine cannot use. We attach peft's own prompt module (PromptEmbedding / PromptEncoder)
to the HF model under a fixed name, `peft_prompt`, so its parameters are named the same on every layout,
and add two hooks:
  - on the decoder stack (the parent of the layers): input_ids -> [virtual tokens | token embeddings]
    as `inputs_embeds` (positions and the causal mask then cover the virtual tokens, as in peft);
  - on the LM head, first: drop the virtual positions from the hidden states, so the logits line up with
    the labels and the engine's loss is unchanged.
Under tensor parallel the embedding output is replicated, so the prompt module is a plain replicated
parameter whose gradient is the same on every tp rank. Under pipeline parallel the stage forward does not
call the decoder stack, so attaching returns a `PromptHooks` (parallel/prompt_hooks.py) that the backend
passes to parallelize(): `input_prefix` (called by the first stage right after the token embedding, before
position embeddings / input norms, as HF does with inputs_embeds) and `first_stage_only` (the prompt module
lives on the first stage only); the LM-head hook fires on the last stage, and the activations between stages
carry seq_len + num_virtual_tokens positions (the pipeline infers its P2P shapes from the first
micro-batch). Prefix tuning / P-tuning v2: see attach_prefix (dp, tp and pp; not interleaved 1F1B).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from trellis.configs.schema import PEFT_PREFIX_METHODS
from trellis.errors import ConfigError
from trellis.parallel.collectives import sum_grad_over
from trellis.parallel.hf_compat import cache_kwarg
from trellis.parallel.pipeline import TWO_STAGE_SCHEDULES
from trellis.parallel.prompt_hooks import PromptHooks

PROMPT_MODULE = "peft_prompt"


def prompt_config(cfg, hf_config):
    import peft

    p = cfg.peft
    common = dict(num_virtual_tokens=p.num_virtual_tokens, task_type="CAUSAL_LM", token_dim=hf_config.hidden_size,
                  num_transformer_submodules=1, num_attention_heads=hf_config.num_attention_heads,
                  num_layers=hf_config.num_hidden_layers)
    if p.method == "prompt":
        return peft.PromptTuningConfig(**common)
    if p.method == "ptuning":
        return peft.PromptEncoderConfig(encoder_hidden_size=hf_config.hidden_size, **common)
    if p.method in PEFT_PREFIX_METHODS:
        from peft.utils.other import _prepare_prompt_learning_config

        # P-tuning v2 = prefix tuning with the prefix reparameterised by a 2-layer MLP (prefix_projection).
        # peft's own preparation fills token_dim / heads / layers from the model (kv heads under GQA).
        pc = peft.PrefixTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type="CAUSAL_LM",
                                     prefix_projection=p.method == "ptuning_v2",
                                     encoder_hidden_size=hf_config.hidden_size)
        return _prepare_prompt_learning_config(pc, hf_config)
    raise ConfigError(f"peft.method={p.method!r} is not a prompt-learning method")


def is_prefix(cfg) -> bool:
    return cfg.peft.method in PEFT_PREFIX_METHODS


def check_layout(cfg) -> None:
    if is_prefix(cfg) and cfg.parallel.pp > 1 and cfg.parallel.pp_schedule in TWO_STAGE_SCHEDULES:
        raise ConfigError(f"peft.method={cfg.peft.method!r} with parallel.pp_schedule={cfg.parallel.pp_schedule!r}: the "
                          "prefix encoder would be replicated on both virtual stages of a rank under one name; "
                          "use parallel.pp_schedule='1f1b' or 'gpipe'")
    if cfg.parallel.sequence_parallel:
        raise ConfigError(f"peft.method={cfg.peft.method!r} does not support parallel.sequence_parallel; set it false")


def attach_prompt_learning(model: nn.Module, spec, cfg, seed: int) -> PromptHooks:
    """Add the prompt module and hooks to `model` (an HF *ForCausalLM, unpartitioned). Returns what the
    partitioner needs to know (for parallelize())."""
    import peft

    check_layout(cfg)
    if is_prefix(cfg):
        return attach_prefix(model, spec, cfg, seed)
    pc = prompt_config(cfg, model.config)
    embed = model.get_submodule(spec.embed_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = peft.PromptEmbedding(pc, embed) if cfg.peft.method == "prompt" else peft.PromptEncoder(pc)
    model.add_module(PROMPT_MODULE, enc)
    n = pc.num_virtual_tokens
    stack = model.get_submodule(spec.layers.rsplit(".", 1)[0])

    def prepend_virtual_tokens(module, args, kwargs):
        ids = kwargs.pop("input_ids", None)
        if ids is None and args:
            ids, args = args[0], args[1:]
        if ids is None:
            return args, kwargs
        kwargs["inputs_embeds"] = with_virtual_tokens(model, model.get_submodule(spec.embed_tokens)(ids))
        return args, kwargs

    def drop_virtual_positions(module, args):
        return (args[0][:, n:], *args[1:])

    stack.register_forward_pre_hook(prepend_virtual_tokens, with_kwargs=True)
    model.get_submodule(spec.lm_head).register_forward_pre_hook(drop_virtual_positions, prepend=True)
    # for parallel/pipeline.py: the first stage embeds itself (the stack hook above never fires there)
    return PromptHooks(input_prefix=with_virtual_tokens, virtual_tokens=n, first_stage_only=(PROMPT_MODULE,))


def with_virtual_tokens(root: nn.Module, tok: torch.Tensor) -> torch.Tensor:
    """[virtual tokens | token embeddings] for the model or first pipeline stage `root`."""
    enc = root.get_submodule(PROMPT_MODULE)
    b, n = tok.shape[0], enc.embedding.num_embeddings
    virt = enc(torch.arange(n, device=tok.device).unsqueeze(0).expand(b, n)).to(tok.dtype)
    return torch.cat([virt, tok], dim=1)


# ---- prefix tuning / P-tuning v2: per-layer key/value prefixes ---------------------------------------

def attach_prefix(model: nn.Module, spec, cfg, seed: int) -> PromptHooks:
    """peft's PrefixEncoder under `peft_prompt`, and a pre-hook on the decoder stack that passes its output
    as `past_key_values` (built as PeftModelForCausalLM.get_prompt does), so HF itself offsets the positions
    by num_virtual_tokens and lets every token attend to the prefix.
    Under tensor parallel each rank keeps the prefix heads of its own k/v projection shard (contiguous kv
    heads, like the colwise k_proj/v_proj); the replicated encoder's gradient is summed over tp.
    Under pipeline parallel every stage holds a replica of the encoder and uses the prefixes of its own
    (global) layer indices; the stage forward (parallel/stage_forward.py) calls `PromptHooks.kv_prefix` and
    offsets positions and the causal mask by `prefix_len`, and the pipeline sums the replicas' gradients over
    pp before the step (`pp_replicated`). parallelize() binds the tp mesh (`bind_tp_mesh`)."""
    import peft

    pc = prompt_config(cfg, model.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = peft.tuners.prefix_tuning.PrefixEncoder(pc)
    model.add_module(PROMPT_MODULE, enc)
    heads = pc.num_attention_heads
    shape = (pc.num_virtual_tokens, pc.num_layers * 2, heads, pc.token_dim // heads)
    tp = {"mesh": None}  # bound by parallelize() when tensor parallel is on

    def prefix_of(root: nn.Module, b: int, device) -> PrefixCache:
        return kv_prefix(root, b, device, shape, tp["mesh"])

    def bind_tp_mesh(mesh) -> None:
        tp["mesh"] = mesh

    stack = model.get_submodule(spec.layers.rsplit(".", 1)[0])
    cache_arg = cache_kwarg(stack)  # `cache` from transformers 5.24, `past_key_values` before

    def add_prefix_cache(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs["inputs_embeds"]
        kwargs[cache_arg] = prefix_of(model, ref.shape[0], ref.device)
        return args, kwargs

    stack.register_forward_pre_hook(add_prefix_cache, with_kwargs=True)
    # for parallel/pipeline.py and parallel/stage_forward.py (the stage forward never calls the stack)
    return PromptHooks(kv_prefix=prefix_of, prefix_len=pc.num_virtual_tokens, pp_replicated=(PROMPT_MODULE,),
                       bind_tp_mesh=bind_tp_mesh)


def kv_prefix(root: nn.Module, b: int, device, shape: tuple[int, int, int, int], tp_mesh=None) -> "PrefixCache":
    """The key/value prefix cache of every layer for a batch of `b`, from the encoder of `root` (the model
    or a pipeline stage); `shape` = (virtual tokens, 2 x layers, kv heads, head dim); under tensor parallel
    (`tp_mesh`), this rank's kv heads."""
    enc = root.get_submodule(PROMPT_MODULE)
    n, kv_layers, heads, head_dim = shape
    kv = enc(torch.arange(n, device=device).unsqueeze(0).expand(b, n)).view(b, n, kv_layers, heads, head_dim)
    mesh = tp_mesh
    if mesh is not None:
        kv = sum_grad_over(kv, mesh.get_group())
        tp, r = mesh.size(), mesh.get_local_rank()
        kv = kv[:, :, :, r * heads // tp:(r + 1) * heads // tp]
    return PrefixCache(kv.permute(2, 0, 3, 1, 4).split(2))  # per layer: [2, b, heads, n, head_dim]


class PrefixCache(DynamicCache):
    """A read-only key/value prefix: update() returns [prefix | new keys/values] and stores nothing. A
    DynamicCache appends on every call, so recomputing a block under activation checkpointing would see the
    block's own keys twice; with this cache a forward and its recomputation match."""

    def __init__(self, per_layer_kv):
        super().__init__(list(per_layer_kv))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)
