"""Config checks shared by the family specs (FamilySpec.check_config): limits of what trellis runs exactly."""

from __future__ import annotations


def sliding_window_limit(c, seq_len: int, *, layers_slide: bool) -> str | None:
    """A sliding window shorter than the sequence: the pipeline stages and the block-causal masks of packed
    rows build full causal masks, so trellis refuses sequences longer than the window (within the window a
    sliding-window layer attends exactly like a full one)."""
    w = getattr(c, "sliding_window", None)
    if not layers_slide or not w or seq_len <= int(w):
        return None
    return (f"data.seq_len={seq_len} exceeds the model's sliding_window={w} ({c.model_type}); trellis builds "
            f"full causal masks, exact only within the window: set data.seq_len <= {w}")


def layer_types_slide(c) -> bool:
    return "sliding_attention" in (getattr(c, "layer_types", None) or ())
