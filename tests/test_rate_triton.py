"""The Triton statistics pass (``lightning_wd.rate_triton``) against an independent reference: the rates computed in
NumPy with every operation correctly rounded (the root in float64 rounded once to fp32, then the fp32 add and
division), min and max of those, the mean from a float64 sum, and the lower median's histogram bin by the
documented rule (the fp32 bits shifted, clamped to the bins).

Without a GPU the kernels run in Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), on CPU
tensors; sizes are kept small. With one, the same tests run the compiled kernels on CUDA tensors, and a few more
compare them with the eager torch pass on the same device, which rounds the same way: there all four statistics
must agree (the mean to fp32 rounding).
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import lightning_wd.effective_lr as el  # noqa: E402
from lightning_wd import rate_triton as rt  # noqa: E402
from lightning_wd.effective_lr import MANTISSA_BITS, RATE_EXPONENTS, Partials, rate_statistics  # noqa: E402
from lightning_wd.optimizers import torch_rates as tr  # noqa: E402
from lightning_wd.rate_triton import TILE, triton_accepts, triton_rate_statistics, triton_stages  # noqa: E402
from lightning_wd.rates import RateSpec, copy_fill, root_fill  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
INTERPRET = not CUDA  # CPU states are taken only under the interpreter

# the histogram as documented: 2**MANTISSA_BITS bins per power of two over [2**lo, 2**hi), read off the fp32 bits
SHIFT = 23 - MANTISSA_BITS
FIRST = (RATE_EXPONENTS[0] + 127) << MANTISSA_BITS
LAST = FIRST + ((RATE_EXPONENTS[1] - RATE_EXPONENTS[0]) << MANTISSA_BITS) - 1
#: elements that make the programs of a grid loop more than once (the grid is capped)
WRAP = (rt._max_programs(DEVICE) + 1) * TILE + 77


# --- the reference ------------------------------------------------------------------------------------------------
def reference_rates(u: torch.Tensor, scale: float | torch.Tensor, eps: float | torch.Tensor, root: bool = True
                    ) -> np.ndarray:
    """fp32 rates, each operation correctly rounded: a root in float64 rounded once to fp32 is the correctly rounded
    fp32 root (53 >= 2 * 24 + 2 bits); the scalars rounded to fp32 as torch rounds them; eps added unless it is a
    host 0 (which keeps the rate of a -0.0 root at -inf)."""
    x = u.detach().cpu().double().numpy()
    x = (np.sqrt(x) if root else x).astype(np.float32)
    s = np.float32(float(scale))
    with np.errstate(all="ignore"):
        if isinstance(eps, torch.Tensor) or eps != 0:
            x = x + np.float32(float(eps))
        return s / x


def reference_stats(rates: np.ndarray) -> np.ndarray:
    """``[min, max, mean, median]`` of fp32 rates as documented: exact min and max (NaN if any is), the mean of
    the float64 sum, the median at the geometric centre of the lower median's bin, clamped to ``[min, max]``."""
    n = rates.size
    if n == 0:
        return np.full(4, np.nan, dtype=np.float32)
    mn, mx = np.min(rates), np.max(rates)
    mean = rates.astype(np.float64).sum() / n
    bins = np.clip(rates.view(np.int32) >> SHIFT, FIRST, LAST)
    b = np.sort(bins)[(n - 1) // 2]
    low, high = (np.array([(b + i) << SHIFT], dtype=np.int32).view(np.float32).astype(np.float64)[0] for i in (0, 1))
    median = np.sqrt(low * high)
    median = np.nan if np.isnan(mn) or np.isnan(mx) else min(max(median, float(mn)), float(mx))
    return np.array([mn, mx, mean, median], dtype=np.float32)


def reference(groups: list[np.ndarray], per_parameter: bool = True, per_group: bool = True,
              buckets: list[int | None] | None = None, n_buckets: int = 0) -> torch.Tensor:
    """The rows of ``rate_statistics``: each parameter's, each bucket's (its parameters' rates together), the
    group's."""
    rows = [reference_stats(r) for r in groups] if per_parameter else []
    for b in range(n_buckets):
        members = [r for r, k in zip(groups, buckets) if k == b]
        rows.append(reference_stats(np.concatenate(members) if members else np.zeros(0, np.float32)))
    if per_group:
        rows.append(reference_stats(np.concatenate(groups) if groups else np.zeros(0, np.float32)))
    return torch.from_numpy(np.stack(rows))


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    """min, max and median exactly (NaN where the reference has NaN), the mean to 1e-6."""
    got = got.cpu()
    assert got.dtype == torch.float32 and got.shape == want.shape
    for col in (0, 1, 3):
        torch.testing.assert_close(got[:, col], want[:, col], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got[:, 2], want[:, 2], rtol=1e-6, atol=0, equal_nan=True)


def spec_of(u: torch.Tensor, scale: float | torch.Tensor = 3e-4, eps: float | torch.Tensor = 1e-8,
            root: bool = True) -> RateSpec:
    """The rate of state ``u`` behind the fill the optimizer formulas use (a root, or a copy as Adamax's)."""
    fill = root_fill(u) if root else copy_fill(u)
    return RateSpec(scale, eps, u.numel(), fill, u.device)


def spread(n: int, decades: float = 14, seed: int = 0, dtype: torch.dtype = torch.float32, low: float = -12
           ) -> torch.Tensor:
    """``n`` states log-uniform over ``decades`` decades from ``10**low``, on the test device."""
    g = torch.Generator().manual_seed(seed)
    return torch.pow(10.0, low + decades * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)


def eager_pass() -> contextlib.AbstractContextManager:
    """The torch-ops pass of ``rate_statistics``, its fused kernels switched off (``fused_kernel_disabled``, where
    the module has it: on a GPU ``rate_statistics`` may dispatch to the code under test)."""
    return getattr(el, "fused_kernel_disabled", contextlib.nullcontext)()


# --- every size, dtype and fill against the reference -------------------------------------------------------------
SIZES = [0, 1, 2, TILE - 1, TILE, TILE + 1, 3 * TILE + 5, WRAP]
FILLS = {  # root, scale, eps
    "root": (True, 3e-4, 1e-8),
    "root_eps0": (True, 1e-3, 0.0),
    "root_eps_large": (True, 2e-3, 1e-3),
    "copy": (False, 1e-3, 0.0),
}


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# every size with Adam's fill, every dtype and fill at a few sizes (the interpreter is slow)
CASES = sorted({(n, torch.float32, "root") for n in SIZES}
               | {(n, d, f) for n in (1, TILE + 1, WRAP) for d in DTYPES for f in FILLS}, key=str)


@pytest.mark.parametrize(("n", "dtype", "fill"), CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_statistics_match_the_reference(n, dtype, fill):
    """The parameter's row and the group's (here the same elements): fp16 states of ~1e-12 underflow to 0 and give
    the rate scale / eps (or +inf with eps 0), so zeros are covered too."""
    root, scale, eps = FILLS[fill]
    u = spread(n, seed=n, dtype=dtype)
    got = triton_rate_statistics([spec_of(u, scale, eps, root)])
    assert got.device == u.device
    assert_matches(got, reference([reference_rates(u, scale, eps, root)]))


def test_several_parameters_of_different_sizes_and_medians():
    """Three parameters whose rates lie in different decades (and a fourth of no elements, a NaN row): the group's
    median is that of all their elements, in another bin than any parameter's."""
    us = [spread(3000, 2, seed=1, low=-8), spread(TILE + 3, 2, seed=2, low=-6), spread(700, 2, seed=3, low=-4),
          spread(0)]
    got = triton_rate_statistics([spec_of(u) for u in us])
    want = reference([reference_rates(u, 3e-4, 1e-8) for u in us])
    assert_matches(got, want)
    assert torch.isnan(got[3]).all()
    assert all(got[-1, 3] != got[i, 3] for i in range(3))  # the group's median is its own


def test_special_states():
    """Zeros (rate scale / eps), -0.0 (its root -0.0: with eps 0 the rate is -inf, as torch's), +inf (rate 0),
    negative states (a NaN root, or a negative rate for a copy), and NaN: min, max and median are exact, and a
    parameter that holds a NaN gives NaN (as torch.aminmax), which spreads to the group's row and to no other."""
    base = spread(5000, 10, seed=7)
    zeros, neg_zero, inf, neg = base.clone(), base.clone(), base.clone(), base.clone()
    zeros[::3] = 0.0
    neg_zero[1::4] = -0.0
    inf[::7] = float("inf")
    neg[::5] = -1e-6
    nan = base.clone()
    nan[17] = float("nan")
    cases = [(zeros, True, 1e-8), (zeros, True, 0.0), (neg_zero, True, 0.0), (neg_zero, False, 0.0),
             (neg_zero, True, 1e-8), (inf, True, 1e-8), (neg, False, 0.0)]
    specs = [spec_of(u, 3e-4, eps, root) for u, root, eps in cases]
    rates = [reference_rates(u, 3e-4, eps, root) for u, root, eps in cases]
    assert_matches(triton_rate_statistics(specs), reference(rates))
    assert np.isneginf(rates[2]).any() and np.isinf(rates[1]).any()  # the cases hold what they claim
    assert np.isnan(reference_rates(neg, 3e-4, 1e-8)).any()
    with_nan = triton_rate_statistics([*specs, spec_of(nan)]).cpu()
    assert torch.isnan(with_nan[-2]).all() and torch.isnan(with_nan[-1]).all()
    assert not torch.isnan(with_nan[:-2]).any()
    root_of_negative = triton_rate_statistics([spec_of(neg, 3e-4, 1e-8)]).cpu()  # sqrt of a negative state: NaN
    assert torch.isnan(root_of_negative).all()


def test_one_bin_holds_most_elements():
    """Adam's rates cluster: 90% of the elements in one bin, the rest spread; the median is that bin's."""
    u = spread(2 * TILE + 100, 8, seed=11)
    u[: int(0.9 * u.numel())] = 1e-6
    got = triton_rate_statistics([spec_of(u)])
    assert_matches(got, reference([reference_rates(u, 3e-4, 1e-8)]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_scale_and_eps_as_device_tensors(dtype):
    """0-dim tensors (a capturable step's bias correction): read by the kernel, rounded to fp32 as torch rounds
    them; a tensor eps of 0 is added, as torch adds it, so a -0.0 root gives +inf where a host 0 gives -inf."""
    u = spread(1500, seed=5)
    u[::10] = -0.0
    scale = torch.tensor(1e-3 / 0.7, dtype=dtype, device=DEVICE)
    specs = [spec_of(u, scale, torch.tensor(1e-8, dtype=dtype, device=DEVICE)),
             spec_of(u, scale, torch.tensor(0.0, dtype=dtype, device=DEVICE)),
             spec_of(u, scale, 0.0)]
    rates = [reference_rates(u, s.scale, s.eps) for s in specs]
    got = triton_rate_statistics(specs)
    assert_matches(got, reference(rates))
    assert got[1, 1] == float("inf") and got[2, 0] == float("-inf")


@pytest.mark.parametrize(("per_parameter", "per_group"), [(True, False), (False, True)])
def test_rows_asked_for(per_parameter, per_group):
    us = [spread(n, 3, seed=n, low=-9 + n % 5) for n in (10, 900, 2 * TILE + 1, 0, 33)]
    got = triton_rate_statistics([spec_of(u) for u in us], per_parameter, per_group)
    assert got.shape == ((len(us) if per_parameter else 0) + per_group, 4)
    assert_matches(got, reference([reference_rates(u, 3e-4, 1e-8) for u in us], per_parameter, per_group))


def test_a_state_that_starts_one_element_into_its_buffer():
    """A view whose first element is not aligned to 16 bytes: accepted, and read from where it starts."""
    buf = spread(TILE + 40, seed=9)
    u = buf[1:]
    assert u.data_ptr() % 16 != 0
    spec = spec_of(u)
    assert triton_accepts(spec, interpret=INTERPRET)
    assert_matches(triton_rate_statistics([spec]), reference([reference_rates(u, 3e-4, 1e-8)]))


def test_a_real_optimizer_state():
    """Adam's and Adamax's specs, as the monitor builds them from a stepped optimizer."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 3)).to(DEVICE)
    for opt, formula in ((torch.optim.Adam(net.parameters(), lr=1e-3), tr.adam_rate),
                         (torch.optim.Adamax(net.parameters(), lr=2e-3), tr.adamax_rate)):
        for _ in range(3):
            net(torch.randn(16, 24, device=DEVICE)).square().mean().backward()
            opt.step()
        group = opt.param_groups[0]
        specs = [formula(opt.state[p], group, p) for p in group["params"]]
        assert all(triton_accepts(s, interpret=INTERPRET) for s in specs)
        rates = [reference_rates(s.fill.flat, s.scale, s.eps, s.fill.root) for s in specs]
        assert_matches(triton_rate_statistics(specs), reference(rates))


# --- buckets (module aggregates) ---------------------------------------------------------------------------------
def bucketed_states() -> tuple[list[torch.Tensor], list[int | None]]:
    """Parameters in decades apart, in buckets whose medians differ from their parameters' and the group's (and
    some that share theirs): every way an element's octave can match the row's, the bucket's and the group's."""
    lows = [-10, -9, -4, -7, -7, -6, -2, -7]
    us = [spread(300 + 150 * k, 1.5, seed=k, low=lo) for k, lo in enumerate(lows)]
    us[4] = spread(0)
    return us, [0, 0, 0, None, 1, 1, 3, 1]  # bucket 2 holds nothing


@pytest.mark.parametrize(("per_parameter", "per_group"), [(True, True), (True, False), (False, True), (False, False)])
def test_buckets(per_parameter, per_group):
    us, buckets = bucketed_states()
    got = triton_rate_statistics([spec_of(u) for u in us], per_parameter, per_group, buckets=buckets, n_buckets=4)
    want = reference([reference_rates(u, 3e-4, 1e-8) for u in us], per_parameter, per_group, buckets, 4)
    assert_matches(got, want)
    if per_parameter and per_group:  # the data make the targets' medians differ, as claimed
        bucket_rows = got[len(us) : len(us) + 4]
        assert torch.isnan(bucket_rows[2]).all()
        assert bucket_rows[0, 3] not in (got[0, 3], got[1, 3], got[2, 3], got[-1, 3])


def test_a_nan_spreads_to_its_bucket_and_the_group_only():
    us = [spread(50, seed=k) for k in range(4)]
    us[2][7] = float("nan")
    got = triton_rate_statistics([spec_of(u) for u in us], buckets=[0, 0, 1, 1], n_buckets=2).cpu()
    assert got.isnan().all(1).tolist() == [False, False, True, False, False, True, True]


def test_buckets_of_sharded_rows_and_more_than_a_block():
    n_specs = el.BLOCK_ROWS + 5
    us = [spread(20 + 9 * i, 2, seed=i, low=-10 + i % 7) for i in range(n_specs)]
    buckets = [i % 3 if i % 4 else None for i in range(n_specs)]
    tokens = ["fsdp" if i % 2 else None for i in range(n_specs)]
    reduce = Recorder()
    got = triton_rate_statistics([spec_of(u) for u in us], shards=tokens, reduce=reduce, buckets=buckets,
                                 n_buckets=3)
    assert_matches(got, reference([reference_rates(u, 3e-4, 1e-8) for u in us], buckets=buckets, n_buckets=3))
    assert [c[1] for c in reduce.calls] == [2 + (1 << MANTISSA_BITS), 3 << MANTISSA_BITS]


def test_bucket_arguments():
    spec = spec_of(spread(8))
    with pytest.raises(ValueError, match="buckets"):
        triton_rate_statistics([spec], buckets=[0, 1], n_buckets=2)
    with pytest.raises(ValueError, match="buckets"):
        triton_rate_statistics([spec], buckets=[2], n_buckets=2)


# --- against the eager pass ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5000, WRAP])
def test_eager_pass_agrees(n):
    """On a CPU torch's ``sqrt`` is not correctly rounded (an ulp off on about a fifth of the elements), so min and
    max may be an ulp apart and the median a bin; on a GPU both round correctly and must agree."""
    us = [spread(n, 20, seed=n), spread(n // 3, 4, seed=1, dtype=torch.bfloat16), spread(n // 2, 3, seed=2)]
    specs = [spec_of(us[0]), spec_of(us[1], 1e-3, 0.0, root=False), spec_of(us[2])]
    # module aggregates, where rate_statistics takes them
    buckets = {"buckets": [0, None, 0], "n_buckets": 1} if "buckets" in inspect.signature(rate_statistics).parameters \
        else {}
    got = triton_rate_statistics(specs, **buckets).cpu()
    with eager_pass():
        eager = rate_statistics(specs, **buckets).cpu()
    assert len(got) == len(specs) + len(buckets) // 2 + 1
    if CUDA:
        torch.testing.assert_close(got[:, [0, 1, 3]], eager[:, [0, 1, 3]], rtol=0, atol=0)
    else:
        torch.testing.assert_close(got[:, :2], eager[:, :2], rtol=2**-23, atol=0)
        torch.testing.assert_close(got[:, 3], eager[:, 3], rtol=2**-MANTISSA_BITS, atol=0)
    torch.testing.assert_close(got[:, 2], eager[:, 2], rtol=1e-6, atol=0)


# --- sharded parameters -------------------------------------------------------------------------------------------
class Recorder:
    """A ``reduce`` that records its calls and leaves the partials as they are (one process holds every shard)."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, int, tuple[int, ...], tuple[int, ...]]] = []
        self.ext: list[torch.Tensor] = []

    def __call__(self, partials: Partials, token: object) -> None:
        ext, sums = partials
        assert ext.dtype == torch.float32 and sums.dtype == torch.float64
        assert ext.is_contiguous() and sums.is_contiguous() and len(ext) == len(sums)
        self.calls.append((token, sums.shape[1], tuple(ext.shape), tuple(sums.shape)))
        self.ext.append(ext.clone())


def test_sharded_rows_with_an_identity_reduce():
    """Whole and sharded parameters mixed, more than a block of rows: with a reduce that changes nothing the
    result is the unsharded one; each block of a token is reduced once after each phase, blocks of each token in
    the order of its first appearance, and phase 2's extremes are (+inf, -inf) rows."""
    n_specs = el.BLOCK_ROWS + 6
    us = [spread(10 + 37 * i, 3, seed=i, low=-10 + i % 6) for i in range(n_specs)]
    tokens = [("a" if i % 3 == 1 else "b" if i % 5 == 4 else None) for i in range(n_specs)]
    specs = [spec_of(u) for u in us]
    reduce = Recorder()
    got = triton_rate_statistics(specs, shards=tokens, reduce=reduce)
    assert_matches(got, reference([reference_rates(u, 3e-4, 1e-8) for u in us]))
    torch.testing.assert_close(got, triton_rate_statistics(specs), rtol=0, atol=0, equal_nan=True)
    rows = {t: tokens.count(t) for t in ("a", "b")}
    assert all(r <= el.BLOCK_ROWS for r in rows.values())
    coarse, fine = 2 + (1 << MANTISSA_BITS), 2 << MANTISSA_BITS  # [sum, count, octaves]; the row's, the group's
    assert reduce.calls == [("a", coarse, (rows["a"], 2), (rows["a"], coarse)),
                            ("b", coarse, (rows["b"], 2), (rows["b"], coarse)),
                            ("a", fine, (rows["a"], 2), (rows["a"], fine)),
                            ("b", fine, (rows["b"], 2), (rows["b"], fine))]
    for ext in reduce.ext[2:]:
        assert (ext[:, 0] == float("inf")).all() and (ext[:, 1] == float("-inf")).all()


def test_many_sharded_rows_are_reduced_in_blocks():
    n_specs = 2 * el.BLOCK_ROWS + 1
    us = [spread(5 + i, 2, seed=i, low=-9 + i % 4) for i in range(n_specs)]
    reduce = Recorder()
    got = triton_rate_statistics([spec_of(u) for u in us], shards=["fsdp"] * n_specs, reduce=reduce)
    assert_matches(got, reference([reference_rates(u, 3e-4, 1e-8) for u in us]))
    sizes = [el.BLOCK_ROWS, el.BLOCK_ROWS, 1]
    assert [c[2][0] for c in reduce.calls] == sizes + sizes


def test_many_whole_parameters_span_blocks():
    """Whole parameters are held in blocks sized by their grids, largest first: many small ones to a block, fewer
    large ones, the partials of a block never more than those of BLOCK_ROWS full grids."""
    cap = rt._max_programs(DEVICE)
    per_block = min(el.BLOCK_ROWS * cap, rt._MAX_BLOCK_ROWS)
    small = [5 + k % 300 for k in range(per_block + 3)]
    sizes = small + [cap * TILE] * (el.BLOCK_ROWS + 1) + [1, 2]
    grids = [min(-(-n // TILE), cap) for n in sizes]
    blocks = rt._blocks([None] * len(sizes), grids, cap)
    order = [i for b in blocks for i in b.index]
    assert order == sorted(range(len(sizes)), key=lambda i: -grids[i])  # each once, largest grid first, stable
    assert all(len(b.index) * b.programs <= el.BLOCK_ROWS * cap for b in blocks)
    # BLOCK_ROWS large ones; the last large one and as many small ones as its grid leaves room for; the rest
    assert [len(b.index) for b in blocks] == [el.BLOCK_ROWS, el.BLOCK_ROWS, len(sizes) - 2 * el.BLOCK_ROWS]
    assert [b.programs for b in blocks] == [cap, cap, 1]
    us = [spread(n, 3, seed=k, low=-9 + k % 5) for k, n in enumerate(small)]
    got = triton_rate_statistics([spec_of(u) for u in us])
    assert_matches(got, reference([reference_rates(u, 3e-4, 1e-8) for u in us]))


def test_one_block_of_mixed_states_gives_each_row_its_own():
    """One block of states of every kind the kernels take, in an order their grids change (largest first in the
    block, so the rows go back through the index), with dtypes, fills, tensor and host scalars, a host eps of 0 and
    a misaligned view side by side: each row is its spec's, in the specs' order."""
    buf = spread(3 * TILE + 60, seed=21)
    states = [(spread(700, 3, seed=1, low=-9), 3e-4, 1e-8, True),
              (buf[1:], torch.tensor(2e-3, device=DEVICE), 1e-8, True),  # not 16-byte aligned
              (spread(0), 3e-4, 1e-8, True),
              (spread(2 * TILE + 16, 4, seed=3, low=-7).to(torch.bfloat16), 1e-3, 0.0, True),
              (spread(40, 2, seed=4, low=-5).half(), 1e-3, torch.tensor(1e-6, dtype=torch.float64, device=DEVICE),
               False),
              (spread(WRAP, 5, seed=5, low=-11), 3e-4, 1e-8, True)]
    specs = [spec_of(u, scale, eps, root) for u, scale, eps, root in states]
    grids = [rt._grid(spec, rt._max_programs(DEVICE)) for spec in specs]
    assert [i for b in rt._blocks([None] * len(specs), grids, rt._max_programs(DEVICE)) for i in b.index] != list(
        range(len(specs)))
    want = reference([reference_rates(u, scale, eps, root) for u, scale, eps, root in states])
    assert_matches(triton_rate_statistics(specs), want)
    assert_matches(triton_rate_statistics(specs, buckets=[0, 1, 0, None, 1, 0], n_buckets=2),
                   reference([reference_rates(u, scale, eps, root) for u, scale, eps, root in states],
                             buckets=[0, 1, 0, None, 1, 0], n_buckets=2))


class Launches:
    """Counts the launches of both kernels (``kernel[grid](...)``) and the grids they get."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.grids: dict[str, list[tuple[int, ...]]] = {"_coarse_kernel": [], "_fine_kernel": []}
        for name, grids in self.grids.items():
            monkeypatch.setattr(rt, name, self._counted(getattr(rt, name), grids))

    @staticmethod
    def _counted(kernel, grids):
        class Counted:
            def __getitem__(self, grid):
                grids.append(tuple(grid))
                return kernel[grid]
        return Counted()


def test_one_launch_per_phase_for_a_group_of_like_states(monkeypatch):
    """The host cost of the pass does not grow with the parameters' count by a launch each: states of one dtype
    and fill, with host scalars, are one launch per phase (a grid of programs x rows); a bf16 state and a state
    that is not 16-byte aligned need kernels of their own, one more launch per phase each."""
    us = [spread(n, 3, seed=n, low=-9 + n % 5) for n in (16, 32, 512, 2 * TILE, 48, 3 * TILE)]
    launches = Launches(monkeypatch)
    got = triton_rate_statistics([spec_of(u) for u in us])
    assert launches.grids == {"_coarse_kernel": [(3, 6)], "_fine_kernel": [(3, 6)]}
    assert_matches(got, reference([reference_rates(u, 3e-4, 1e-8) for u in us]))

    mixed = [*us, us[0].bfloat16(), spread(TILE + 1, seed=7)[1:]]
    launches = Launches(monkeypatch)
    triton_rate_statistics([spec_of(u) for u in mixed])
    assert sorted(launches.grids["_coarse_kernel"]) == [(3, 1), (3, 1), (3, 6)]
    assert len(launches.grids["_fine_kernel"]) == 3


class TwoRanks:
    """Two "processes" as threads that take turns: one runs until its ``reduce`` call, then the other; when both
    have called, the partials are combined as an ``all_reduce`` would (min, max, sum) into both. Only one thread
    runs at a time, so the (not thread-safe) Triton interpreter is never entered twice."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.turn = 0
        self.done = [False, False]
        self.waiting: dict[int, tuple[Partials, object]] = {}
        self.calls: list[list[tuple[object, int]]] = [[], []]

    def _pass(self, rank: int) -> None:  # with the lock held: let the other run, wait for our turn
        other = 1 - rank
        if not self.done[other]:
            self.turn = other
            self.cv.notify_all()
            assert self.cv.wait_for(lambda: self.turn == rank, timeout=60), "the ranks' reduce calls differ"

    def reduce_of(self, rank: int):
        def reduce(partials: Partials, token: object) -> None:
            with self.cv:
                self.calls[rank].append((token, partials.sums.shape[1]))
                self.waiting[rank] = (partials, token)
                if len(self.waiting) == 2:
                    (p0, t0), (p1, t1) = self.waiting[0], self.waiting[1]
                    assert t0 == t1 and p0.ext.shape == p1.ext.shape and p0.sums.shape == p1.sums.shape
                    mn, mx = torch.minimum(p0.ext[:, 0], p1.ext[:, 0]), torch.maximum(p0.ext[:, 1], p1.ext[:, 1])
                    sums = p0.sums + p1.sums
                    for p in (p0, p1):
                        p.ext[:, 0], p.ext[:, 1] = mn, mx
                        p.sums.copy_(sums)
                    self.waiting.clear()
                self._pass(rank)
        return reduce

    def run(self, fn) -> list:
        results: list = [None, None]
        errors: list = []

        def main(rank: int) -> None:
            with self.cv:
                self.cv.wait_for(lambda: self.turn == rank)
            try:
                results[rank] = fn(rank, self.reduce_of(rank))
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
            finally:
                with self.cv:
                    self.done[rank] = True
                    self.turn = 1 - rank
                    self.cv.notify_all()

        threads = [threading.Thread(target=main, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if errors:
            raise errors[0]
        return results


def test_two_ranks_give_the_statistics_of_the_whole_parameters():
    """Parameters split across two ranks (unevenly, and one with no elements on rank 1) next to whole ones, which
    each rank holds in full, in two buckets: both ranks get the statistics of the whole parameters, with the same
    reduce calls (phase 2's with the counts of three targets: group, bucket, row)."""
    whole = [spread(900, 3, seed=1, low=-9), spread(40, 2, seed=2, low=-5)]
    split = [spread(3 * TILE + 10, 6, seed=3, low=-11), spread(50, 2, seed=4, low=-6), spread(7, 2, seed=5)]
    cuts = [TILE + 3, 20, 7]  # rank 0's elements; the last parameter lies wholly on rank 0
    order = [("split", 0), ("whole", 0), ("split", 1), ("whole", 1), ("split", 2)]
    buckets = [0, 1, 0, None, 1]

    def on(rank: int, reduce) -> torch.Tensor:
        specs, tokens = [], []
        for kind, i in order:
            if kind == "whole":
                specs.append(spec_of(whole[i]))
                tokens.append(None)
            else:
                u = split[i]
                specs.append(spec_of(u[: cuts[i]] if rank == 0 else u[cuts[i]:]))
                tokens.append(("dp",))
        return triton_rate_statistics(specs, shards=tokens, reduce=reduce, buckets=buckets, n_buckets=2)

    ranks = TwoRanks()
    r0, r1 = ranks.run(on)
    full = [whole[i] if kind == "whole" else split[i] for kind, i in order]
    want = reference([reference_rates(u, 3e-4, 1e-8) for u in full], buckets=buckets, n_buckets=2)
    assert_matches(r0, want)
    assert_matches(r1, want)
    assert ranks.calls[0] == ranks.calls[1] == [(("dp",), 2 + (1 << MANTISSA_BITS)), (("dp",), 3 << MANTISSA_BITS)]


# --- what is taken, and what is refused ---------------------------------------------------------------------------
class Subclass(torch.Tensor):
    """Stands for DTensor, FakeTensor and their kind: a tensor whose memory is not (only) its values."""


def _with_flat(u: torch.Tensor, flat: torch.Tensor) -> RateSpec:
    spec = spec_of(u)
    spec.fill.flat = flat
    return spec


def _staged() -> dict[str, RateSpec]:
    """Specs whose state the kernels cannot read as stored, but whose fill writes the roots: staged."""
    u = spread(16, seed=1)
    return {
        "subclass": spec_of(u.as_subclass(Subclass)),
        "not contiguous": _with_flat(u, spread(32, seed=2)[::2]),
        "numel mismatch": RateSpec(1e-3, 1e-8, 15, root_fill(u), u.device),
        "float64 state": spec_of(u.double()),
        "integer state": spec_of(torch.arange(16, device=DEVICE, dtype=torch.int32)),
        "zero tensor": spec_of(torch._efficientzerotensor(4, device=DEVICE)),
        "negation view": _with_flat(u, torch._neg_view(u)),
        "a fill of its own": RateSpec(1e-3, 1e-8, 16, lambda a, b, out: torch.sqrt(u[a:b] * 3, out=out), u.device),
    }


def _refused() -> dict[str, RateSpec]:
    """Specs with a scale or eps the kernels cannot read: neither staged nor read."""
    u = spread(16, seed=1)
    cases = {
        "scale of one element, not 0-dim": spec_of(u, torch.tensor([1e-3], device=DEVICE)),
        "integer scale tensor": spec_of(u, torch.tensor(1, device=DEVICE)),
        "complex eps": spec_of(u, 1e-3, 1e-8j),
        "bool scale": spec_of(u, True),
        "eps of a negation view": spec_of(u, 1e-3, torch._neg_view(torch.tensor(1e-8, device=DEVICE))),
    }
    if CUDA:
        cases["CPU scale for a GPU state"] = spec_of(u, torch.tensor(1e-3))
    return cases


STAGED, REFUSED = list(_staged()), list(_refused())


def _roots(spec: RateSpec) -> torch.Tensor:
    """What the spec's fill writes, whole: the roots the statistics divide the scale by."""
    out = torch.empty(spec.numel, dtype=torch.float32, device=spec.device)
    spec.fill(0, spec.numel, out)
    return out


@pytest.mark.parametrize("case", STAGED)
def test_staged(case):
    """A state the kernels cannot read as stored goes through its fill into a scratch buffer, which they read:
    the statistics of the rates that fill gives, beside a spec read as stored."""
    spec, plain = _staged()[case], spec_of(spread(8))
    assert not triton_accepts(spec, interpret=True) and triton_stages(spec, interpret=True)
    assert triton_accepts(plain, interpret=True) and not triton_stages(plain, interpret=True)
    got = triton_rate_statistics([plain, spec])
    want = reference([reference_rates(plain.fill.flat, plain.scale, plain.eps),
                      reference_rates(_roots(spec), spec.scale, spec.eps, root=False)])
    assert_matches(got, want)


@pytest.mark.parametrize("case", REFUSED)
def test_refused(case):
    spec = _refused()[case]
    assert not triton_accepts(spec, interpret=True) and not triton_stages(spec, interpret=True)
    with pytest.raises(ValueError, match="triton_accepts"):
        triton_rate_statistics([spec_of(spread(8)), spec])


def test_staged_pieces_share_the_rows_slots(monkeypatch):
    """A staged state larger than the scratch goes in pieces (here of at least 100 elements, whole rows of 10), each
    filled, then read by its own launch into its own slots of the row's partials: the statistics are those of the
    whole state, beside states read as stored and with buckets; every fill is of whole rows, and the pieces are
    filled once per phase."""
    monkeypatch.setattr(rt, "_stage_elements", lambda device: 100)
    monkeypatch.setattr(rt, "_max_programs", lambda device: 8)
    u = spread(1010, seed=5)
    calls = []

    def fill(start, stop, out):
        assert start % 10 == 0 and stop % 10 == 0 and out.numel() == stop - start
        calls.append((start, stop))
        torch.sqrt(u[start:stop] * 2, out=out)

    staged = RateSpec(2e-4, torch.tensor(1e-8, device=DEVICE), 1010, fill, u.device, row=10)
    plain = [spec_of(spread(n, seed=n)) for n in (7, 3000, 64)]
    empty = RateSpec(1e-3, 1e-8, 0, lambda a, b, out: None, u.device)  # its programs write empty partials
    specs = [plain[0], staged, plain[1], empty, plain[2]]
    buckets = [0, 0, 1, None, 1]
    got = triton_rate_statistics(specs, buckets=buckets, n_buckets=2)
    rates = [reference_rates(s.fill.flat, s.scale, s.eps) for s in plain]
    rates.insert(1, reference_rates(u * 2, 2e-4, torch.tensor(1e-8)))
    rates.insert(3, np.zeros(0, np.float32))
    assert_matches(got, reference(rates, buckets=buckets, n_buckets=2))
    pieces = sorted(set(calls))
    assert pieces[0][0] == 0 and pieces[-1][1] == 1010 and len(pieces) > 1
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))  # the pieces tile the state
    assert len(calls) == 2 * len(pieces)  # one fill per piece and phase


def test_small_staged_states_share_a_launch(monkeypatch):
    """Staged states that fit the scratch whole are filled side by side (each from a 64-byte boundary) and read by
    one launch per phase for as many as fit, with a launch of their own for those whose length is not a multiple
    of 16 (no 16-byte loads); a larger state still goes in pieces beside them. Each fill runs once per phase, into
    its own elements: the statistics are every state's own, with buckets across the packs."""
    monkeypatch.setattr(rt, "_stage_elements", lambda device: 100)
    monkeypatch.setattr(rt, "_max_programs", lambda device: 8)
    sizes = [16, 32, 5, 0, 48, 16, 64, 7, 5000]
    states = [spread(n, seed=n + i) for i, n in enumerate(sizes)]
    calls = []

    def staged(u, i):
        def fill(start, stop, out):
            calls.append((i, start, stop))
            torch.sqrt(u[start:stop] * 3, out=out)
        return RateSpec(1e-3, 1e-8, u.numel(), fill, u.device, row=10 if u.numel() == 5000 else 1)

    specs = [staged(u, i) for i, u in enumerate(states)]
    buckets = [0, 1, 0, None, 1, 1, 0, 1, 0]
    launches = Launches(monkeypatch)
    got = triton_rate_statistics(specs, buckets=buckets, n_buckets=2)
    rates = [reference_rates(u * 3, 1e-3, 1e-8) for u in states]
    assert_matches(got, reference(rates, buckets=buckets, n_buckets=2))
    # the block's rows by grid, in order within one: the 5000 (3 tiles: 3 slots a row), then the aligned small
    # ones [16, 32, 48] fill 96 of 100 elements, [16, 64, 0] the next pack; [5, 7] theirs; the 5000 elements in
    # pieces of 1670 (>= 100 and 5000 / 3 slots, in whole rows of 10), one program each
    grids = launches.grids["_coarse_kernel"]
    assert sorted(grids) == [(1, 1)] * 3 + [(3, 2), (3, 3), (3, 3)], grids
    assert launches.grids["_coarse_kernel"] == launches.grids["_fine_kernel"]
    filled = [c for c in calls if c[2] > c[1]]
    assert len(filled) == 2 * (7 + 3)  # once per phase: the 7 small ones with elements, the 3 pieces
    assert len(set(filled)) == len(filled) // 2


def test_pieces_cover_the_slots():
    """Every slot of a staged row is written once: the pieces' programs add up to the row's slots, one at least
    each, in whole rows, never more pieces than slots."""
    for numel, row, slots, at_least in [(1010, 10, 8, 100), (5, 1, 8, 100), (10**6, 7, 3, 10), (64, 64, 1, 1),
                                        (1000, 1, 1000, 1), (0, 1, 4, 16)]:
        pieces = rt._pieces(numel, row, slots, at_least)
        assert sum(p for _, _, p, _ in pieces) == slots and all(p >= 1 for _, _, p, _ in pieces)
        assert [f for _, _, _, f in pieces] == list(np.cumsum([0] + [p for _, _, p, _ in pieces])[:-1])
        assert pieces[0][0] == 0 and pieces[-1][1] == numel
        assert all(a % row == 0 for a, _, _, _ in pieces)


def test_subclass_reaches_the_fill_as_a_subclass():
    """The staging above is the subclass check's: the fill's flat view keeps the subclass."""
    assert type(_staged()["subclass"].fill.flat) is Subclass


def test_accepted():
    """Python numbers and 0-dim device tensors as scalars, each state dtype, root and copy; a CPU state only for
    the interpreter."""
    u = spread(16, seed=1)
    for spec in (spec_of(u), spec_of(u.half(), 1, 0), spec_of(u.bfloat16(), root=False),
                 spec_of(u, torch.tensor(1e-3, device=DEVICE), torch.tensor(1e-8, dtype=torch.float64, device=DEVICE))):
        assert triton_accepts(spec, interpret=True)
    assert not triton_accepts(spec_of(torch.rand(4)))  # a CPU state without interpret


def test_bad_arguments():
    spec = spec_of(spread(8))
    with pytest.raises(ValueError, match="at least one"):
        triton_rate_statistics([])
    with pytest.raises(ValueError, match="reduce"):
        triton_rate_statistics([spec], shards=["a"])
    with pytest.raises(ValueError, match="shards"):
        triton_rate_statistics([spec, spec], shards=[None])


def test_an_int_scale_beyond_a_double_is_rounded_once_as_torch_rounds_it():
    """An int that fp64 cannot hold is rounded to fp32 once, as torch rounds an int scalar (2**54 + 2**30 + 1 rounds
    up to 2**54 + 2**31 there; through fp64 first it would land one fp32 step lower); an int beyond int64, which
    torch cannot wrap, is left to the eager pass."""
    v = torch.ones(20, device=DEVICE)
    big = 2**54 + 2**30 + 1
    got = triton_rate_statistics([RateSpec(big, 0.0, 20, copy_fill(v), v.device)])
    assert torch.all(got == float(torch.tensor(big).float())) and torch.all(got == 2**54 + 2**31)
    with eager_pass():
        assert torch.equal(rate_statistics([RateSpec(big, 0.0, 20, copy_fill(v), v.device)]), got)
    assert not triton_accepts(spec_of(v, 2**63), interpret=True) and triton_accepts(spec_of(v, -(2**63)), True)


def test_a_state_shorter_than_its_row_is_one_chunk_in_both_passes():
    """A state of fewer elements than its ``row`` (a formula's row of a 1 x n factor, say) is one fill of all of it
    in the eager pass, as in the Triton pass; a row below 1 is refused where the spec is made."""
    u = spread(50, seed=4)
    # a copy fill: both passes read the same fp32 values (torch's CPU sqrt is not always correctly rounded)
    spec = RateSpec(1e-3, 1e-8, 50, copy_fill(u), u.device, row=64)
    got = triton_rate_statistics([spec])
    with eager_pass():
        want = rate_statistics([spec])
    assert_matches(got, reference([reference_rates(u, 1e-3, 1e-8, root=False)]))
    torch.testing.assert_close(got[:, [0, 1, 3]], want[:, [0, 1, 3]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="row must be a whole number of elements >= 1, got 0"):
        RateSpec(1e-3, 1e-8, 50, root_fill(u), u.device, row=0)


def test_no_host_read():
    """Nothing is read on the host (``aten._local_scalar_dense``, the op of every ``.item()``, ``bool(t)`` and
    ``float(t)``), on any device, a staged state included; on CUDA also no synchronizing copy (torch's sync debug
    mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                HostReads.count += 1
            return func(*args, **(kwargs or {}))

    us = [spread(3000, seed=1), spread(100, seed=2)]
    staged = RateSpec(1e-3, 1e-8, 100, lambda a, b, out: torch.sqrt(us[1][a:b] * 3, out=out), us[1].device)
    specs = [spec_of(us[0], torch.tensor(1e-3, device=DEVICE)), spec_of(us[1]), staged]
    triton_rate_statistics(specs)  # compiled (or rewritten for the interpreter) outside the checks
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with HostReads():
            triton_rate_statistics(specs, shards=[None, "a", None], reduce=Recorder())
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode(0)
    assert HostReads.count == 0


# --- the kernels as a GPU compiles them -----------------------------------------------------------------------------
_COMPILE = r"""
import re, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from lightning_wd import rate_triton as rt

ptrs = {"table": "*i64", "part_ptr": "*fp64"}
fine = {**ptrs, "octave_ptr": "*i64", "bucket_ptr": "*i64", "bucket_octave_ptr": "*i64", "group_octave_ptr": "*i64"}
slots = {"ROW_SLOT": 2, "BUCKET_SLOT": 1, "GROUP_SLOT": 0, "WIDTH": 384, "NBINS": 512}
for capability in (int(c) for c in sys.argv[1:]):
    for key in (rt._LaunchKey(*k) for k in [
            (torch.float32, True, None, None, True, True),
            (torch.bfloat16, False, torch.float32, torch.float64, True, False)]):
        constexprs = {k: v for k, v in rt._constexprs(key).items() if k != "num_warps"}
        for kernel, signature, extra in ((rt._coarse_kernel, ptrs, {}), (rt._fine_kernel, fine, slots)):
            consts = {**constexprs, **extra}
            src = triton.compiler.ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(consts, "constexpr")},
                                            constexprs=consts)
            compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                      options={"num_warps": rt._NUM_WARPS})
            assert compiled.asm.get("cubin"), "no cubin: ptxas did not run"
            ptx = compiled.asm["ptx"]
            loads = set(re.findall(r"ld\.global\.(v4|v2)?", ptx))
            print(kernel.__name__, capability, key.aligned, "v4" in loads or "v2" in loads)
"""


def test_the_kernels_compile_for_cuda_gpus(tmp_path):
    """Both kernels, for the kinds of launch key (fp32, and bf16 beside tensor scalars), compiled ahead of time to a
    cubin as Triton compiles them on a GPU, here without one, for a T4 (``sm_75``, no bf16 arithmetic of its own), an
    A100, an H100/H200 and a consumer Blackwell (``sm_120``): a kernel that only the interpreter takes would otherwise
    first fail on a user's GPU. An aligned key loads 16 bytes at a time (vector loads), as a pointer argument of
    Triton's own alignment would."""
    import importlib.util
    import os
    import subprocess
    import sys

    backends = importlib.util.find_spec("triton.backends.nvidia")
    if backends is None:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    capabilities = ["75", "80", "90", "120"]
    done = subprocess.run([sys.executable, "-c", _COMPILE, *capabilities], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = sorted(done.stdout.split("\n")[:-1])
    assert len(lines) == 4 * len(capabilities)
    for line in lines:
        name, capability, aligned, vector = line.split()
        assert vector == aligned, line  # vector loads exactly where the key says the state is aligned


def test_a_logging_steps_launches_do_not_grow_with_the_parameters(monkeypatch):
    """What a logging step launches for a group (the torch ops that run a kernel, and the Triton launches), from
    the optimizer's state to the statistics, is the same for 4 parameters as for 32, with the step counts on the
    device as a fused AdamW keeps them (``benchmarks/launch_count.py`` prints the counts)."""
    from helpers import KernelOps

    from lightning_wd.optimizers import formula_for

    monkeypatch.setattr(el, "_TRITON_DEVICES", ("cuda", DEVICE.type))
    monkeypatch.setattr(tr, "step_count", lambda state: state["step"])
    counts = []
    for layers in (2, 16):
        net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(layers)]).to(DEVICE)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        net(torch.randn(4, 8, device=DEVICE)).sum().backward()
        opt.step()
        group = opt.param_groups[0]
        params = list(group["params"])
        states = [opt.state[p] for p in params]
        launches, ops = Launches(monkeypatch), KernelOps()
        with ops:
            got = rate_statistics(formula_for(opt)[1].specs(states, group, params), per_parameter=False)
        counts.append((ops.count, len(launches.grids["_coarse_kernel"]), len(launches.grids["_fine_kernel"])))
        assert torch.isfinite(got).all()
    # one launch per phase for the weights, one for the biases (8 elements: not a multiple of 16, no 16-byte loads)
    assert counts[0] == counts[1] and counts[0][1:] == (2, 2)


def test_staged_formulas_launch_the_kernels_once_per_pack(monkeypatch):
    """Centered RMSprop's roots are computed (``sq - avg**2``), so each parameter's fill runs torch ops of its own,
    as in the eager pass; the Triton launches do not grow with the parameters: the small states are packed."""
    from lightning_wd.optimizers import formula_for

    monkeypatch.setattr(el, "_TRITON_DEVICES", ("cuda", DEVICE.type))
    grids = []
    for layers in (2, 16):
        net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(layers)]).to(DEVICE)
        opt = torch.optim.RMSprop(net.parameters(), lr=1e-3, centered=True)
        net(torch.randn(4, 8, device=DEVICE)).sum().backward()
        opt.step()
        group = opt.param_groups[0]
        specs = formula_for(opt)[1].specs([opt.state[p] for p in group["params"]], group, list(group["params"]))
        assert all(triton_stages(s, interpret=True) for s in specs)
        launches = Launches(monkeypatch)
        got = rate_statistics(specs, per_parameter=False)
        grids.append([len(launches.grids[k]) for k in ("_coarse_kernel", "_fine_kernel")])
        with eager_pass():
            want = rate_statistics(specs, per_parameter=False)
        torch.testing.assert_close(got[:, [0, 1, 3]], want[:, [0, 1, 3]], rtol=0, atol=0)
    # weights (64 elements, aligned) and biases (8: not a multiple of 16) in a pack each, per phase
    assert grids == [[2, 2], [2, 2]], grids


@pytest.mark.parametrize("steps", [2, 9])
def test_radam_with_device_steps_is_staged(monkeypatch, steps):
    """RAdam with its step counts as tensors (capturable, on a GPU) chooses rectification on the device, in its
    fill: staged, it gives the eager pass's statistics, before rectification (every rate is lr) and after."""
    monkeypatch.setattr(tr, "step_count", lambda state: state["step"])
    net = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 2)).to(DEVICE)
    opt = torch.optim.RAdam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        net(torch.randn(8, 40, device=DEVICE)).pow(2).mean().backward()
        opt.step()
    group = opt.param_groups[0]
    specs = [tr.radam_rate(opt.state[p], group, p) for p in group["params"]]
    assert all(isinstance(s.scale, torch.Tensor) for s in specs)  # the device path of the formula
    assert all(triton_stages(s, interpret=True) for s in specs)
    got = triton_rate_statistics(specs)
    with eager_pass():
        want = rate_statistics(specs)
    for col in (0, 1, 3):
        torch.testing.assert_close(got[:, col], want[:, col], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got[:, 2], want[:, 2], rtol=1e-6, atol=0)
    if steps == 2:
        assert torch.all(got[:, :2] == 1e-3)  # rho_t <= 5: the plain lr everywhere
