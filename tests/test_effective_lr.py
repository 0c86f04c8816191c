"""The effective-lr formulas against the optimizers' real updates, and the streamed statistics against exact ones."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import KernelOps

import lightning_wd.effective_lr as el
from lightning_wd.effective_lr import (
    BLOCK_ROWS,
    accumulate_partials,
    effective_lr,
    empty_partials,
    histogram_median_rel_error,
    make_scratch,
    rate_statistics,
    summarize_partials,
)
from lightning_wd.optimizers import formula_for
from lightning_wd.optimizers import torch_rates as tr
from lightning_wd.optimizers.torch_rates import adafactor_rate, adam_rate
from lightning_wd.rates import RateSpec, flat_view, stepwise, zero_fill

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


def nadam_numerator(opt, w, grad) -> torch.Tensor:
    """NAdam's ``(1 - mu_t) / (1 - prod mu) * grad + mu_{t+1} / (1 - prod mu * mu_{t+1}) * m``, from torch's
    documented momentum schedule ``mu_t = beta1 * (1 - 0.5 * 0.96^(t * psi))``."""
    state, group = opt.state[w], opt.param_groups[0]
    t, beta1, psi = float(state["step"]), group["betas"][0], group["momentum_decay"]
    mu, mu_next = (beta1 * (1 - 0.5 * 0.96 ** (k * psi)) for k in (t, t + 1))
    prod = float(state["mu_product"])
    return (1 - mu) / (1 - prod) * grad + mu_next / (1 - prod * mu_next) * state["exp_avg"]


# name -> (optimizer, what the rate multiplies in the update: fn(opt, w, grad))
UPDATES = {
    "adam": (lambda p: torch.optim.Adam(p, lr=5e-2, betas=(0.8, 0.95)), bias_corrected_m),
    "amsgrad": (lambda p: torch.optim.Adam(p, lr=5e-2, betas=(0.8, 0.95), amsgrad=True), bias_corrected_m),
    "adamw_wd0": (lambda p: torch.optim.AdamW(p, lr=5e-2, weight_decay=0.0), bias_corrected_m),
    "nadam": (lambda p: torch.optim.NAdam(p, lr=5e-2), nadam_numerator),
    "nadam_decoupled": (lambda p: torch.optim.NAdam(p, lr=5e-2, decoupled_weight_decay=True), nadam_numerator),
    "radam": (lambda p: torch.optim.RAdam(p, lr=5e-2, betas=(0.9, 0.95)), bias_corrected_m),
    "adamax": (lambda p: torch.optim.Adamax(p, lr=5e-2), bias_corrected_m),
    "rmsprop": (lambda p: torch.optim.RMSprop(p, lr=1e-2), lambda opt, w, g: g),
    "rmsprop_centered": (lambda p: torch.optim.RMSprop(p, lr=1e-2, centered=True), lambda opt, w, g: g),
    "adagrad": (lambda p: torch.optim.Adagrad(p, lr=5e-2, lr_decay=0.1), lambda opt, w, g: g),
}


# float64: the update exactly, to the fp32 rounding of the rate. fp32 (the fills' fast path): ``p_before - p_after``
# is a difference of numbers 100x larger than it, each rounded to half an fp32 ulp of |p|, hence the atol
TOLERANCES = {torch.float64: {"rtol": 2e-6, "atol": 1e-12}, torch.float32: {"rtol": 1e-4, "atol": None}}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(UPDATES))
def test_rate_times_what_it_multiplies_is_the_real_update(name, dtype):
    """``p_before - p_after == rate * m`` elementwise at every step (no weight decay), ``m`` the bias-corrected first
    moment (NAdam: its momentum-weighted numerator) or the gradient, computed here from the state; for RAdam the
    steps cover both sides of its rectification (``rho_t > 5`` from step 6 with beta2 = 0.95)."""
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


def test_radam_before_rectification_is_lr_for_every_element():
    w = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
    opt = torch.optim.RAdam([w], lr=3e-2)  # beta2 = 0.999: rho_t <= 5 for the first steps
    w.grad = torch.randn(10, dtype=torch.float64)
    opt.step()
    rate = effective_lr(formula_for(opt)[1].spec(opt.state[w], opt.param_groups[0], w))
    assert torch.equal(rate, torch.full((10,), 3e-2))


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5), (7,)], ids=["matrix", "batch_of_matrices", "vector"])
def test_adafactor_rate_times_grad_is_the_update_given_rms_before_the_step(shape):
    """Adafactor's update is ``rate * grad`` exactly when its relative step size uses RMS(p) before the step, as
    torch's does; with the parameter after the step (what the monitor has), the rate is off by exactly
    ``RMS(p_after) / RMS(p_before)``. Update clipping is off (``d`` large) and so is weight decay."""
    w = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    opt = torch.optim.Adafactor([w], lr=5e-2, d=1e9)
    changes = []
    for g in grads(shape, 6):
        w.grad = g
        before = w.detach().clone()
        opt.step()
        state, group = opt.state[w], opt.param_groups[0]
        moved = before - w.detach()
        exact = effective_lr(adafactor_rate(state, group, before)).double().view(shape)
        torch.testing.assert_close(moved, exact * g, rtol=2e-6, atol=1e-12)
        after = effective_lr(adafactor_rate(state, group, w)).double().view(shape)
        ratio = torch.linalg.vector_norm(w.detach()) / torch.linalg.vector_norm(before)
        torch.testing.assert_close(after, exact * ratio, rtol=2e-6, atol=0)
        changes.append(abs(ratio.item() - 1))
    assert max(changes) > 1e-4  # RMS(p) moved enough for the comparisons to tell before from after


def test_adafactor_eps1_floor_and_eps2_floor_are_in_the_rate():
    """Gradients so small that ``v_est < eps1^2`` (the rate is ``alpha / eps1``) and a parameter so small that
    ``RMS(p) < eps2`` (``alpha = eps2 * rho_t``, whichever p the monitor measures)."""
    w = torch.nn.Parameter(torch.full((4, 3), 1e-3, dtype=torch.float64))
    opt = torch.optim.Adafactor([w], lr=1e-2, eps=(1e-3, 1.0), d=1e9)
    for g in grads(w.shape, 4):
        w.grad = g * 1e-5
        before = w.detach().clone()
        opt.step()
        state, group = opt.state[w], opt.param_groups[0]
        rate = effective_lr(adafactor_rate(state, group, w)).double().view_as(w)
        torch.testing.assert_close(before - w.detach(), rate * w.grad, rtol=2e-6, atol=0)
        assert torch.equal(rate, torch.full_like(rate, rate[0, 0].item()))  # alpha / eps1 for every element


def test_adafactor_rate_with_a_tensor_lr_or_a_device_step_is_that_of_floats(monkeypatch):
    """``min(lr, 1/sqrt(t))`` taken on tensors without reading them on the host."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.Adafactor([w], lr=0.3)  # above 1/sqrt(t) for t >= 12, below it before
    for g in grads(w.shape, 14):
        w.grad = g.float()
        opt.step()
        state, group = opt.state[w], opt.param_groups[0]
        floats = effective_lr(adafactor_rate(state, group, w))
        tensor_lr = effective_lr(adafactor_rate(state, {**group, "lr": torch.tensor(0.3)}, w))
        with monkeypatch.context() as m:
            m.setattr(tr, "step_count", lambda state: state["step"])
            device_step = effective_lr(adafactor_rate(state, group, w))
        torch.testing.assert_close(tensor_lr, floats, rtol=1e-6, atol=0)
        torch.testing.assert_close(device_step, floats, rtol=1e-6, atol=0)


def test_adafactor_rate_built_in_chunks_of_rows_is_built_whole(monkeypatch):
    """The factored second moment made chunk by chunk (chunks of whole rows, across the matrices of a batch) equals
    torch's ``var_estimate`` of the whole parameter."""
    w = torch.nn.Parameter(torch.randn(3, 4, 5))
    opt = torch.optim.Adafactor([w], lr=1e-2)
    for g in grads(w.shape, 3):
        w.grad = g.float()
        opt.step()
    state, group = opt.state[w], opt.param_groups[0]
    whole = effective_lr(adafactor_rate(state, group, w))
    whole_stats = rate_statistics([adafactor_rate(state, group, w)], per_group=False)[0]
    eps1 = torch.finfo(torch.float32).eps
    var = (state["row_var"] @ state["col_var"]).div_(state["row_var"].mean(dim=-2, keepdim=True).clamp_(min=eps1))
    alpha = max(1e-3, w.detach().norm().item() / math.sqrt(w.numel())) * min(1e-2, 1 / math.sqrt(3))
    torch.testing.assert_close(whole, alpha * var.clamp(min=eps1 * eps1).rsqrt().flatten(), rtol=1e-6, atol=0)
    for chunk in (1, 7, 22):  # less than a row (5), a row and a bit, parts of two matrices (20 elements each)
        monkeypatch.setattr(el, "chunk_elements", lambda device, chunk=chunk: chunk)
        spec = adafactor_rate(state, group, w)
        assert el._chunk(spec) == max(5, chunk - chunk % 5)
        stats = rate_statistics([spec], per_group=False)[0]
        assert torch.equal(stats[[0, 1, 3]], whole_stats[[0, 1, 3]])
        torch.testing.assert_close(stats[2], whole_stats[2])
        assert stats[0] == whole.min() and stats[1] == whole.max()


def test_sparse_adam_rate_times_m_hat_is_the_update_of_the_rows_it_moves():
    emb = torch.nn.Embedding(10, 4, sparse=True).double()
    opt = torch.optim.SparseAdam(emb.parameters(), lr=5e-2)
    w = emb.weight
    for step, rows in enumerate(([1, 2, 3], [2, 5], [0, 2, 9], [5, 6])):
        opt.zero_grad()
        emb(torch.tensor(rows)).mul(torch.randn(len(rows), 4, dtype=torch.float64) * (step + 1)).sum().backward()
        before = w.detach().clone()
        opt.step()
        rate = effective_lr(formula_for(opt)[1].spec(opt.state[w], opt.param_groups[0], w))
        expected = rate.double().view_as(w) * bias_corrected_m(opt, w)
        moved = before - w.detach()
        torch.testing.assert_close(moved[rows], expected[rows], rtol=2e-6, atol=1e-12)
        assert torch.count_nonzero(moved) == 4 * len(rows)


def test_a_device_step_gives_the_rate_of_a_host_step(monkeypatch):
    """``capturable``/``fused`` optimizers keep ``step`` on the device; the formulas then compute on the device,
    RAdam choosing its branch there. Simulated on the CPU by handing the formulas the step tensor itself."""
    w = torch.nn.Parameter(torch.randn(30))
    opts = {"torch.optim.Adam": torch.optim.Adam([w], lr=1e-2, amsgrad=True),
            "torch.optim.RAdam": torch.optim.RAdam([w], lr=1e-2, betas=(0.9, 0.95))}
    for key, opt in opts.items():
        for t, g in enumerate(grads(w.shape, 8)):
            w.grad = g.float()
            opt.step()
            state, group = opt.state[w], opt.param_groups[0]
            spec_of = formula_for(opt)[1].spec
            host = effective_lr(spec_of(state, group, w))
            with monkeypatch.context() as m:
                m.setattr(tr, "step_count", lambda state: state["step"])
                spec = spec_of(state, group, w)
                assert isinstance(spec.scale, torch.Tensor)
                device = effective_lr(spec)
            torch.testing.assert_close(device, host, rtol=1e-6, atol=0)


def test_every_torch_optimizer_has_an_entry_and_subclasses_take_their_base_entry():
    public = {name for name in dir(torch.optim)
              if isinstance(getattr(torch.optim, name), type) and issubclass(getattr(torch.optim, name),
                                                                             torch.optim.Optimizer)}
    for name in public - {"Optimizer"}:
        found = formula_for(getattr(torch.optim, name))
        assert found is not None and found[0] is getattr(torch.optim, name), name  # its own entry, not a base's

    class MyAdam(torch.optim.Adam):
        pass

    class Custom(torch.optim.Optimizer):
        pass

    p = [torch.nn.Parameter(torch.zeros(1))]
    assert formula_for(MyAdam(p))[0] is torch.optim.Adam
    assert formula_for(torch.optim.AdamW(p))[0] is torch.optim.AdamW  # the class itself before its base, Adam
    assert formula_for(torch.optim.SGD(p, lr=0.1))[1].spec is None
    assert formula_for(Custom(p, {})) is None


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
    """The group's histogram is of the rate itself, so parameters whose rates have different scales and eps (as
    Adafactor's relative step sizes, or steps at different counts) combine exactly into the group's median."""
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
            accumulate_partials(RateSpec(r, 1.0, 1, zero_fill, cpu), ext[0], sums[0], make_scratch(1, cpu))
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
    scratch = make_scratch(100, v.device)
    scratch.fill_(-1.0)
    ext, sums = empty_partials(1, v.device)
    accumulate_partials(root_spec(v), ext[0], sums[0], scratch)
    assert torch.equal(v, before)
    assert not (scratch == -1.0).any()  # the work happened in the buffer the caller gave


def test_a_low_precision_state_is_summarized_in_fp32():
    v = (torch.rand(500, generator=torch.Generator().manual_seed(5)) * 1e-4).bfloat16()
    state = {"step": torch.tensor(3.0), "exp_avg_sq": v}
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
    low = rate_statistics([adam_rate(state, group)])
    high = rate_statistics([adam_rate({**state, "exp_avg_sq": v.float()}, group)])
    assert torch.equal(low, high)


def test_a_channels_last_state_is_read_without_a_copy():
    v = torch.rand(2, 3, 4, 5).to(memory_format=torch.channels_last)
    flat = flat_view(v)
    assert flat.data_ptr() == v.data_ptr() and sorted(flat.tolist()) == sorted(v.flatten().tolist())


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunks_give_the_statistics_of_the_whole_tensor(monkeypatch, chunk):
    v = spread_v(1001, 8)
    whole = empty_partials(1, v.device)
    accumulate_partials(root_spec(v), whole.ext[0], whole.sums[0], make_scratch(1001, v.device))
    monkeypatch.setattr(el, "chunk_elements", lambda device: chunk)
    chunked = empty_partials(1, v.device)
    scratch = make_scratch(el._chunk(root_spec(v)), v.device)
    assert scratch.numel() == min(chunk, 1001)  # the scratch never grows with the tensor
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


# --- a group's bias corrections at once ------------------------------------------------------------------------------
def test_stepwise_runs_the_ops_once_for_the_device_steps():
    """Host steps one by one, device steps (tensors) stacked into one call: each gets fn's numbers, as 0-dim
    views of the group's results."""
    calls = []

    def fn(t):
        calls.append(t)
        return 1 - torch.pow(0.999, t.double()) if isinstance(t, torch.Tensor) else 1 - 0.999**t, t * 2

    steps = [3.0, torch.tensor(5.0), torch.tensor(7.0), 2.0, torch.tensor(11.0)]
    got = stepwise(steps, fn)
    assert len(calls) == 3 and calls[2].shape == (3,)
    for t, (bc, twice) in zip(steps, got):
        if isinstance(t, torch.Tensor):
            assert bc.dim() == 0 and torch.equal(bc, 1 - torch.pow(0.999, t.double())) and torch.equal(twice, t * 2)
        else:
            assert (bc, twice) == (1 - 0.999**t, t * 2)


@pytest.mark.parametrize(("amsgrad", "lr"), [(False, 3e-4), (True, 3e-4), (False, ()), (False, (1,)), (False, (1, 1))],
                         ids=["float", "amsgrad", "lr-0-dim", "lr-1", "lr-1x1"])
def test_adam_rates_of_device_steps_are_each_parameters_own(monkeypatch, amsgrad, lr):
    """With the steps on the device (a fused or capturable Adam on a GPU; here the CPU tensors are taken as such),
    the specs of a whole group: each scale and eps bit for bit those of the parameter alone (also for a tensor lr,
    of any one-element shape torch takes, taken as 0-dim), a parameter not stepped yet ``None``, and the tensor ops
    as many for 24 parameters as for 3."""
    monkeypatch.setattr(tr, "step_count", lambda state: state["step"])
    lr = torch.full(lr, 3e-4) if isinstance(lr, tuple) else lr
    lr0 = lr.reshape(()) if isinstance(lr, torch.Tensor) else lr

    def group_of(n):
        torch.manual_seed(n)
        params = [torch.nn.Parameter(torch.randn(5)) for _ in range(n)]
        opt = torch.optim.Adam(params, lr=lr, eps=1e-7, betas=(0.9, 0.95), amsgrad=amsgrad, foreach=False)
        for k in range(3):
            for i, p in enumerate(params[:-1]):  # the last one is never stepped
                p.grad = torch.randn(5) if k <= i % 3 else None
            opt.step()
        return opt, params

    ops = []
    for n in (3, 24):
        opt, params = group_of(n)
        group, states = opt.param_groups[0], [opt.state[p] for p in params]
        counter = KernelOps()
        with counter:
            specs = tr.adam_rates(states, group, params)
        ops.append(counter.count)
        assert specs[-1] is None
        steps = {float(s["step"]) for s in states[:-1]}
        assert len(steps) > 1  # parameters at different steps in one group
        for state, spec in zip(states[:-1], specs[:-1]):
            root_bc2 = (1 - torch.pow(0.95, state["step"].double())).sqrt()
            assert spec.scale.shape == () and torch.equal(spec.scale, lr0 * root_bc2)
            assert spec.scale.dtype == (lr0 * root_bc2).dtype and torch.equal(spec.eps, 1e-7 * root_bc2)
            alone = tr.adam_rate(state, group)
            assert alone.scale.shape == () and torch.equal(el.effective_lr(spec), el.effective_lr(alone))
    assert ops[0] == ops[1]


def test_stepwise_stacks_only_steps_of_one_dtype_and_checks_what_fn_gives():
    """Steps of two dtypes are not stacked together (an int64 4097 beside bf16 steps would round to 4096); a
    result of another shape than one value per step is refused by name."""
    steps = [torch.tensor(4097), torch.tensor(3.0, dtype=torch.bfloat16), torch.tensor(5.0, dtype=torch.bfloat16),
             torch.tensor(4099)]
    got = stepwise(steps, lambda t: (t * 1,))
    assert [r.item() for r, in got] == [4097, 3.0, 5.0, 4099] and got[0][0].dtype == torch.int64
    with pytest.raises(ValueError, match=r"shape \(1, 2\) for 2 steps"):
        stepwise(steps[1:3], lambda t: (t.reshape(1, -1),))
    shared = torch.tensor(7.0)
    assert all(r is shared for r, in stepwise(steps[1:3], lambda t: (shared,)))


def test_the_formulas_old_import_path_still_works_and_names_the_new_one():
    """A registration written against ``lightning_wd.effective_lr`` (where ``Formula`` and the formulas lived before
    they moved to :mod:`lightning_wd.rates` and :mod:`lightning_wd.optimizers.torch_rates`) gets the same objects,
    with a ``DeprecationWarning`` naming where they are now; an unknown name is still an AttributeError."""
    from lightning_wd import rates
    from lightning_wd.optimizers import torch_rates

    for name, module in (("Formula", rates), ("root_rate", rates), ("stepwise", rates), ("adam_rate", torch_rates),
                         ("radam_rate", torch_rates)):
        with pytest.warns(DeprecationWarning, match=rf"{name} has moved to {module.__name__}\.{name}"):
            assert getattr(el, name) is getattr(module, name)
    with pytest.warns(DeprecationWarning, match="lightning_wd.rates.Formula"):
        from lightning_wd.effective_lr import Formula
    assert Formula is rates.Formula
    with pytest.warns(DeprecationWarning, match="fused_kernel_reads is now fused_kernel_takes"):
        assert el.fused_kernel_reads is el.fused_kernel_takes
    with pytest.raises(AttributeError, match="no_such_thing"):
        el.no_such_thing  # noqa: B018
