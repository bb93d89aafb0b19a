"""trellis: a distributed training engine for Hugging Face causal LMs.

The Python API (docs/API.md) is imported on first use (a module `__getattr__`), so `import trellis` and the
CLI's quick commands do not import torch.
"""

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "load_config": "trellis.engine.api",
    "initialize": "trellis.engine.api",
    "Engine": "trellis.engine.api",
    "StepResult": "trellis.engine.api",
    "Batch": "trellis.engine.api",
    "DPO": "trellis.engine.dpo",
    "TrainConfig": "trellis.configs",
    "ConfigError": "trellis.errors",
    "UserError": "trellis.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trellis' has no attribute {name!r}")
