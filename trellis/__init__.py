"""trellis: a distributed training engine for Hugging Face causal LMs."""

__version__ = "0.1.0"
