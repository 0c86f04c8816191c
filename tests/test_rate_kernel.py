"""The fused CPU statistics pass (the C extension ``lightning_wd._rate_kernel``) against an independent, bit-exact
reference: the rates computed elementwise in torch with a correctly rounded square root, binned as documented.

The eager pass is checked against float64 references in ``test_effective_lr.py``; here the kernel is also checked
against the eager pass, which differs only where torch's CPU ``sqrt`` rounds an element's root one ulp off (on this
machine up to a sixth of the elements of a small tensor).
"""

from __future__ import annotations

import pytest
import torch

import lightning_wd.effective_lr as el
from lightning_wd.effective_lr import RateSpec, accumulate_partials, empty_partials, make_scratch, rate_statistics

pytestmark = pytest.mark.skipif(
    not el.fused_kernel_available(),
    reason="the optional C extension lightning_wd._rate_kernel was not built (no C compiler at install)",
)

CPU = torch.device("cpu")


def state_spec(u: torch.Tensor, scale: float | torch.Tensor = 3e-4, eps: float = 1e-8, root: bool = True) -> RateSpec:
    """The rate ``scale / (sqrt(u) + eps)`` (``scale / (u + eps)`` without ``root``) behind the fill the optimizer
    formulas use, which the kernel reads."""
    fill = el._root_fill(u) if root else el._copy_fill(u)
    return RateSpec(scale, eps, u.numel(), fill, u.device)


def exact_rates(u: torch.Tensor, scale: float, eps: float, root: bool = True) -> torch.Tensor:
    """fp32 rates, each operation correctly rounded: the root in float64 rounded once to fp32 is the correctly
    rounded fp32 root (53 >= 2 * 24 + 2 bits), then the fp32 add and division, which torch rounds correctly."""
    x = u.double().sqrt().float() if root else u.float()
    if eps != 0:
        x = x + torch.tensor(eps, dtype=torch.float32)
    return torch.tensor(scale, dtype=torch.float32) / x


def exact_partials(rate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """min, max and the histogram of the rates as documented (bits shifted, clamped; a NaN to the last bin)."""
    idx = torch.bitwise_right_shift(rate.view(torch.int32), el._SHIFT).clamp(el._FIRST_BIN_BITS, el._LAST_BIN_BITS)
    idx = torch.where(rate.isnan(), el._LAST_BIN_BITS, idx) - el._FIRST_BIN_BITS
    hist = torch.bincount(idx.long(), minlength=el.HIST_BINS).double()
    return torch.stack(torch.aminmax(rate)), hist


def fused(spec: RateSpec) -> el.Partials:
    ext, sums = empty_partials(1, CPU)
    assert el._accumulate_fused(spec, ext[0], sums[0])  # the kernel ran, not the eager pass
    return el.Partials(ext, sums)


def eager(spec: RateSpec) -> el.Partials:
    with el.fused_kernel_disabled():
        ext, sums = empty_partials(1, CPU)
        accumulate_partials(spec, ext[0], sums[0], make_scratch(el._chunk(spec), CPU))
    return el.Partials(ext, sums)


def spread(n: int, decades: float, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.pow(10.0, -12 + decades * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)


# sizes around the kernel's block (512), its small-tensor path (4,096) and its 16-bit counts (flushed every ~64K)
@pytest.mark.parametrize("n", [1, 15, 16, 17, 511, 513, 4095, 4096, 70_001, 300_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("root", "eps"), [(True, 1e-8), (True, 0.0), (True, 1e-3), (False, 0.0)],
                         ids=["root", "root_eps0", "root_eps_large", "copy"])
def test_kernel_is_bit_exact_against_correctly_rounded_rates(n, dtype, root, eps):
    u = spread(n, 14, seed=n, dtype=dtype)
    got = fused(state_spec(u, 3e-4, eps, root))
    rate = exact_rates(u, 3e-4, eps, root)
    ext, hist = exact_partials(rate)
    assert torch.equal(got.ext[0], ext)
    assert torch.equal(got.sums[0, 2:], hist)
    assert got.sums[0, 1] == n
    assert got.sums[0, 0].item() == pytest.approx(rate.double().sum().item(), rel=1e-6)


def test_one_bin_holding_every_element_of_a_large_tensor_counts_past_the_16_bit_tables():
    """200,003 equal rates land in one bin: the kernel's 16-bit counts are flushed before they can overflow."""
    u = torch.full((200_003,), 0.25)
    got = fused(state_spec(u, 1.0, 0.0))
    assert got.sums[0, 2:].max() == 200_003 and got.sums[0, 2:].sum() == 200_003
    assert got.ext[0].tolist() == [2.0, 2.0] and got.sums[0, 0] == 2.0 * 200_003


@pytest.mark.parametrize("n", [100, 10_000])
def test_nan_negative_and_zero_states_are_counted_as_documented(n):
    """NaN in the state, a negative state (its root a NaN), a zero state with eps = 0 (an infinite rate), and a
    rate of -0 (scale -0.0): min and max are NaN as torch.aminmax's, every NaN counts in the last bin, -0 in the
    first, and the count goes on."""
    u = spread(n, 6, seed=3)
    u[1], u[5], u[7] = float("nan"), -1.0, 0.0
    got = fused(state_spec(u, 3e-4, 0.0))
    rate = exact_rates(u, 3e-4, 0.0)
    _, hist = exact_partials(rate)
    assert torch.isnan(got.ext[0]).all() and torch.isnan(got.sums[0, 0])
    assert torch.equal(got.sums[0, 2:], hist) and got.sums[0, 1] == n
    assert hist[-1] >= 3  # the two NaNs and the infinite rate
    negative_zero = fused(state_spec(spread(n, 6), -0.0, 1e-8))
    assert negative_zero.sums[0, 2] == n and negative_zero.ext[0].tolist() == [0.0, 0.0]


def test_kernel_combines_into_a_row_that_already_holds_statistics():
    """Rows are accumulated across parameters: min, max, sums and counts combine with what the row holds."""
    a, b = spread(5000, 8, seed=1), spread(300, 3, seed=2)
    ext, sums = empty_partials(1, CPU)
    for u in (a, b):
        assert el._accumulate_fused(state_spec(u), ext[0], sums[0])
    rate = torch.cat([exact_rates(a, 3e-4, 1e-8), exact_rates(b, 3e-4, 1e-8)])
    ext_ref, hist = exact_partials(rate)
    assert torch.equal(ext[0], ext_ref) and torch.equal(sums[0, 2:], hist) and sums[0, 1] == 5300


@pytest.mark.parametrize("n", [3000, 250_000])
def test_kernel_and_eager_pass_agree_but_for_torch_roots_an_ulp_off(n):
    u = spread(n, 20, seed=n)
    spec = state_spec(u)
    k, e = fused(spec), eager(spec)
    roots = torch.sqrt(u)  # the eager pass's: torch's CPU sqrt, within an ulp of the correctly rounded one
    ulps = (roots.view(torch.int32) - u.double().sqrt().float().view(torch.int32)).abs()
    assert ulps.max() <= 1
    off = (el.effective_lr(spec) != exact_rates(u, 3e-4, 1e-8)).sum().item()
    assert off <= (ulps > 0).sum()  # only the elements whose root differs have another rate
    assert (k.sums[0, 2:] - e.sums[0, 2:]).abs().sum() <= 2 * off  # an element an ulp off may cross a bin's edge
    torch.testing.assert_close(k.ext, e.ext, rtol=2**-23, atol=0)
    torch.testing.assert_close(k.sums[0, :2], e.sums[0, :2], rtol=1e-6, atol=0)


def test_which_specs_the_kernel_takes():
    """A plain root or copy of a dense fp32 or bf16 CPU state, with host scalars; everything else goes through the
    eager pass (fp16 state, a fill of its own, a non-contiguous row of partials)."""
    ext, sums = empty_partials(1, CPU)
    u = torch.rand(10)
    assert el._accumulate_fused(state_spec(u, scale=torch.tensor(1e-3)), ext[0], sums[0])  # a CPU tensor lr
    assert el._accumulate_fused(state_spec(u.bfloat16()), ext[0], sums[0])
    assert not el._accumulate_fused(state_spec(u.half()), ext[0], sums[0])
    own = RateSpec(1e-3, 1e-8, 10, lambda a, b, out: torch.sqrt(u[a:b], out=out), CPU)
    assert not el._accumulate_fused(own, ext[0], sums[0])
    wide = empty_partials(2, CPU)
    assert not el._accumulate_fused(state_spec(u), wide.ext[:, 0], wide.sums[0])  # a column: not contiguous


def test_optimizer_formulas_reach_the_kernel_and_give_the_eager_statistics(monkeypatch):
    """Adam's and Adamax's specs from a real optimizer go through the kernel; their statistics (and their param
    group's) are the eager pass's to fp32 rounding, and the medians within their documented bound."""
    torch.manual_seed(0)
    for make in (lambda ps: torch.optim.Adam(ps, lr=1e-3), lambda ps: torch.optim.Adamax(ps, lr=2e-3)):
        net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 8))
        opt = make(net.parameters())
        for _ in range(3):
            net(torch.randn(16, 64)).square().mean().backward()
            opt.step()
        group = opt.param_groups[0]
        formula = el.adam_rate if isinstance(opt, torch.optim.Adam) else el.adamax_rate
        specs = [formula(opt.state[p], group, p) for p in group["params"]]
        assert all(isinstance(s.fill, el._StateFill) for s in specs)
        calls = []
        real = el._kernel.accumulate
        monkeypatch.setattr(el, "_kernel", type("K", (), {"accumulate": staticmethod(
            lambda *a: calls.append(a[1]) or real(*a))}))
        with_kernel = rate_statistics(specs)
        assert calls == [s.numel for s in specs]
        monkeypatch.undo()
        with el.fused_kernel_disabled():
            without = rate_statistics(specs)
        # min and max within an ulp (torch's sqrt), the means to fp32 rounding
        torch.testing.assert_close(with_kernel[:, :3], without[:, :3], rtol=1e-6, atol=0)
        rates = [el.effective_lr(s).double() for s in specs]
        for row, rate in zip(with_kernel, [*rates, torch.cat(rates)]):  # the medians against the exact ones
            exact = torch.sort(rate).values[(rate.numel() - 1) // 2].item()
            assert abs(row[3].item() / exact - 1) <= el.histogram_median_rel_error()


def test_no_scratch_is_made_where_the_kernel_takes_every_spec(monkeypatch):
    made = []
    real = el.make_scratch
    monkeypatch.setattr(el, "make_scratch", lambda n, d: made.append(n) or real(n, d))
    u = spread(5000, 8)
    rate_statistics([state_spec(u), state_spec(u[:100])])
    assert made == []
    own = RateSpec(3e-4, 1e-8, 100, lambda a, b, out: torch.sqrt(u[a:b], out=out), CPU)  # the eager pass's
    stats = rate_statistics([state_spec(u), own])
    assert made == [5000]  # one scratch, for the largest chunk of the group, made at the first spec that needs it
    rate = exact_rates(u, 3e-4, 1e-8)
    assert stats[0, 0] == rate.min() and stats[0, 1] == rate.max()
