"""Prompt learning in place: prompt tuning and P-tuning without peft's model wrapper.

peft implements virtual tokens by wrapping the model (PeftModel builds `inputs_embeds` itself), which
the partitioned engine cannot use. We attach peft's own prompt module (PromptEmbedding / PromptEncoder)
to the HF model under a fixed name, `peft_prompt`, so its parameters are named the same on every layout,
and add two hooks:
  - on the decoder stack (the parent of the layers): input_ids -> [virtual tokens | token embeddings]
    as `inputs_embeds` (positions and the causal mask then cover the virtual tokens, as in peft);
  - on the LM head, first: drop the virtual positions from the hidden states, so the logits line up with
    the labels and the engine's loss is unchanged.
Under tensor parallel the embedding output is replicated, so the prompt module is a plain replicated
parameter whose gradient is the same on every tp rank. Pipeline parallel (virtual tokens on the first
stage, the head on the last) and the per-layer K/V of prefix tuning / P-tuning v2 are not supported yet:
clear ConfigErrors.
"""

from __future__ import annotations

import torch
from torch import nn

from trellis.errors import ConfigError

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
    raise ConfigError(f"peft.method={p.method!r} puts key/value prefixes into every attention layer, which the "
                      "partitioned engine does not support yet; use peft.method='prompt' or 'ptuning'")


def check_layout(cfg) -> None:
    if cfg.parallel.pp > 1:
        raise ConfigError(f"peft.method={cfg.peft.method!r} with parallel.pp={cfg.parallel.pp}: virtual tokens are not "
                          "supported under pipeline parallel yet; use parallel.pp=1 (dp and tp work)")
    if cfg.parallel.sequence_parallel:
        raise ConfigError(f"peft.method={cfg.peft.method!r} does not support parallel.sequence_parallel; set it false")


def attach_prompt_learning(model: nn.Module, spec, cfg, seed: int) -> nn.Module:
    """Add the prompt module and hooks to `model` (an HF *ForCausalLM, unpartitioned). Returns the module."""
    import peft

    check_layout(cfg)
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
        tok = model.get_submodule(spec.embed_tokens)(ids)
        virt = enc(torch.arange(n, device=ids.device).unsqueeze(0).expand(ids.shape[0], n)).to(tok.dtype)
        kwargs["inputs_embeds"] = torch.cat([virt, tok], dim=1)
        return args, kwargs

    def drop_virtual_positions(module, args):
        return (args[0][:, n:], *args[1:])

    stack.register_forward_pre_hook(prepend_virtual_tokens, with_kwargs=True)
    model.get_submodule(spec.lm_head).register_forward_pre_hook(drop_virtual_positions, prepend=True)
    return enc
