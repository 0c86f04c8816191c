"""The effective-lr formulas against the optimizers' real updates, and the streamed statistics against exact ones."""

from __future__ import annotations

import pytest
import torch

import lightning_wd.effective_lr as el
from lightning_wd.effective_lr import (
    BLOCK_ROWS,
    FORMULAS,
    RateSpec,
    accumulate_partials,
    adam_rate,
    effective_lr,
    empty_partials,
    formula_for,
    histogram_median_rel_error,
    make_scratch,
    rate_statistics,
    summarize_partials,
)

# --- the formulas against the optimizers' own updates, in float64 ---------------------------------------------


def grads(shape, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Gradients spread over several decades, different at every step."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * 10 ** (2 * torch.rand(shape, generator=g,
                                                                                          dtype=torch.float64) - 1)
            for _ in range(steps)]


def bias_corrected_m(opt, w, grad=None) -> torch.Tensor:
    state, group = opt.state[w], opt.param_groups[0]
    return state["exp_avg"] / (1 - group["betas"][0] ** float(state["step"]))


# name -> (optimizer, what the rate multiplies in the update: fn(opt, w, grad))
UPDATES = {
    "adam": (lambda p: torch.optim.Adam(p, lr=5e-2, betas=(0.8, 0.95)), bias_corrected_m),
    "amsgrad": (lambda p: torch.optim.Adam(p, lr=5e-2, betas=(0.8, 0.95), amsgrad=True), bias_corrected_m),
    "adamw_wd0": (lambda p: torch.optim.AdamW(p, lr=5e-2, weight_decay=0.0), bias_corrected_m),
}


# float64: the update exactly, to the fp32 rounding of the rate. fp32 (the fills' fast path): ``p_before - p_after``
# is a difference of numbers 100x larger than it, each rounded to half an fp32 ulp of |p|, hence the atol
TOLERANCES = {torch.float64: {"rtol": 2e-6, "atol": 1e-12}, torch.float32: {"rtol": 1e-4, "atol": None}}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(UPDATES))
def test_rate_times_what_it_multiplies_is_the_real_update(name, dtype):
    """``p_before - p_after == rate * m`` elementwise at every step (no weight decay), ``m`` the bias-corrected first
    moment, computed here from the state."""
    make_opt, multiplied = UPDATES[name]
    w = torch.nn.Parameter(torch.randn(4, 6, dtype=dtype, generator=torch.Generator().manual_seed(1)))
    opt = make_opt([w])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    formula = formula_for(opt)[1]
    for g in grads(w.shape, 12):
        w.grad = g.to(dtype)
        before = w.detach().clone()
        opt.step()
        rate = effective_lr(formula.spec(opt.state[w], opt.param_groups[0], w)).to(dtype).view_as(w)
        tol = TOLERANCES[dtype]
        atol = tol["atol"] if tol["atol"] is not None else torch.finfo(dtype).eps * before.abs().max().item()
        torch.testing.assert_close(before - w.detach(), rate * multiplied(opt, w, w.grad), rtol=tol["rtol"], atol=atol)
        sched.step()


def test_adamw_rate_with_decay_is_the_update_after_the_decay():
    w = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
    opt = torch.optim.AdamW([w], lr=5e-2, weight_decay=0.1)
    for g in grads(w.shape, 5):
        w.grad = g
        before = w.detach().clone()
        opt.step()
        rate = effective_lr(adam_rate(opt.state[w], opt.param_groups[0], w)).double()
        torch.testing.assert_close(before * (1 - 5e-2 * 0.1) - w.detach(), rate * bias_corrected_m(opt, w),
                                   rtol=2e-6, atol=1e-12)


def test_a_device_step_gives_the_rate_of_a_host_step(monkeypatch):
    """``capturable``/``fused`` optimizers keep ``step`` on the device; the formulas then compute on the device.
    Simulated on the CPU by handing the formulas the step tensor itself."""
    w = torch.nn.Parameter(torch.randn(30))
    opts = {"torch.optim.Adam": torch.optim.Adam([w], lr=1e-2, amsgrad=True)}
    for key, opt in opts.items():
        for t, g in enumerate(grads(w.shape, 8)):
            w.grad = g.float()
            opt.step()
            state, group = opt.state[w], opt.param_groups[0]
            host = effective_lr(FORMULAS[key].spec(state, group, w))
            with monkeypatch.context() as m:
                m.setattr(el, "_step", lambda state: state["step"])
                spec = FORMULAS[key].spec(state, group, w)
                assert isinstance(spec.scale, torch.Tensor)
                device = effective_lr(spec)
            torch.testing.assert_close(device, host, rtol=1e-6, atol=0)


# --- the statistics ----------------------------------------------------------------------------------------------


def root_spec(v: torch.Tensor, scale: float = 3e-4, eps: float = 1e-8) -> RateSpec:
    """The rate ``scale / (sqrt(v) + eps)`` of a 1-D ``v``."""
    v = v.flatten()

    def fill(start: int, stop: int, out: torch.Tensor) -> None:
        out.copy_(v[start:stop]).sqrt_()

    return RateSpec(scale, eps, v.numel(), fill, v.device)


def reference_rate(v: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
    """``scale / (sqrt(v) + eps)`` in float64."""
    return scale / (v.double().sqrt() + eps)


def exact_stats(rate: torch.Tensor) -> list[float]:
    lower_median = torch.sort(rate).values[(rate.numel() - 1) // 2]
    return [rate.min().item(), rate.max().item(), rate.mean().item(), lower_median.item()]


def assert_stats(got: torch.Tensor, rate: torch.Tensor) -> None:
    """min, max and mean within fp32 arithmetic of the float64 reference, the median within its documented bound."""
    mn, mx, mean, median = got.tolist()
    ref_min, ref_max, ref_mean, ref_median = exact_stats(rate)
    assert mn == pytest.approx(ref_min, rel=1e-6) and mx == pytest.approx(ref_max, rel=1e-6)
    assert mean == pytest.approx(ref_mean, rel=1e-6)
    assert abs(median / ref_median - 1) <= histogram_median_rel_error()


def spread_v(n: int, spread: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.pow(10.0, -20 + spread * torch.rand(n, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("n", [1, 2, 5, 1000, 4097])
@pytest.mark.parametrize("spread", [1, 8, 24], ids=["narrow", "8_decades", "24_decades"])
@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_statistics_are_exact_and_the_median_within_its_documented_bound(n, spread, eps):
    v = spread_v(n, spread, seed=n)
    stats = rate_statistics([root_spec(v, 3e-4, eps)])
    assert_stats(stats[0], reference_rate(v, 3e-4, eps))
    assert torch.equal(stats[0], stats[1])  # one parameter: the group is the parameter


def test_group_of_parameters_with_different_scales_is_the_statistics_of_all_their_elements():
    """The group's histogram is of the rate itself, so parameters whose rates have different scales and eps (steps
    at different counts, say) combine exactly into the group's median."""
    specs, rates = [], []
    for i, (scale, eps) in enumerate([(1e-3, 1e-8), (5e-2, 1e-6), (1e-4, 0.0), (2e-3, 1e-3)]):
        v = spread_v(300 + 100 * i, 6, seed=i)
        specs.append(root_spec(v, scale, eps))
        rates.append(reference_rate(v, scale, eps))
    stats = rate_statistics(specs)
    for row, rate in zip(stats, [*rates, torch.cat(rates)]):
        assert_stats(row, rate)


def test_more_parameters_than_a_block_give_each_its_own_statistics():
    """Beyond one block of rows: every row as for the parameter alone, bit for bit, and the group over all."""
    vs = [spread_v(50 + i, 8, seed=i) for i in range(2 * BLOCK_ROWS + 5)]
    specs = [root_spec(v, 1e-3 * (1 + i % 3)) for i, v in enumerate(vs)]
    stats = rate_statistics(specs)
    alone = torch.stack([rate_statistics([s], per_group=False)[0] for s in specs])
    assert torch.equal(stats[:-1], alone)
    assert_stats(stats[-1], torch.cat([reference_rate(v, 1e-3 * (1 + i % 3), 1e-8) for i, v in enumerate(vs)]))
    only_group = rate_statistics(specs, per_parameter=False)
    assert only_group.shape == (1, 4) and torch.equal(only_group[0, [0, 1, 3]], stats[-1, [0, 1, 3]])
    torch.testing.assert_close(only_group[0, 2], stats[-1, 2])


def test_sharded_parameters_are_reduced_in_blocks_the_same_on_every_process():
    """Two "processes" in one: each holds a shard of every parameter (rank 1 an empty one of some); ``reduce`` is
    called with blocks of the same sizes in the same order on both, and what rank 0 logs is the whole parameters'
    statistics. Whole (unsharded) parameters in between are not reduced."""
    whole_vs = [spread_v(2 * BLOCK_ROWS + 3, 10, seed=100 + i) for i in range(BLOCK_ROWS + 4)]
    splits = [(v.numel(), 0) if i % 5 == 0 else (v.numel() - 7 - i, 7 + i) for i, v in enumerate(whole_vs)]
    shards = [v.split(list(s)) for v, s in zip(whole_vs, splits)]
    replicated = spread_v(40, 5, seed=7)
    tokens = ["mesh"] * 3 + [None] + ["mesh"] * (len(whole_vs) - 3)

    def specs_of(rank: int) -> list[RateSpec]:
        out = [root_spec(s[rank]) for s in shards]
        return out[:3] + [root_spec(replicated)] + out[3:]

    blocks_of_rank1: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(partials, token):
        assert token == "mesh"
        blocks_of_rank1.append((partials.ext.clone(), partials.sums.clone()))

    rate_statistics(specs_of(1), shards=tokens, reduce=record)
    sizes = []

    def combine(partials, token):
        ext, sums = blocks_of_rank1[len(sizes)]
        sizes.append(len(ext))
        assert ext.shape == partials.ext.shape  # the same block sizes in the same order as rank 1
        partials.ext[:, 0] = torch.minimum(partials.ext[:, 0], ext[:, 0])
        partials.ext[:, 1] = torch.maximum(partials.ext[:, 1], ext[:, 1])
        partials.sums.add_(sums)

    stats = rate_statistics(specs_of(0), shards=tokens, reduce=combine)
    assert sizes == [BLOCK_ROWS, len(whole_vs) - BLOCK_ROWS]
    rates = [reference_rate(v, 3e-4, 1e-8) for v in whole_vs]
    rows = stats[:3].tolist() + stats[4:-1].tolist()
    for row, rate in zip(rows, rates):
        assert_stats(torch.tensor(row), rate)
    assert_stats(stats[3], reference_rate(replicated, 3e-4, 1e-8))
    assert_stats(stats[-1], torch.cat([*rates, reference_rate(replicated, 3e-4, 1e-8)]))


def test_no_elements_give_nan_statistics_and_stay_neutral_in_a_group():
    empty, some = root_spec(torch.empty(0)), root_spec(torch.rand(10))
    stats = rate_statistics([empty, some])
    assert torch.isnan(stats[0]).all() and not torch.isnan(stats[1:]).any()
    assert torch.equal(stats[1], stats[2])


def test_a_zero_lr_gives_zero_for_every_statistic():
    """A rate of 0 falls in the first bin, whose centre is not 0: the median is kept within [min, max]."""
    stats = rate_statistics([root_spec(torch.rand(100), scale=0.0)])
    assert stats.abs().max() == 0


def test_rates_outside_the_histogram_range_land_in_the_end_bins():
    lo, hi = 2.0 ** el.RATE_EXPONENTS[0], 2.0 ** el.RATE_EXPONENTS[1]
    cpu = torch.device("cpu")

    def partials_of(rates: list[float]):
        ext, sums = empty_partials(1, cpu)
        for r in rates:  # the rate r / (0 + 1)
            accumulate_partials(RateSpec(r, 1.0, 1, el._zero_fill, cpu), ext[0], sums[0], make_scratch(1, cpu))
        return ext, sums

    ext, sums = partials_of([lo / 100, lo / 10, hi * 10, hi * 100, hi * 1000])
    hist = sums[0, 2:]
    assert hist[0] == 2 and hist[-1] == 3 and hist.sum() == 5
    # the lower median (hi * 10) is beyond the range: reported as the last bin's centre, as documented
    assert summarize_partials(ext, sums)[0, 3].item() == pytest.approx(hi, rel=0.004)
    # all beyond it: the median is kept within [min, max]
    assert summarize_partials(*partials_of([hi * 10] * 3))[0].tolist() == [hi * 10] * 4


def test_a_nan_rate_does_not_fail_the_statistics():
    v = torch.rand(100)
    v[3] = float("nan")
    stats = rate_statistics([root_spec(v)])
    assert torch.isnan(stats[0, :3]).all()  # min, max and mean say so; the count went on


def test_the_state_is_left_alone_and_the_scratch_is_used():
    v = torch.rand(100)
    before = v.clone()
    values, keys = make_scratch(100, v.device)
    values.fill_(-1.0)
    ext, sums = empty_partials(1, v.device)
    accumulate_partials(root_spec(v), ext[0], sums[0], (values, keys))
    assert torch.equal(v, before)
    assert not (values == -1.0).any()  # the work happened in the buffer the caller gave


def test_a_low_precision_state_is_summarized_in_fp32():
    v = (torch.rand(500, generator=torch.Generator().manual_seed(5)) * 1e-4).bfloat16()
    state = {"step": torch.tensor(3.0), "exp_avg_sq": v}
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
    low = rate_statistics([adam_rate(state, group)])
    high = rate_statistics([adam_rate({**state, "exp_avg_sq": v.float()}, group)])
    assert torch.equal(low, high)


def test_a_channels_last_state_is_read_without_a_copy():
    v = torch.rand(2, 3, 4, 5).to(memory_format=torch.channels_last)
    flat = el._flat(v)
    assert flat.data_ptr() == v.data_ptr() and sorted(flat.tolist()) == sorted(v.flatten().tolist())


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunks_give_the_statistics_of_the_whole_tensor(monkeypatch, chunk):
    v = spread_v(1001, 8)
    whole = empty_partials(1, v.device)
    accumulate_partials(root_spec(v), whole.ext[0], whole.sums[0], make_scratch(1001, v.device))
    monkeypatch.setattr(el, "chunk_elements", lambda device: chunk)
    chunked = empty_partials(1, v.device)
    scratch = make_scratch(el._chunk(root_spec(v)), v.device)
    assert scratch[0].numel() == min(chunk, 1001)  # the scratch never grows with the tensor
    accumulate_partials(root_spec(v), chunked.ext[0], chunked.sums[0], scratch)
    assert torch.equal(chunked.ext, whole.ext) and torch.equal(chunked.sums[:, 1:], whole.sums[:, 1:])
    torch.testing.assert_close(chunked.sums[:, 0], whole.sums[:, 0], rtol=1e-6, atol=0)  # a sum in another order


def test_index_add_counting_used_off_the_cpu_matches_bincount():
    # the accelerator path (index_add_ into fixed bins) checked against the CPU path on the same indices
    g = torch.Generator().manual_seed(6)
    idx = torch.randint(el._FIRST_BIN_BITS, el._FIRST_BIN_BITS + 50, (10_000,), generator=g, dtype=torch.int32)
    a, b = torch.zeros(el.HIST_BINS, dtype=torch.float64), torch.zeros(el.HIST_BINS, dtype=torch.float64)
    for _ in range(2):  # the counts add up across calls, as across chunks
        el._count_bins(idx.clone(), a, bincount=True)
        el._count_bins(idx.clone(), b, bincount=False)
    assert torch.equal(a, b) and a.sum() == 20_000
    assert a[15] == 2 * (idx == el._FIRST_BIN_BITS + 15).sum() and a[60] == 0
