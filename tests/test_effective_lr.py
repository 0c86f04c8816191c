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


def reference_rate(v_hat: torch.Tensor, lr: float, eps: float) -> torch.Tensor:
    """``lr / (sqrt(v_hat) + eps)`` in float64, the formula as the README states it."""
    return lr / (v_hat.double().sqrt() + eps)


def exact_stats(rate: torch.Tensor) -> list[float]:
    lower_median = torch.sort(rate).values[(rate.numel() - 1) // 2]
    return [rate.min().item(), rate.max().item(), rate.mean().item(), lower_median.item()]


@pytest.mark.parametrize("n", [1, 2, 5, 1000, 4097])
@pytest.mark.parametrize("spread", [1, 8, 24], ids=["narrow", "8_decades", "24_decades"])
@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_statistics_are_exact_and_the_median_within_its_documented_bound(n, spread, eps):
    g = torch.Generator().manual_seed(n)
    v_hat = torch.pow(10.0, -20 + spread * torch.rand(n, generator=g, dtype=torch.float64)).float()
    lr = 3e-4
    mn, mx, mean, median = stats_from_partials(partial_stats(v_hat, eps), lr, eps).tolist()
    ref_min, ref_max, ref_mean, ref_median = exact_stats(reference_rate(v_hat, lr, eps))
    # fp32 arithmetic in the library, fp64 in the reference
    assert mn == pytest.approx(ref_min, rel=1e-6) and mx == pytest.approx(ref_max, rel=1e-6)
    assert mean == pytest.approx(ref_mean, rel=1e-6)
    assert abs(median / ref_median - 1) <= histogram_median_rel_error()


def test_min_and_max_are_the_elementwise_rates_bit_for_bit():
    v_hat = torch.rand(999, generator=torch.Generator().manual_seed(3)) * 1e-4
    rates = torch.sqrt(v_hat).add_(1e-8).reciprocal_().mul_(1e-3)  # the library's own fp32 elementwise formula
    mn, mx = stats_from_partials(partial_stats(v_hat, 1e-8), 1e-3, 1e-8)[:2].tolist()
    assert (mn, mx) == (rates.min().item(), rates.max().item())


def test_partials_of_shards_combine_into_the_whole_and_empty_shards_are_neutral():
    v_hat = torch.pow(10.0, -12 + 8 * torch.rand(1001, dtype=torch.float64)).float()
    whole = partial_stats(v_hat, 1e-8)
    shards = torch.stack([partial_stats(s, 1e-8) for s in v_hat.split([0, 300, 701])])
    combined = combine_partials(shards)
    assert torch.equal(combined[[0, 1, 3]], whole[[0, 1, 3]]) and torch.equal(combined[4:], whole[4:])
    torch.testing.assert_close(combined[2], whole[2])  # a sum in another order
    stats_c, stats_w = stats_from_partials(combined, 1e-3, 1e-8), stats_from_partials(whole, 1e-3, 1e-8)
    assert torch.equal(stats_c[[0, 1, 3]], stats_w[[0, 1, 3]])
    assert histogram_median_rel_error() < 0.004


def test_values_outside_the_histogram_range_land_in_the_end_bins():
    v_hat = torch.tensor([0.0, 1e-40, 1e20, 1e30])
    p = partial_stats(v_hat, 1e-8)
    assert p[4].item() == 2 and p[-1].item() == 2 and p[3].item() == 4


def test_overwrite_reuses_the_input_and_the_default_does_not():
    v_hat = torch.rand(100)
    before = v_hat.clone()
    partial_stats(v_hat, 1e-8)
    assert torch.equal(v_hat, before)
    partial_stats(v_hat, 1e-8, overwrite=True)
    assert not torch.equal(v_hat, before)
