"""The memory plots a person reads: the y unit follows the data (a 16.5 MB estimate on an MB axis, not 0.016 on a
GB one), the legend never covers a bar (checked on the rendered figure's pixel boxes), and a pp layout gets one
stacked bar per pipeline rank."""

from __future__ import annotations

import pytest

from trellis import cli
from trellis.engine.memory.plot import axis_unit, plot_ranks


@pytest.mark.parametrize("nbytes,unit", [(16.53e6, "MB"), (999.0, "B"), (1.5e3, "KB"), (80e9, "GB"), (0.0, "B")])
def test_axis_unit(nbytes, unit):
    assert axis_unit(nbytes)[0] == unit


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("pp,gpu_mem", [(1, 0.0), (2, 5e6), (4, 0.0)])
def test_plot_units_legend_clear_of_the_bars_and_one_bar_per_pp_rank(tmp_path, pp, gpu_mem):
    from trellis.engine.memory.estimator import estimate

    args = cli.build_parser().parse_args(
        ["estimate-memory", "--model", "tiny-llama", "--pp", str(pp), "--seq-len", "128", "--micro-batch", "2",
         "--grad-accum", "4"])
    from trellis.commands.memory import build

    d, s = build(args)
    est = estimate(d, s)
    assert len(est.ranks) == pp  # one stacked bar per pipeline stage
    png = tmp_path / "mem.png"
    art = plot_ranks([(r.label, r) for r in est.ranks], str(png), title="t", gpu_mem=gpu_mem)
    assert png.stat().st_size > 0
    assert art["unit"] == "MB" and art["axes"].get_ylabel() == "MB per rank"
    top = max(sum(b.get_height() for b in art["bars"] if abs(b.get_x() + b.get_width() / 2 - i) < 0.5)
              for i in range(pp))
    assert 1 <= top < 1000  # the tallest bar reads in the axis unit
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(art["figure"]).get_renderer()  # the closed figure, laid out as it was saved
    legend_box = art["legend"].get_window_extent(renderer)
    for bar in art["bars"]:
        assert not _overlaps(legend_box, bar.get_window_extent(renderer))
    fig_box = art["figure"].bbox
    assert legend_box.x1 <= fig_box.x1 and legend_box.y0 >= fig_box.y0  # and the legend is not cut off


def test_estimate_memory_cli_writes_the_pp_plot(tmp_path, capsys):
    png = tmp_path / "pp.png"
    rc = cli.main(["estimate-memory", "--model", "tiny-llama", "--pp", "2", "--seq-len", "64", "--plot", str(png)])
    assert rc == 0 and png.stat().st_size > 0
