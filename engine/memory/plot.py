"""Stacked bars of per-rank memory (one bar per rank or per layout), with the GPU capacity as a line."""

from __future__ import annotations

from trellis.errors import UserError

PARTS = (("params", "params"), ("grads", "grads"), ("optimizer_states", "optimizer"), ("master_weights", "master"),
         ("activations", "activations"), ("logits", "logits"), ("buffers", "buffers"), ("comm_buffers", "comm"),
         ("allocator", "allocator"))


def plot_ranks(bars: list[tuple[str, object]], path: str, *, title: str = "", gpu_mem: float = 0.0) -> None:
    """bars: (label, RankMemory); writes a PNG to `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'trellis-train[plot]'") from None
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(bars) + 2), 4.5))
    bottoms = [0.0] * len(bars)
    x = range(len(bars))
    for key, name in PARTS:
        vals = [getattr(r, key) / 1e9 for _, r in bars]
        if any(vals):
            ax.bar(x, vals, bottom=bottoms, label=name)
            bottoms = [b + v for b, v in zip(bottoms, vals)]
    if gpu_mem:
        ax.axhline(gpu_mem / 1e9, color="black", linestyle="--", label="GPU memory")
    ax.set_xticks(list(x), [lbl for lbl, _ in bars], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("GB per rank")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
