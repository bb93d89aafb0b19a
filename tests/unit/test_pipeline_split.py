"""split_layers: even / params / explicit split points, and the user errors for bad parallel.pp_split."""

from __future__ import annotations

import pytest

from trellis.errors import ConfigError
from trellis.parallel.pipeline import split_layers


def _sizes(ranges):
    return [len(r) for r in ranges]


def test_even_covers_every_layer_once_in_order():
    for n, pp in [(4, 2), (5, 2), (7, 3), (8, 4), (3, 3)]:
        ranges = split_layers(n, pp, "even")
        assert [i for r in ranges for i in r] == list(range(n))
        assert max(_sizes(ranges)) - min(_sizes(ranges)) <= 1


def test_explicit_points():
    assert [list(r) for r in split_layers(6, 3, "2,4")] == [[0, 1], [2, 3], [4, 5]]
    assert [list(r) for r in split_layers(4, 2, "1")] == [[0], [1, 2, 3]]


@pytest.mark.parametrize("points", ["3,1", "2", "0,3", "2,6", "2,2", "a,b"])
def test_bad_points_name_the_field(points):
    with pytest.raises(ConfigError, match="parallel.pp_split"):
        split_layers(6, 3, points)


def test_more_stages_than_layers_is_a_config_error():
    """The rule's home is parallel/dims.py (checked before any split); split_layers only refuses to run."""
    from trellis.parallel.dims import ParallelDims, validate_model_dims

    dims = ParallelDims(dp=1, pp=4, tp=1, world_size=4)
    with pytest.raises(ConfigError, match="parallel.pp=4 is more than the model's 2 layers"):
        validate_model_dims(dims, num_heads=4, num_kv_heads=4, num_layers=2, vocab_size=8, intermediate_size=8,
                            micro_batches=4)
    with pytest.raises(ConfigError, match="interleaved_1f1b' needs >= 8 layers"):
        validate_model_dims(dims, num_heads=4, num_kv_heads=4, num_layers=6, vocab_size=8, intermediate_size=8,
                            micro_batches=4, pp_schedule="interleaved_1f1b")
    with pytest.raises(ValueError):
        split_layers(2, 4, "even")


def test_params_balances_embedding_and_head():
    # equal layers and no extras: same as even
    assert _sizes(split_layers(4, 2, "params", [10] * 4)) == [2, 2]
    # a big embedding on the first stage moves layers to the last stage, a big head the other way
    assert _sizes(split_layers(4, 2, "params", [10] * 4, first_extra=20)) == [1, 3]
    assert _sizes(split_layers(4, 2, "params", [10] * 4, last_extra=20)) == [3, 1]
    # the chosen split minimises the largest stage among all contiguous splits
    lp = [5, 1, 1, 1, 9, 2]
    ranges = split_layers(6, 3, "params", lp, first_extra=3, last_extra=4)
    extras = [3, 0, 4]
    worst = max(sum(lp[i] for i in r) + e for r, e in zip(ranges, extras))
    best = min(max(sum(lp[:a]) + 3, sum(lp[a:b]), sum(lp[b:]) + 4)
               for a in range(1, 5) for b in range(a + 1, 6))
    assert worst == best
    assert all(len(r) >= 1 for r in ranges)
