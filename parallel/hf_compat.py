"""Where transformers' module API moved between releases, resolved by reading the module itself.

transformers 5.24 renamed the key/value cache argument of every model and decoder-layer forward from
`past_key_values` to `cache` (the old name stays accepted, with a FutureWarning, until 5.40; when both
are passed the new one wins). BLOOM's and GPT-NeoX's decoder blocks call theirs `layer_past`. Callers
ask the forward's signature for the name instead of testing a version number.
"""

from __future__ import annotations

import functools
import inspect

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
