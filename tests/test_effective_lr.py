"""The effective-lr math and the histogram median used for sharded parameters."""

from __future__ import annotations

import pytest
import torch

from lightning_wd.effective_lr import (
    adam_effective_lr,
    combine_partials,
    histogram_median_rel_error,
    partial_stats,
    stats_from_partials,
)


def test_tensor_step_gives_the_same_rate_as_a_float_step():
    v = torch.rand(100) * 1e-3
    a = adam_effective_lr(v, 7.0, 1e-3, 0.999, 1e-8)
    b = adam_effective_lr(v, torch.tensor(7.0), 1e-3, 0.999, 1e-8)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n", [1, 2, 5, 1000, 4097])
@pytest.mark.parametrize("spread", [1, 8], ids=["narrow", "8_decades"])
def test_statistics_are_exact_and_the_median_within_its_documented_bound(n, spread):
    g = torch.Generator().manual_seed(n)
    x = torch.pow(10.0, -6 + spread * torch.rand(n, generator=g, dtype=torch.float64)).float()
    mn, mx, mean, median = stats_from_partials(partial_stats(x)).tolist()
    exact_median = torch.sort(x).values[(n - 1) // 2].item()  # the lower median
    assert (mn, mx) == (x.min().item(), x.max().item())
    assert mean == pytest.approx(x.double().mean().item(), rel=1e-6)
    assert abs(median / exact_median - 1) <= histogram_median_rel_error()


def test_partials_of_shards_combine_into_the_whole_and_empty_shards_are_neutral():
    x = torch.pow(10.0, -5 + 4 * torch.rand(1001, dtype=torch.float64)).float()
    whole = partial_stats(x)
    shards = torch.stack([partial_stats(s) for s in x.split([0, 300, 701])])
    combined = combine_partials(shards)
    assert torch.equal(combined[[0, 1, 3]], whole[[0, 1, 3]]) and torch.equal(combined[4:], whole[4:])
    torch.testing.assert_close(combined[2], whole[2])  # a sum in another order
    assert torch.equal(stats_from_partials(combined)[[0, 1, 3]], stats_from_partials(whole)[[0, 1, 3]])
    assert histogram_median_rel_error() < 0.006


def test_values_outside_the_histogram_range_land_in_the_end_bins():
    x = torch.tensor([1e-30, 1e-20, 1e10, 1e12])
    p = partial_stats(x)
    assert p[4].item() == 2 and p[-1].item() == 2 and p[3].item() == 4
