"""The statistics of a param group's effective learning rates (min, max, mean and median, per parameter, per bucket
of parameters and for the whole group), as plain torch functions.

A :class:`~lightning_wd.rates.RateSpec` describes one parameter's rate ``scale / (sqrt(u) + eps)`` without computing
it (the optimizers' formulas that make them are in their registry entries, :mod:`lightning_wd.optimizers`).
:func:`rate_statistics` streams the parameters of a param group through one chunk-sized scratch buffer and returns the
min, max, mean and median of each parameter's rate and of the whole group's, with no host read and with memory that
grows neither with the size of the largest parameter nor with the number of parameters. On a CUDA GPU, a state read
by a plain root goes through two fused Triton kernels instead (:mod:`lightning_wd.rate_triton`,
:func:`fused_kernel_available`): two reads of the state for all the statistics. :func:`effective_lr` computes every
element's rate, the reference the statistics are tested against.

Example::

    >>> import torch
    >>> from lightning_wd.rates import root_rate
    >>> v = torch.tensor([1e-8, 1e-4, 1.0])  # a second moment: Adam's after one step of gradients 1e-4, 1e-2, 1
    >>> spec = root_rate(v, scale=1e-3, eps=1e-8)
    >>> [round(x, 4) for x in effective_lr(spec).tolist()]  # lr / (sqrt(v) + eps)
    [9.999, 0.1, 0.001]
    >>> v_stats, group_stats = rate_statistics([spec])  # [min, max, mean, median] of v's rates, then of the group
    >>> [round(x, 4) for x in v_stats.tolist()]  # the median from a histogram: within 0.39% of 0.1
    [0.001, 9.999, 3.3667, 0.0999]
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_wd.rates import RateSpec

#: the statistics logged for every parameter, in this order
STATS: tuple[str, ...] = ("min", "max", "mean", "median")

#: the histogram of the rate behind the median: ``2**MANTISSA_BITS`` bins per power of two of the rate, over
#: ``2**RATE_EXPONENTS[0] <= rate < 2**RATE_EXPONENTS[1]`` (rates outside go to the end bins)
MANTISSA_BITS: int = 7
RATE_EXPONENTS: tuple[int, int] = (-64, 40)
HIST_BINS: int = (RATE_EXPONENTS[1] - RATE_EXPONENTS[0]) << MANTISSA_BITS
_SHIFT = 23 - MANTISSA_BITS
_FIRST_BIN_BITS = (RATE_EXPONENTS[0] + 127) << MANTISSA_BITS  # fp32 bits of 2**lo, shifted like a bin index
_LAST_BIN_BITS = _FIRST_BIN_BITS + HIST_BINS - 1

#: how many parameters' partial statistics :func:`rate_statistics` holds at a time (and reduces per collective)
BLOCK_ROWS: int = 16

__all__ = [
    "BLOCK_ROWS",
    "HIST_BINS",
    "MANTISSA_BITS",
    "RATE_EXPONENTS",
    "STATS",
    "Partials",
    "accumulate_partials",
    "chunk_elements",
    "effective_lr",
    "empty_partials",
    "fused_kernel_available",
    "fused_kernel_disabled",
    "fused_kernel_enabled",
    "fused_kernel_takes",
    "histogram_median_rel_error",
    "make_scratch",
    "rate_statistics",
    "summarize_partials",
]

#: names this module held until the formulas moved out (0.x, 2026-12): still importable from here, with a warning
_MOVED: dict[str, str] = {
    **dict.fromkeys(["ORTHOGONALIZED", "PLAIN_LR", "SIGN_UPDATE", "Formula", "bias_correction", "root_rate",
                     "stepwise"], "lightning_wd.rates"),
    **dict.fromkeys(["adafactor_rate", "adagrad_rate", "adam_rate", "adam_rates", "adamax_rate", "radam_rate",
                     "rmsprop_rate", "sparse_adam_rate"], "lightning_wd.optimizers.torch_rates"),
}


#: names of this module renamed (``fused_kernel_reads`` answered for specs read as stored; staged ones count now)
_RENAMED: dict[str, str] = {"fused_kernel_reads": "fused_kernel_takes"}


def __getattr__(name: str) -> Any:
    """The formulas' names at their old place (``from lightning_wd.effective_lr import Formula`` in a registration),
    from their new module, and renamed functions under their old name, with a ``DeprecationWarning`` that names the
    new place. (``RateSpec`` is still imported here, for the statistics: it imports with no warning.)"""
    if name in _RENAMED:
        warnings.warn(f"lightning_wd.effective_lr.{name} is now {_RENAMED[name]}.", DeprecationWarning, stacklevel=2)
        return globals()[_RENAMED[name]]
    where = _MOVED.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"lightning_wd.effective_lr.{name} has moved to {where}.{name}; import it from there.",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(where), name)


# --- the statistics ---------------------------------------------------------------------------------------------

_triton_enabled = True
#: where the fused pass runs: CUDA GPUs; the tests add "cpu" under Triton's interpreter (``TRITON_INTERPRET=1``)
_TRITON_DEVICES: tuple[str, ...] = ("cuda",)


def fused_kernel_enabled() -> bool:
    """Whether the fused Triton pass may be used (``False`` inside :func:`fused_kernel_disabled`)."""
    return _triton_enabled


def fused_kernel_available(device: torch.device | str | None = None) -> bool:
    """Whether :func:`rate_statistics` takes the fused Triton pass on ``device`` (default: any CUDA device): Triton
    is installed (it comes with torch's CUDA builds), the device is a CUDA GPU, and the pass is not switched off.

    The fused pass reads each state twice in all (once for the minimum, maximum, sum and the histogram of the rate's
    powers of two, once for the bins of the median's power of two), instead of the eager torch pass's eight ops per
    chunk and its atomic-bound histogram: on an H200, a small fraction of an optimizer step where the eager pass
    costs many (BENCHMARKS.md). Both give the same statistics. Elsewhere (a CPU, a GPU without Triton, an
    accelerator Triton does not serve) the eager pass runs.
    """
    device = torch.device(device) if device is not None else None
    if not _triton_enabled or (device.type not in _TRITON_DEVICES if device is not None
                               else not torch.cuda.is_available()):
        return False
    from lightning_wd import rate_triton

    return rate_triton.HAS_TRITON


def fused_kernel_takes(spec: RateSpec) -> bool:
    """Whether the fused Triton pass takes ``spec`` where it runs (:func:`fused_kernel_available`): a state read as
    stored (a plain root or copy, :func:`lightning_wd.rate_triton.triton_accepts`), or staged, its ``fill`` writing
    the root into a scratch buffer that the kernels read (a formula that computes its root: Adafactor's factored
    second moment, centered RMSprop, capturable RAdam's rectification; :func:`lightning_wd.rate_triton.triton_stages`).
    It does not take a ``scale`` or ``eps`` it cannot read (neither a number nor a 0-dim float tensor on the state's
    device): such a spec sends every spec of its :func:`rate_statistics` call to the eager pass."""
    if not fused_kernel_available(spec.device):
        return False
    from lightning_wd import rate_triton

    return rate_triton.triton_takes(spec, interpret=spec.device.type == "cpu")


@contextlib.contextmanager
def fused_kernel_disabled() -> Iterator[None]:
    """Within it, the statistics go through the eager torch pass even where the fused Triton pass is available: to
    compare the two, or to rule the kernel out.

    Example::

        >>> with fused_kernel_disabled():
        ...     fused_kernel_available("cuda")
        False
    """
    global _triton_enabled
    enabled, _triton_enabled = _triton_enabled, False
    try:
        yield
    finally:
        _triton_enabled = enabled


def chunk_elements(device: torch.device) -> int:
    """How many elements :func:`accumulate_partials` processes at a time on ``device``.

    On a CPU, chunks of 1M elements (4 MB) stay in cache across the passes over them: an 8.4M-element tensor takes
    1.3x as long all at once as in chunks, 512K-element chunks 1.05x as long as 1M ones, 2M as long
    (``benchmarks/stats_pass.py``). On an accelerator the chunks are larger, to keep the number of kernel launches
    down; either way the scratch memory of a logging step is bounded, whatever the largest parameter.
    """
    return 1 << 20 if device.type == "cpu" else 1 << 24


def _chunk(spec: RateSpec) -> int:
    """The elements of ``spec`` per chunk: :func:`chunk_elements`, in whole rows, at most the parameter."""
    n = chunk_elements(spec.device)
    if spec.row > 1:
        n = max(spec.row, n - n % spec.row)
    return max(1, min(n, spec.numel))


def make_scratch(numel: int, device: torch.device) -> Tensor:
    """The fp32 buffer that :func:`accumulate_partials` works in, for chunks of up to ``numel`` elements; reuse it
    across parameters (fresh allocations each cost page faults, which on a CPU take longer than the arithmetic)."""
    return torch.empty(max(1, numel), dtype=torch.float32, device=device)


def effective_lr(spec: RateSpec) -> Tensor:
    """The rate of every element of ``spec``, flat, in fp32: a parameter-sized tensor (the statistics never make
    one); elementwise the very numbers whose min, max and mean :func:`rate_statistics` reports."""
    out = torch.empty(spec.numel, dtype=torch.float32, device=spec.device)
    if spec.numel:
        spec.fill(0, spec.numel, out)
    return _rate_(out, spec)


def _rate_(root: Tensor, spec: RateSpec) -> Tensor:
    """``scale / (root + eps)`` in place: one division (``reciprocal_().mul_()`` costs a pass more)."""
    if isinstance(spec.eps, Tensor) or spec.eps != 0:  # Adamax and Adafactor have their eps inside the root
        root.add_(spec.eps)
    return torch.div(spec.scale, root, out=root)


class Partials(NamedTuple):
    """Statistics of rates that add up across chunks, parameters and shards, one row per parameter (or group).

    ``ext``: ``[..., 2]`` fp32, ``[min, max]`` of the rate (combined by min and max).
    ``sums``: ``[..., 2 + HIST_BINS]`` fp64, ``[sum of the rate, count, histogram of the rate]`` (combined by sum;
    counts exact up to 2**53).
    """

    ext: Tensor
    sums: Tensor


def empty_partials(rows: int, device: torch.device) -> Partials:
    """``rows`` rows of the partials of no elements: the identities of the combination."""
    # fill_ rather than a tensor from a list: on an accelerator, a copy from host memory waits for the device
    ext = torch.empty(rows, 2, dtype=torch.float32, device=device)
    ext[:, 0].fill_(float("inf"))
    ext[:, 1].fill_(float("-inf"))
    return Partials(ext, torch.zeros(rows, 2 + HIST_BINS, dtype=torch.float64, device=device))


def accumulate_partials(spec: RateSpec, ext: Tensor, sums: Tensor, scratch: Tensor) -> None:
    """Add the statistics of ``spec``'s rate into one row of partials (``ext`` of 2 values, ``sums`` of
    ``2 + HIST_BINS``), in chunks (:func:`chunk_elements`) of the fp32 ``scratch`` (:func:`make_scratch`).

    The histogram's bins are read straight off the bits of the fp32 rate (for non-negative floats the bit pattern
    grows with the value): its exponent and the first :data:`MANTISSA_BITS` bits of its mantissa. Nothing is read on
    the host, and the result does not depend on the chunk size (but for the order of the fp32 sums).

    On a CPU, a state behind a plain root or copy ``fill`` goes through the fused kernel instead, in one pass and
    without the scratch (:func:`fused_kernel_available`).
    """
    if spec.numel == 0:
        return
    _accumulate_eager(spec, ext, sums, scratch)


def _accumulate_eager(spec: RateSpec, ext: Tensor, sums: Tensor, scratch: Tensor) -> None:
    """:func:`accumulate_partials` by torch ops, chunk by chunk through ``scratch``."""
    # below this many elements a chunk's counts go straight into the row (`index_add_`): `bincount` fills and adds
    # a count for every possible bin, ~15 us whatever the chunk (benchmarks/stats_pass.py)
    small = 1 << 14
    room = scratch.numel()
    if room < spec.numel:  # more than one chunk: each of whole rows (a state of less than a row is one chunk)
        room -= room % spec.row
    step = min(_chunk(spec), room)
    if step < 1:
        raise ValueError(f"scratch of {scratch.numel()} elements holds no row of {spec.row}")
    sums[1].add_(spec.numel)
    for start in range(0, spec.numel, step):
        n = min(step, spec.numel - start)
        rate = scratch[:n]
        spec.fill(start, start + n, rate)
        _rate_(rate, spec)
        lo, hi = torch.aminmax(rate)
        torch.minimum(ext[0], lo, out=ext[0])
        torch.maximum(ext[1], hi, out=ext[1])
        # torch's fp32 sum is a cascade sum, accurate to ~1e-7 without an fp64 copy
        sums[0].add_(rate.sum())
        # the bin indices overwrite the rates they come from (a second buffer measured 1.05x the time, and twice
        # the memory); clamped: a NaN rate (its sign bit set) goes to the first bin instead of failing the count
        bits = rate.view(torch.int32)
        idx = torch.bitwise_right_shift(bits, _SHIFT, out=bits).clamp_(_FIRST_BIN_BITS, _LAST_BIN_BITS)
        _count_bins(idx, sums[2:], None if n >= small else False)


def _count_bins(idx: Tensor, hist: Tensor, bincount: bool | None = None) -> None:
    """``hist[i] += (idx == _FIRST_BIN_BITS + i).sum()`` for every bin ``i``, ``idx`` clamped to the bins:
    ``bincount`` on a CPU (the fastest there; counted from index 0 so that the offset costs no pass), elsewhere an
    ``index_add_`` into the fixed bins (``bincount`` sizes its output from the data, which costs a host sync;
    ``index_add_`` takes the int32 ``idx`` as it is, where ``scatter_add_`` would need an int64 copy). ``idx`` is
    scratch: it may be overwritten."""
    use_bincount = idx.device.type == "cpu" if bincount is None else bincount
    if use_bincount:
        counts = torch.bincount(idx)  # as long as the largest index: at least _FIRST_BIN_BITS + 1
        hist[: counts.numel() - _FIRST_BIN_BITS] += counts[_FIRST_BIN_BITS:]
    else:
        ones = torch.ones((), dtype=hist.dtype, device=hist.device).expand(idx.shape)
        hist.index_add_(0, idx.sub_(_FIRST_BIN_BITS), ones)


def summarize_partials(ext: Tensor, sums: Tensor) -> Tensor:
    """``[..., 4]`` fp32: ``[min, max, mean, median]`` of the rate, for each row of partials.

    ``min``, ``max`` and ``mean`` are exact; ``median`` is the geometric centre of the histogram bin holding the lower
    median, kept within ``[min, max]``: within :func:`histogram_median_rel_error` (0.39%) of the exact lower median.
    A row of no elements (count 0) gives NaN for all four.
    """
    mn, mx, count = ext[..., 0].double(), ext[..., 1].double(), sums[..., 1]
    mean = sums[..., 0] / count
    # the lower median is the element of rank floor((n - 1) / 2) from 0 in increasing order: its bin is the first
    # whose cumulative count exceeds that rank. Found in two steps, the power of two, then the bin within it: a
    # cumulative sum over all bins costs 7x as much as the sums per power of two
    rank = torch.floor((count - 1) / 2).unsqueeze(-1)
    fine = sums[..., 2:].unflatten(-1, (-1, 1 << MANTISSA_BITS))  # [..., powers of two, bins in each]
    per_octave = fine.sum(-1)
    coarse = per_octave.cumsum(-1)
    octave = torch.searchsorted(coarse, rank.contiguous(), right=True).clamp_(max=coarse.shape[-1] - 1)
    before = coarse.gather(-1, octave) - per_octave.gather(-1, octave)  # the elements in the powers below it
    within = fine.gather(-2, octave.unsqueeze(-1).expand(*octave.shape[:-1], 1, fine.shape[-1])).squeeze(-2)
    b = torch.searchsorted(within.cumsum(-1), (rank - before).contiguous(), right=True).clamp_(max=fine.shape[-1] - 1)
    b = b + (octave << MANTISSA_BITS)
    low, high = ((((b + i + _FIRST_BIN_BITS) << _SHIFT).to(torch.int32).view(torch.float32).double()).squeeze(-1)
                 for i in (0, 1))
    median = torch.sqrt(low * high).clamp(mn, mx)  # the end bins' centres can lie outside the data
    stats = torch.stack([mn, mx, mean, median], -1)
    return stats.masked_fill((count == 0).unsqueeze(-1), float("nan")).float()


def histogram_median_rel_error() -> float:
    """Bound on ``|approx / exact - 1|`` of the median, for rates inside the histogram's range (or where the exact
    median is the min or the max, as when the median falls in an end bin that holds it).

    A bin spans at most a factor ``1 + 2**-MANTISSA_BITS`` of the rate, so its geometric centre is off by at most a
    factor ``(1 + 2**-MANTISSA_BITS)**(1/2)`` (plus 1e-6 for the fp32 arithmetic).
    """
    return (1 + 2.0**-MANTISSA_BITS) ** 0.5 - 1 + 1e-6


class _Block:
    """Up to :data:`BLOCK_ROWS` rows of partials, and the indices of the parameters they hold."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.partials = empty_partials(rows, device)
        self.index: list[int] = []

    def reset(self) -> None:
        self.partials.ext[:, 0].fill_(float("inf"))
        self.partials.ext[:, 1].fill_(float("-inf"))
        self.partials.sums.zero_()
        self.index.clear()


def rate_statistics(
    specs: Sequence[RateSpec],
    per_parameter: bool = True,
    per_group: bool = True,
    shards: Sequence[Hashable | None] | None = None,
    reduce: Callable[[Partials, Any], None] | None = None,
    buckets: Sequence[int | None] | None = None,
    n_buckets: int = 0,
) -> Tensor:
    """``[min, max, mean, median]`` (fp32, as :func:`summarize_partials`) of each spec's rate (the first
    ``len(specs)`` rows, with ``per_parameter``), of the specs of each bucket together (the next ``n_buckets`` rows:
    ``buckets[i]`` is spec ``i``'s bucket, or ``None``), and of all of them together (the last row, with
    ``per_group``), on the first spec's device.

    On a CUDA GPU with Triton the fused pass takes the call when it takes every spec (:func:`fused_kernel_available`,
    :func:`fused_kernel_takes`); otherwise the eager torch pass below takes all of it (the group's median needs one
    histogram of all its specs).

    Each parameter's statistics are accumulated into a row of a block of :data:`BLOCK_ROWS` rows through a
    chunk-sized scratch buffer; a full block is summarized into four numbers per row and added into the group's
    row, and then reused. So the memory is bounded by the block, the chunk and the output (16 bytes per row),
    whatever the number of parameters and their sizes.

    Parameters sharded across processes: ``shards[i]`` is ``None`` for a whole tensor, else a token naming how spec
    ``i`` is sharded. Their rows go to separate blocks (one per token), and before such a block is summarized
    ``reduce(partials, token)`` must turn its rows into those of the whole parameters (an ``all_reduce``: ``ext``
    by min and max, ``sums`` by sum). Every process that calls this with the same sequence of tokens makes the same
    calls of ``reduce`` in the same order, with blocks of the same sizes, also for a shard of no elements.
    """
    if not specs:
        raise ValueError("rate_statistics needs at least one RateSpec")
    tokens = list(shards) if shards is not None else [None] * len(specs)
    if any(t is not None for t in tokens) and reduce is None:
        raise ValueError("sharded specs need a `reduce`")
    bucket_of = list(buckets) if buckets is not None else [None] * len(specs)
    if _triton_enabled and specs[0].device.type in _TRITON_DEVICES:
        from lightning_wd import rate_triton

        one_device = all(s.device == specs[0].device for s in specs)  # the kernels work on one device per call
        interpret = specs[0].device.type == "cpu"
        if rate_triton.HAS_TRITON and one_device:
            read = [rate_triton.triton_accepts(s, interpret) for s in specs]
            if all(r or rate_triton.stageable(s, interpret) for r, s in zip(read, specs)):
                return rate_triton.checked_rate_statistics(specs, per_parameter, per_group, tokens, reduce,
                                                           bucket_of, n_buckets, [not r for r in read])
    return _eager_rate_statistics(specs, per_parameter, per_group, tokens, reduce, bucket_of, n_buckets)


def _eager_rate_statistics(specs: Sequence[RateSpec], per_parameter: bool, per_group: bool,
                           tokens: list[Hashable | None], reduce: Any, bucket_of: list[int | None],
                           n_buckets: int) -> Tensor:
    """:func:`rate_statistics` by torch ops."""
    return _EagerPass(specs, per_parameter, per_group, reduce, bucket_of, n_buckets).run(tokens)


class _EagerPass:
    """One call of the eager pass: the output rows, the group's and the buckets' partials, the blocks of rows, and a
    chunk-sized scratch buffer per device (made at the first spec that needs it)."""

    def __init__(self, specs: Sequence[RateSpec], per_parameter: bool, per_group: bool, reduce: Any,
                 bucket_of: list[int | None], n_buckets: int) -> None:
        self.specs, self.per_parameter, self.reduce, self.bucket_of = specs, per_parameter, reduce, bucket_of
        self.device = device = specs[0].device
        n_out = (len(specs) if per_parameter else 0) + n_buckets + (1 if per_group else 0)
        self.out = torch.empty(n_out, len(STATS), dtype=torch.float32, device=device)
        self.group = empty_partials(1, device) if per_group else None
        self.bucketed = empty_partials(n_buckets, device) if n_buckets else None
        self.largest: dict[torch.device, int] = {}
        for spec in specs:
            self.largest[spec.device] = max(self.largest.get(spec.device, 0), _chunk(spec))
        self.scratch: dict[torch.device, Tensor] = {}
        # a row for a spec on another device than the blocks' (a group that spans devices)
        self.detour = {d: _Block(1, d) for d in self.largest if d != device}

    def run(self, tokens: list[Hashable | None]) -> Tensor:
        counts: dict[Hashable | None, int] = {}
        for t in tokens:
            counts[t] = counts.get(t, 0) + 1
        blocks = {t: _Block(min(BLOCK_ROWS, n), self.device) for t, n in counts.items()}
        for i, (spec, token) in enumerate(zip(self.specs, tokens)):
            block = blocks[token]
            self._into_row(spec, block, len(block.index))
            block.index.append(i)
            if len(block.index) == len(block.partials.ext):
                self._flush(token, block)
        for token, block in blocks.items():  # the same order on every process: that of the tokens' first appearance
            if block.index:
                self._flush(token, block)
        first = len(self.specs) if self.per_parameter else 0
        if self.bucketed is not None:
            self.out[first : first + len(self.bucketed.ext)] = summarize_partials(*self.bucketed)
        if self.group is not None:
            self.out[-1] = summarize_partials(*self.group)[0]
        return self.out

    def _accumulate(self, spec: RateSpec, ext: Tensor, sums: Tensor) -> None:
        if spec.numel == 0:
            return
        if spec.device not in self.scratch:
            self.scratch[spec.device] = make_scratch(self.largest[spec.device], spec.device)
        _accumulate_eager(spec, ext, sums, self.scratch[spec.device])

    def _into_row(self, spec: RateSpec, block: _Block, r: int) -> None:
        if spec.device == self.device:
            self._accumulate(spec, block.partials.ext[r], block.partials.sums[r])
            return
        row = self.detour[spec.device]
        row.reset()
        self._accumulate(spec, row.partials.ext[0], row.partials.sums[0])
        block.partials.ext[r].copy_(row.partials.ext[0])
        block.partials.sums[r].copy_(row.partials.sums[0])

    def _flush(self, token: Hashable | None, block: _Block) -> None:
        rows = len(block.index)
        part = Partials(block.partials.ext[:rows], block.partials.sums[:rows])
        if token is not None:
            self.reduce(part, token)
        if self.per_parameter:
            stats = summarize_partials(*part)
            first = block.index[0]
            if block.index == list(range(first, first + rows)):
                self.out[first : first + rows] = stats
            else:  # sharded and whole parameters in one group: row by row (an index tensor would be a host copy)
                for j, i in enumerate(block.index):
                    self.out[i] = stats[j]
        if self.group is not None:
            _combine(self.group, 0, part.ext.amin(0)[0], part.ext.amax(0)[1], part.sums.sum(0))
        if self.bucketed is not None:
            for j, i in enumerate(block.index):
                if self.bucket_of[i] is not None:
                    _combine(self.bucketed, self.bucket_of[i], part.ext[j, 0], part.ext[j, 1], part.sums[j])
        block.reset()


def _combine(into: Partials, row: int, lo: Tensor, hi: Tensor, sums: Tensor) -> None:
    """Add the partials ``(lo, hi, sums)`` into row ``row`` of ``into``."""
    torch.minimum(into.ext[row, 0], lo, out=into.ext[row, 0])
    torch.maximum(into.ext[row, 1], hi, out=into.ext[row, 1])
    into.sums[row].add_(sums)
