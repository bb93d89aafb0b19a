"""Training configs: schema, TOML loading with dotted overrides, DeepSpeed JSON mapping, presets."""

from .loader import PRESET_DIR, all_keys, load, to_dict, to_toml
from .schema import TrainConfig

__all__ = ["PRESET_DIR", "TrainConfig", "all_keys", "load", "to_dict", "to_toml"]
