"""The effective-lr math and the histogram median used for sharded parameters."""

from __future__ import annotations

import pytest
import torch

from lightning_wd.effective_lr import (
    _count_bins,
    adam_effective_lr,
    combine_partials,
    histogram_median_rel_error,
    make_scratch,
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


def test_no_elements_give_nan_statistics_and_stay_neutral_in_a_combination():
    empty = partial_stats(torch.empty(0), 1e-8)
    assert torch.isnan(stats_from_partials(empty, 1e-3, 1e-8)).all()
    some = partial_stats(torch.rand(10), 1e-8)
    both = stats_from_partials(torch.stack([empty, some]), 1e-3, 1e-8)
    assert torch.isnan(both[0]).all() and not torch.isnan(both[1]).any()


def test_values_outside_the_histogram_range_land_in_the_end_bins():
    v_hat = torch.tensor([0.0, 1e-40, 1e20, 1e30])
    p = partial_stats(v_hat, 1e-8)
    assert p[4].item() == 2 and p[-1].item() == 2 and p[3].item() == 4


def test_the_input_is_left_alone_and_scratch_buffers_are_used():
    v = torch.rand(100)
    before = v.clone()
    values, indices = make_scratch(100, v.device)
    values.fill_(-1.0)
    partial_stats(v, 1e-8, 0.5, (values, indices))
    assert torch.equal(v, before)
    assert not (values == -1.0).any()  # the work happened in the buffer the caller gave


def test_bias_correction_gives_the_partials_of_v_divided_by_it():
    g = torch.Generator().manual_seed(4)
    v = torch.rand(1000, generator=g) * 1e-4
    for bc2 in (0.3, torch.tensor(0.3)):
        p = partial_stats(v, 1e-8, bc2)
        ref = partial_stats(torch.div(v, 0.3), 1e-8)  # v_hat = v / bias_correction2, a float or a tensor alike
        assert torch.equal(p[[0, 1, 3]], ref[[0, 1, 3]]) and torch.equal(p[4:], ref[4:])
        torch.testing.assert_close(p[2], ref[2])


def test_low_precision_state_is_summarized_in_fp32():
    v = (torch.rand(500, generator=torch.Generator().manual_seed(5)) * 1e-4).bfloat16()
    p = partial_stats(v, 1e-8, 0.7)
    ref = partial_stats(v.float() / 0.7, 1e-8)
    assert torch.equal(p[[0, 1, 3]], ref[[0, 1, 3]]) and torch.equal(p[4:], ref[4:])


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunks_give_the_partials_of_the_whole_tensor(monkeypatch, chunk):
    import lightning_wd.effective_lr as mod

    v = torch.pow(10.0, -12 + 8 * torch.rand(1001, dtype=torch.float64)).float()
    whole = partial_stats(v, 1e-8, 0.9)
    monkeypatch.setattr(mod, "chunk_elements", lambda device: chunk)
    values, indices = mod.make_scratch(v.numel(), v.device)
    assert values.numel() == min(chunk, 1001)  # the scratch never grows with the tensor
    chunked = partial_stats(v, 1e-8, 0.9, (values, indices))
    assert torch.equal(chunked[[0, 1, 3]], whole[[0, 1, 3]]) and torch.equal(chunked[4:], whole[4:])
    torch.testing.assert_close(chunked[2], whole[2], rtol=1e-6, atol=0)  # the same sum in another order


def test_index_add_counting_used_off_the_cpu_matches_bincount():
    # the accelerator path (index_add_ into fixed bins) checked against the CPU path on the same indices
    idx = torch.randint(0, 50, (10_000,), generator=torch.Generator().manual_seed(6), dtype=torch.int32)
    a, b = torch.zeros(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    for _ in range(2):  # the counts add up across calls, as across chunks
        _count_bins(idx, a, bincount=True)
        _count_bins(idx, b, bincount=False)
    assert torch.equal(a, b) and a.sum() == 20_000
    assert a[15] == 2 * (idx == 15).sum() and a[60] == 0
