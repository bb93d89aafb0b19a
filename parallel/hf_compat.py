"""Where transformers' module API moved between releases, resolved by reading the module itself.

transformers 5.24 renamed the key/value cache argument of every model and decoder-layer forward from
`past_key_values` to `cache` (the old name stays accepted, with a FutureWarning, until 5.40; when both
are passed the new one wins). BLOOM's and GPT-NeoX's decoder blocks call theirs `layer_past`. Callers
ask the forward's signature for the name instead of testing a version number.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

_CACHE_ARGS = ("cache", "past_key_values", "layer_past")


def cache_kwarg(module: nn.Module) -> str:
    """The name under which `module.forward` takes a key/value cache (a property of the class: read once per
    class, since the pipeline stage forward asks on every call)."""
    return _cache_kwarg_of(type(module))


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    for name in _CACHE_ARGS:
        if name in params:
            return name
    raise TypeError(f"{cls.__name__}.forward takes no key/value cache (looked for {', '.join(_CACHE_ARGS)})")


def alibi_from_key_positions(model: nn.Module, backbone: str) -> None:
    """Let BLOOM take a 4D block-causal mask (parallel/attention.py). `BloomModel.forward` builds ALiBi from a 2D
    padding mask (`build_alibi_tensor`), which a 4D mask is not. Softmax is invariant to a per-row constant, so
    inside a block-diagonal mask ALiBi from absolute key positions (slope * j, what BLOOM does without a mask) gives
    each sample exactly its unpacked attention (slope * (j - start) differs by the row constant slope * start).
    Patched on this instance only; a 2D mask still takes HF's own path."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    stack = model.get_submodule(backbone)
    hf_build = stack.build_alibi_tensor

    def build_alibi_tensor(attention_mask, num_heads: int, dtype):
        if attention_mask.dim() != 4:
            return hf_build(attention_mask, num_heads, dtype)
        b, kv_len = attention_mask.shape[0], attention_mask.shape[-1]
        slopes = _get_alibi_slopes(num_heads, attention_mask.device)
        return (slopes[:, None, None] * torch.arange(kv_len, device=attention_mask.device)).repeat(b, 1, 1).to(dtype)

    stack.build_alibi_tensor = build_alibi_tensor
