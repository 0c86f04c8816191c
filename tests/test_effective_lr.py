"""The effective-lr math and the histogram median used for sharded parameters."""

from __future__ import annotations

import pytest
import torch

from lightning_wd.effective_lr import (
    adam_effective_lr,
    histogram_median,
    histogram_median_rel_error,
    log10_histogram,
)


def test_tensor_step_gives_the_same_rate_as_a_float_step():
    v = torch.rand(100) * 1e-3
    a = adam_effective_lr(v, 7.0, 1e-3, 0.999, 1e-8)
    b = adam_effective_lr(v, torch.tensor(7.0), 1e-3, 0.999, 1e-8)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n", [1, 2, 5, 1000, 4097])
@pytest.mark.parametrize("spread", [1, 8], ids=["narrow", "8_decades"])
def test_histogram_median_is_within_its_documented_bound(n, spread):
    g = torch.Generator().manual_seed(n)
    x = torch.pow(10.0, -6 + spread * torch.rand(n, generator=g, dtype=torch.float64))
    exact = torch.sort(x).values[(n - 1) // 2]
    approx = histogram_median(log10_histogram(x))
    assert abs(approx / exact - 1) <= histogram_median_rel_error()


def test_histograms_of_shards_add_up_to_the_whole():
    x = torch.pow(10.0, -5 + 4 * torch.rand(1001, dtype=torch.float64))
    whole = log10_histogram(x)
    parts = sum(log10_histogram(s) for s in x.split([0, 300, 701]))
    assert torch.equal(whole, parts)
    assert histogram_median_rel_error() < 0.006
