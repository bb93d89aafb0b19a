"""Stacked bars of per-rank memory (one bar per rank or per layout), with the GPU capacity as a line."""

from __future__ import annotations

from trellis.errors import UserError

PARTS = (("params", "params"), ("grads", "grads"), ("optimizer_states", "optimizer"), ("master_weights", "master"),
         ("activations", "activations"), ("logits", "logits"), ("buffers", "buffers"), ("comm_buffers", "comm"),
         ("allocator", "allocator"))


UNITS = (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1.0))  # decimal, as the estimator's tables print them


def axis_unit(max_bytes: float) -> tuple[str, float]:
    """The largest unit in which the tallest bar (or the GPU line) is >= 1: 16.5 MB plots on an MB axis."""
    for name, div in UNITS:
        if max_bytes >= div:
            return name, div
    return "B", 1.0


def plot_ranks(bars: list[tuple[str, object]], path: str, *, title: str = "", gpu_mem: float = 0.0):
    """bars: (label, RankMemory); writes a PNG to `path` and returns the matplotlib figure's artists
    (axes, legend, bar patches) for checks. The y unit follows the data; the legend sits outside the axes, right
    of the bars, so it never covers them."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'trellis-train[plot]'") from None
    totals = [sum(getattr(r, key) for key, _ in PARTS) for _, r in bars]
    unit, div = axis_unit(max(totals + [gpu_mem]))
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(bars) + 2) + 1.6, 4.5))
    bottoms = [0.0] * len(bars)
    x = range(len(bars))
    patches = []
    for key, name in PARTS:
        vals = [getattr(r, key) / div for _, r in bars]
        if any(vals):
            patches += list(ax.bar(x, vals, bottom=bottoms, label=name))
            bottoms = [b + v for b, v in zip(bottoms, vals)]
    if gpu_mem:
        ax.axhline(gpu_mem / div, color="black", linestyle="--", label=f"GPU memory ({gpu_mem / div:.3g} {unit})")
    for i, t in enumerate(totals):  # the total on top of each bar, in the axis unit
        ax.annotate(f"{t / div:.3g}", (i, t / div), ha="center", va="bottom", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0})
    ax.set_ylim(0, max(totals + [gpu_mem]) / div * 1.1)
    ax.set_xticks(list(x), [lbl for lbl, _ in bars], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{unit} per rank")
    ax.set_title(title, fontsize=10)
    legend = ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"figure": fig, "axes": ax, "legend": legend, "bars": patches, "unit": unit}
