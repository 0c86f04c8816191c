"""The statistics of :func:`lightning_wd.effective_lr.rate_statistics` on a GPU, by Triton kernels: the same rows, the
same numbers, without the histogram that makes the eager pass slow there.

The eager pass counts every element into a 13,312-bin float64 histogram with ``index_add_``; Adam's rates crowd into
few bins, and the atomic adds into them cost many optimizer steps on an H200. The lower median needs only two of that
histogram's columns, though: the power of two ("octave") that holds it, and the 128 bins within that octave. So each
state is read twice:

1. ``_coarse_kernel``: the rate of every element, its min and max, its sum, and a histogram of its octave (128 bins,
   104 of them used), per program of a persistent grid, into a small block of partials that torch ops reduce; from
   the counts per octave, the octave of the lower median of each row, of each bucket and of the group, on the device.
2. ``_fine_kernel``: the same rates again, and the histogram of the 128 bins of the elements in those octaves.

The median is then read off exactly as :func:`lightning_wd.effective_lr.summarize_partials` reads it off the full
histogram; the rates are the same fp32 numbers as torch's on a GPU (a correctly rounded root, then ``+ eps``, then
a correctly rounded division), so all four statistics are those of the eager pass on the same device. Counting
per program keeps the histograms free of global atomics: ``tl.histogram`` counts a tile by warp ballots and a few
shared-memory adds, whatever the clustering. That counting, not the memory, bounds the kernels. Measured on an H200
(torch 2.11, Triton 3.6): 16 Adam states of 16.8M fp32 elements take 3.1 ms (kernels 1.2 + 1.5 ms, 0.9 and 0.7 TB/s
of state read; 3.7 ms with module buckets, whose phase 2 counts three targets), against 41 ms for the eager pass and
2.1 ms for a fused AdamW step over the same parameters.

A launch costs ~18 us of host time there, so the kernels take many states at once: a launch table (one row of
int64 words per state: its address, length, scale and eps) is uploaded once per call, and each kernel runs on a
grid of programs x rows, one launch per phase for all the states of a block that share a dtype, a fill, the kinds
of their scalars and 16-byte alignment (the one launch per state per phase before cost ~50 us per small parameter:
2,000 parameters of 4,096 elements took 100 ms). A state's address from the table carries no alignment that Triton
can see, so the kernel states it (``tl.multiple_of``) where the host checked it, and loads 16 bytes at a time as it
would from a pointer argument. The kernels compile to cubins for ``sm_75`` (T4), ``sm_80``, ``sm_90`` and ``sm_120`` in
the tests, without a GPU.

A formula that computes its root (Adafactor's factored second moment, centered RMSprop's ``sq - avg**2``, capturable
RAdam's rectification) has no state the kernels could read as stored; it is staged: its ``fill`` writes the roots
into a scratch buffer of the eager pass's chunk (16M fp32 on a GPU), and the kernels read that with a root-free
``fill``. A larger state goes in pieces of whole rows, each with a launch of its own that writes its own share of
the row's partial slots; the smaller ones are filled side by side and read by one launch, as a group of stored
states is. Each fill runs once per phase: computing the roots twice costs a few elementwise ops per chunk, keeping
them would cost a parameter-sized buffer.

:func:`triton_accepts` says which :class:`~lightning_wd.rates.RateSpec` the kernels read as stored (a plain dense
state behind a root or copy ``fill``, on a CUDA device), :func:`triton_stages` which they stage, and
:func:`triton_takes` either; :func:`triton_rate_statistics` is ``rate_statistics`` for a group of them. Without Triton
the module imports all the same (``HAS_TRITON`` is ``False``) and takes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_wd.effective_lr import (
    _FIRST_BIN_BITS,
    _LAST_BIN_BITS,
    _SHIFT,
    BLOCK_ROWS,
    HIST_BINS,
    MANTISSA_BITS,
    STATS,
    Partials,
)
from lightning_wd.rates import RateSpec, _StateFill

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

#: whether Triton is installed; without it :func:`triton_accepts` is always ``False``
HAS_TRITON: bool = triton is not None

__all__ = ["HAS_TRITON", "TILE", "checked_rate_statistics", "triton_accepts", "triton_rate_statistics", "triton_stages",
           "triton_takes"]

#: elements per tile of a program's loop: 16 per thread of its 4 warps (four 16-byte loads of fp32 in flight)
TILE: int = 2048
_NUM_WARPS = 4
#: programs per SM of the persistent grid: a tensor of more tiles loops over them, so the partials stay small (at most
#: 528 rows of 1 KB in phase 1, of 3 KB in phase 2, per parameter on an H200). Measured on an H200 (16 x 16.8M
#: elements, kernel time of both phases): 2.76 ms; 3.07 ms with tiles of 4096 and 8 warps, 2 per SM; 2.47 ms with
#: tiles of 1024, 16 per SM, at 4x the partials
_PROGRAMS_PER_SM = 4
#: the grid cap under Triton's interpreter: small, so that the tests see programs loop over several tiles
_INTERPRET_PROGRAMS = 4
#: the most whole (unsharded) parameters whose partials are held at a time
_MAX_BLOCK_ROWS = 256

_BINS = 1 << MANTISSA_BITS  # bins per octave, and the octave histogram's width (a power of two, as tl.histogram needs)
_OCTAVES = HIST_BINS >> MANTISSA_BITS  # the octaves in use: 104
assert _OCTAVES <= _BINS
# a coarse partial: [min, max, sum, count, counts per octave]; min and max in fp64 (exact for fp32), so that one
# buffer of 16-byte aligned rows holds them all
_COARSE = 4 + _BINS

# a row of a launch table (int64 words): the state's address, its numel, its scale and eps (each the address of a
# 0-dim tensor or the fp64 bits of a host number), the row's index in its block, the first of its partials' slots
# this launch writes, and the slots per row of the block's partials (a staged state's pieces share its row: each
# piece writes its own slots)
_COLUMNS = 7

_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCALAR_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

if HAS_TRITON:
    from triton.runtime.interpreter import InterpretedFunction

    # globals that a kernel reads must be constexpr
    _MANTISSA_BITS_C = tl.constexpr(MANTISSA_BITS)
    _SHIFT_C = tl.constexpr(_SHIFT)
    _FIRST_C = tl.constexpr(_FIRST_BIN_BITS)
    _LAST_C = tl.constexpr(_LAST_BIN_BITS)
    _BINS_C = tl.constexpr(_BINS)
    _COARSE_C = tl.constexpr(_COARSE)
    _COLUMNS_C = tl.constexpr(_COLUMNS)
    _TL_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                  torch.float16: tl.float16}

    @triton.jit
    def _scalar(word, IS_PTR: tl.constexpr, DTYPE: tl.constexpr):
        """A RateSpec's scale or eps in fp32, from its word of a launch table: the address of its 0-dim tensor (read
        here, never on the host), or the fp64 bits of the host number, rounded to fp32 as torch rounds a scalar to
        the tensor's dtype (and as Triton rounds a float argument)."""
        if IS_PTR:
            v = tl.load(word.to(tl.pointer_type(DTYPE))).to(tl.float32)
        else:
            v = word.to(tl.float64, bitcast=True).to(tl.float32)
        return v

    @triton.jit
    def _table_row(table, U_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, SCALE_PTR: tl.constexpr,
                   SCALE_DTYPE: tl.constexpr, EPS_PTR: tl.constexpr, EPS_DTYPE: tl.constexpr):
        """The state, its length, scale and eps, and its partial's slot in the block (``[rows, slots]``), of this
        program's row of a launch table (``_COLUMNS`` int64 words per row, see ``_TritonPass.blocks``)."""
        row = table + tl.program_id(1) * _COLUMNS_C
        u_ptr = tl.load(row).to(tl.pointer_type(U_DTYPE))
        numel = tl.load(row + 1)
        if ALIGNED:  # what Triton assumes of a pointer argument at 16 bytes: 16-byte loads
            u_ptr = tl.multiple_of(u_ptr, 16)
            numel = tl.multiple_of(numel, 16)
        scale = _scalar(tl.load(row + 2), SCALE_PTR, SCALE_DTYPE)
        eps = _scalar(tl.load(row + 3), EPS_PTR, EPS_DTYPE)
        block_row = tl.load(row + 4)
        slot = block_row * tl.load(row + 6) + tl.load(row + 5) + tl.program_id(0)
        return u_ptr, numel, scale, eps, block_row, slot

    @triton.jit
    def _rate(u_ptr, offs, mask, scale, eps, ROOT: tl.constexpr, ADD_EPS: tl.constexpr):
        """The fp32 rates of a tile, rounded as torch rounds them on a GPU: the root and the division correctly
        rounded (``sqrt`` and ``/`` without ``_rn`` are approximate in Triton), a low-precision state widened first."""
        x = tl.load(u_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        if ROOT:
            x = tl.math.sqrt_rn(x)
        if ADD_EPS:  # not for a host eps of 0, as in `_rate_`: -0.0 stays -0.0 (its rate -inf, not +inf)
            x = x + eps
        return tl.math.div_rn(scale, x)

    @triton.jit
    def _bin(rate):
        """The histogram bin of each rate, as `_accumulate_eager` reads it off the fp32 bits: an arithmetic shift,
        clamped, so that a negative rate or a NaN with its sign bit set goes to the first bin, another NaN to the
        last."""
        b = rate.to(tl.int32, bitcast=True) >> _SHIFT_C
        return tl.minimum(tl.maximum(b, _FIRST_C), _LAST_C) - _FIRST_C

    @triton.jit
    def _coarse_kernel(table, part_ptr, U_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, ROOT: tl.constexpr,
                       SCALE_PTR: tl.constexpr, SCALE_DTYPE: tl.constexpr, EPS_PTR: tl.constexpr,
                       EPS_DTYPE: tl.constexpr, ADD_EPS: tl.constexpr, TILE: tl.constexpr):
        """Phase 1, for every row of a launch table at once (grid: programs per row x rows): each program's partial
        ``[min, max, sum, count, counts per octave]`` over its tiles of its row's state, into its slot of the
        block's partials at ``part_ptr`` (fp64, ``[rows, programs, _COARSE]``). A program past its state's tiles
        writes the partial of no elements."""
        pid = tl.program_id(0)
        u_ptr, numel, s, e, row, at = _table_row(table, U_DTYPE, ALIGNED, SCALE_PTR, SCALE_DTYPE, EPS_PTR,
                                                 EPS_DTYPE)
        lanes = tl.arange(0, TILE)
        # elementwise accumulators, reduced once at the end: a reduction per tile would cost a barrier per tile
        mn = tl.full([TILE], float("inf"), tl.float32)
        mx = tl.full([TILE], float("-inf"), tl.float32)
        total = tl.zeros([TILE], tl.float64)  # fp64 lanes: the mean exact to ~1e-15, whatever the loop's length
        counts = tl.zeros([_BINS_C], tl.int64)  # int64: a program's count may pass 2**31 on a huge tensor
        tile = pid.to(tl.int64)
        # a `while`: a `for` over a runtime range fails in Triton 3.6's interpreter on NumPy 2.4 (triton#9171)
        while tile < tl.cdiv(numel, TILE):
            offs = tile * TILE + lanes
            mask = offs < numel
            r = _rate(u_ptr, offs, mask, s, e, ROOT, ADD_EPS)
            mn = tl.minimum(mn, tl.where(mask, r, float("inf")), propagate_nan=tl.PropagateNan.ALL)
            mx = tl.maximum(mx, tl.where(mask, r, float("-inf")), propagate_nan=tl.PropagateNan.ALL)
            total += tl.where(mask, r, 0.0).to(tl.float64)
            counts += tl.histogram(_bin(r) >> _MANTISSA_BITS_C, _BINS_C, mask=mask).to(tl.int64)
            tile += tl.num_programs(0)
        out = part_ptr + at * _COARSE_C  # this program's slot of the partials
        # NaN-propagating, as torch.aminmax: a lane that met a NaN holds it (propagate_nan above); tl.min and tl.max
        # may drop it (minnum on a GPU), and a reduction with a NaN-propagating combine runs element by element in
        # the interpreter
        nan = tl.max((mn != mn).to(tl.int32), 0) > 0
        tl.store(out, tl.where(nan, float("nan"), tl.min(mn, 0)).to(tl.float64))
        tl.store(out + 1, tl.where(nan, float("nan"), tl.max(mx, 0)).to(tl.float64))
        tl.store(out + 2, tl.sum(total, 0))
        tl.store(out + 3, tl.sum(counts, 0).to(tl.float64))
        tl.store(out + 4 + tl.arange(0, _BINS_C), counts.to(tl.float64))

    @triton.jit
    def _fine_kernel(table, part_ptr, octave_ptr, bucket_ptr, bucket_octave_ptr, group_octave_ptr,
                     U_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, ROOT: tl.constexpr, SCALE_PTR: tl.constexpr,
                     SCALE_DTYPE: tl.constexpr, EPS_PTR: tl.constexpr, EPS_DTYPE: tl.constexpr,
                     ADD_EPS: tl.constexpr, ROW_SLOT: tl.constexpr, BUCKET_SLOT: tl.constexpr,
                     GROUP_SLOT: tl.constexpr, WIDTH: tl.constexpr, NBINS: tl.constexpr, TILE: tl.constexpr):
        """Phase 2, for every row of a launch table at once: each program's counts of the 128 bins of the median's
        octave of each target, into its slot of the block's partials at ``part_ptr`` (fp64, ``[rows, programs,
        WIDTH]``, 128 per target): the row's (``octave_ptr[row]``), its bucket's
        (``bucket_octave_ptr[bucket_ptr[row]]``, -1 for a row of no bucket) and the group's (``*group_octave_ptr``),
        each where its slot is not -1.

        One histogram of ``NBINS`` (slots x 128, to a power of two) for all of them: an element counts once, in the
        slot of the first of group, bucket and row whose octave it is in. Where two targets share their octave (the
        common case: a parameter's median near the group's), the later target's counts are all in the earlier's
        slot, and the caller reads them from there."""
        pid = tl.program_id(0)
        u_ptr, numel, s, e, row, at = _table_row(table, U_DTYPE, ALIGNED, SCALE_PTR, SCALE_DTYPE, EPS_PTR,
                                                 EPS_DTYPE)
        lanes = tl.arange(0, TILE)
        if ROW_SLOT >= 0:
            row_octave = tl.load(octave_ptr + row).to(tl.int32)
        if BUCKET_SLOT >= 0:
            bucket_octave = tl.load(bucket_octave_ptr + tl.load(bucket_ptr + row)).to(tl.int32)
        if GROUP_SLOT >= 0:
            group_octave = tl.load(group_octave_ptr).to(tl.int32)
        counts = tl.zeros([NBINS], tl.int64)
        tile = pid.to(tl.int64)
        # a `while`: a `for` over a runtime range fails in Triton 3.6's interpreter on NumPy 2.4 (triton#9171)
        while tile < tl.cdiv(numel, TILE):
            offs = tile * TILE + lanes
            mask = offs < numel
            b = _bin(_rate(u_ptr, offs, mask, s, e, ROOT, ADD_EPS))
            octave = b >> _MANTISSA_BITS_C
            slot = tl.zeros_like(octave)
            take = octave < 0  # none yet: an octave is never negative
            if ROW_SLOT >= 0:
                take |= octave == row_octave
                slot += ROW_SLOT
            if BUCKET_SLOT >= 0:
                in_bucket = octave == bucket_octave
                take |= in_bucket
                slot = tl.where(in_bucket, BUCKET_SLOT, slot)
            if GROUP_SLOT >= 0:
                in_group = octave == group_octave
                take |= in_group
                slot = tl.where(in_group, GROUP_SLOT, slot)
            key = (b & (_BINS_C - 1)) + slot * _BINS_C
            counts += tl.histogram(key, NBINS, mask=take & mask).to(tl.int64)
            tile += tl.num_programs(0)
        bins = tl.arange(0, NBINS)
        out = part_ptr + at * WIDTH  # this program's slot of the partials
        tl.store(out + bins, counts.to(tl.float64), mask=bins < WIDTH)

    _INTERPRETED = isinstance(_coarse_kernel, InterpretedFunction)
else:  # pragma: no cover - depends on the install
    _INTERPRETED = False


def _plain_tensor(t: Any) -> bool:
    """Whether the kernels may read ``t``'s memory as its values: a dense, plain tensor (not a DTensor, fake or
    functional tensor, whose memory is not, or not only, theirs), without lazy bits that its memory does not show
    (a negation or a conjugation still to apply, or the zeros of a zero tensor, which has no memory at all)."""
    return (
        type(t) is Tensor
        and t.layout == torch.strided
        and not t.is_nested
        and not t._is_zerotensor()
        and not t.is_neg()
        and not t.is_conj()
        and not t.is_complex()
        and not torch._is_functional_tensor(t)
    )


def _scalar_ok(x: Any, device: torch.device) -> bool:
    """A scale or eps the kernels take: a real Python number, or a 0-dim float tensor on the state's device (read
    by the kernel, never on the host)."""
    if isinstance(x, Tensor):
        return _plain_tensor(x) and x.dim() == 0 and x.dtype in _SCALAR_DTYPES and x.device == device
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    # an int that torch cannot wrap as an int64 scalar: the eager pass says so, rather than the kernels taking it
    return not isinstance(x, int) or -(2**63) <= x < 2**63


def triton_accepts(spec: RateSpec, interpret: bool = False) -> bool:
    """Whether :func:`triton_rate_statistics` can read ``spec``'s state as stored; where it cannot, it may stage it
    (:func:`triton_stages`), or else the eager pass (:func:`lightning_wd.effective_lr.rate_statistics`) gives the
    same statistics.

    The kernels read the state's memory through a raw pointer, so only what that memory holds as it is qualifies:
    a plain root or copy ``fill`` (no other arithmetic), over a contiguous fp32, bf16 or fp16 tensor of exactly
    ``spec.numel`` elements on a CUDA device, that is a plain ``torch.Tensor`` (not a DTensor, a fake or functional
    tensor), with no negation or conjugation pending and not a zero tensor; and ``scale`` and ``eps`` that are
    Python numbers or 0-dim float tensors on the same device.

    Args:
        spec: the parameter's rate.
        interpret: also accept a CPU state, for Triton's interpreter (``TRITON_INTERPRET=1``, the tests).
    """
    if not HAS_TRITON:
        return False
    fill = spec.fill
    if type(fill) is not _StateFill or not isinstance(fill.root, bool):  # a subclass may compute something else
        return False
    flat = fill.flat
    if not _plain_tensor(flat) or flat.dtype not in _STATE_DTYPES:
        return False
    if flat.dim() != 1 or not flat.is_contiguous() or flat.numel() != spec.numel:
        return False
    return flat.device == spec.device and stageable(spec, interpret)  # the device and scalars a staged spec needs


def triton_stages(spec: RateSpec, interpret: bool = False) -> bool:
    """Whether :func:`triton_rate_statistics` takes ``spec`` by staging it: a spec whose state the kernels cannot
    read as stored (:func:`triton_accepts` is ``False``: a formula that computes its root, as Adafactor's factored
    second moment or centered RMSprop's ``sq - avg**2``, or a state that is not a plain dense tensor) but whose
    ``fill`` writes the root, chunk by chunk, into a scratch buffer that the kernels then read, as the eager pass
    reads it. It needs a CUDA device (or a CPU ``interpret``), and ``scale`` and ``eps`` that the kernels read: Python
    numbers or 0-dim float tensors on that device.

    Args:
        spec: the parameter's rate.
        interpret: also take a CPU spec, for Triton's interpreter (``TRITON_INTERPRET=1``, the tests).
    """
    return not triton_accepts(spec, interpret) and stageable(spec, interpret)


def stageable(spec: RateSpec, interpret: bool = False) -> bool:
    """The part of :func:`triton_stages` that does not ask :func:`triton_accepts` (asked already where it is used):
    a device the kernels run on, and scalars they read; :func:`triton_accepts` needs these too."""
    device = spec.device
    if not HAS_TRITON or not (device.type == "cuda" or (interpret and device.type == "cpu")):
        return False
    return _scalar_ok(spec.scale, device) and _scalar_ok(spec.eps, device)


def triton_takes(spec: RateSpec, interpret: bool = False) -> bool:
    """Whether :func:`triton_rate_statistics` takes ``spec`` at all: read as stored, or staged."""
    return triton_accepts(spec, interpret) or stageable(spec, interpret)


def _stage_elements(device: torch.device) -> int:
    """The elements of a staged state's piece, at least (the scratch buffer's size): the eager pass's chunk."""
    from lightning_wd.effective_lr import chunk_elements

    return chunk_elements(device)


def _pieces(numel: int, row: int, slots: int, at_least: int) -> list[tuple[int, int, int, int]]:
    """``(start, stop, programs, first slot)`` of each piece of a staged state of ``numel`` elements (pieces of whole
    rows of ``row`` elements), its ``slots`` programs shared among them in proportion to their size, each piece at
    least one: every slot of the row is written, as by a launch of a state read as stored. Pieces of at least
    ``at_least`` elements, and of at least ``numel / slots``, so that there are never more pieces than slots."""
    if numel == 0:
        return [(0, 0, slots, 0)]  # no fill: the programs write the partials of no elements
    per = max(at_least, -(-numel // slots))
    per = -(-per // row) * row
    bounds = [(start, min(start + per, numel)) for start in range(0, numel, per)]
    spare = slots - len(bounds)
    programs = [1 + spare * (stop - start) // numel for start, stop in bounds]
    programs[-1] += slots - sum(programs)
    out, first = [], 0
    for (start, stop), n in zip(bounds, programs):
        out.append((start, stop, n, first))
        first += n
    return out


@functools.lru_cache(maxsize=None)
def _max_programs(device: torch.device) -> int:
    """The cap of a kernel's grid on ``device``: a few programs per SM, each looping over its share of the tiles."""
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRET_PROGRAMS


class _LaunchKey(NamedTuple):
    """What a kernel is compiled for: the specs of a launch table share it."""

    dtype: torch.dtype  # the state's
    root: bool  # the fill's
    scale_dtype: torch.dtype | None  # a 0-dim tensor's, None for a host number
    eps_dtype: torch.dtype | None
    add_eps: bool  # False for a host eps of 0, as in `_rate_`
    aligned: bool  # a 16-byte aligned state of a multiple of 16 elements: 16-byte loads

    @classmethod
    def of(cls, spec: RateSpec) -> _LaunchKey:
        """The key of a spec read as stored."""
        flat = spec.fill.flat
        return cls.with_state(spec, flat.dtype, spec.fill.root, flat.data_ptr(), spec.numel)

    @classmethod
    def with_state(cls, spec: RateSpec, dtype: torch.dtype, root: bool, address: int, numel: int) -> _LaunchKey:
        """The key of ``spec``'s scalars over a state of ``dtype`` at ``address`` (a staged piece: the fp32 roots in
        the scratch buffer, copied)."""
        scale, eps = spec.scale, spec.eps
        eps_dtype = eps.dtype if isinstance(eps, Tensor) else None
        return cls(dtype, root, scale.dtype if isinstance(scale, Tensor) else None, eps_dtype,
                   eps_dtype is not None or eps != 0, address % 16 == 0 and numel % 16 == 0)

    def constexprs(self) -> dict[str, Any]:
        return {"U_DTYPE": _TL_DTYPES[self.dtype], "ROOT": self.root, "ADD_EPS": self.add_eps,
                "ALIGNED": self.aligned, "SCALE_PTR": self.scale_dtype is not None,
                "SCALE_DTYPE": _TL_DTYPES[self.scale_dtype or torch.float32], "EPS_PTR": self.eps_dtype is not None,
                "EPS_DTYPE": _TL_DTYPES[self.eps_dtype or torch.float32], "TILE": TILE, "num_warps": _NUM_WARPS}


@functools.lru_cache(maxsize=None)
def _constexprs(key: _LaunchKey) -> dict[str, Any]:
    """The kernels' constexprs for ``key`` (made once: a dict per launch is host time at every logging step)."""
    return key.constexprs()


def _word(x: Tensor | float) -> int:
    """A scale or eps in a launch table: the address of its 0-dim tensor, or the fp64 bits of a host number."""
    if isinstance(x, Tensor):
        return x.data_ptr()
    if isinstance(x, int) and abs(x) > 2**53:
        # rounded once, to fp32, as torch rounds an int scalar (int64 to float): through fp64 first, an int that
        # fp64 cannot hold would be rounded twice, and could land one fp32 step from the eager pass's
        x = float(torch.tensor(x, dtype=torch.int64).float())
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _grid(spec: RateSpec, max_programs: int) -> int:
    """The programs a spec's state needs: one per tile, up to the cap (then each loops over several tiles)."""
    return min(-(-spec.numel // TILE), max_programs)


def _median_octave(count: Tensor, coarse: Tensor) -> tuple[Tensor, Tensor]:
    """The octave of the lower median (rank ``floor((count - 1) / 2)``) of each row of counts per octave, and the
    median's rank within it, both ``[rows]``; found as :func:`~lightning_wd.effective_lr.summarize_partials` finds
    it: the first octave whose cumulative count exceeds the rank."""
    rank = torch.floor((count - 1) / 2).unsqueeze(-1)
    cumulative = coarse.cumsum(-1)
    octave = torch.searchsorted(cumulative, rank.contiguous(), right=True).clamp_(max=_OCTAVES - 1)
    before = cumulative.gather(-1, octave) - coarse.gather(-1, octave)  # the elements in the octaves below it
    return octave.squeeze(-1), (rank - before).squeeze(-1)


def _summarize(ext: Tensor, sum_count: Tensor, octave: Tensor, rank: Tensor, fine: Tensor) -> Tensor:
    """``[rows, 4]`` fp32 ``[min, max, mean, median]``, computed as
    :func:`~lightning_wd.effective_lr.summarize_partials` computes them (so the same numbers to the last bit), from
    ``ext`` ``[rows, 2]``, ``sum_count`` ``[rows, 2]``, the median's ``octave`` and ``rank`` in it, and ``fine``,
    the counts of that octave's bins ``[rows, 128]``. A row of no elements is NaN."""
    mn, mx, count = ext[:, 0].double(), ext[:, 1].double(), sum_count[:, 1]
    mean = sum_count[:, 0] / count
    b = torch.searchsorted(fine.cumsum(-1), rank.unsqueeze(-1).contiguous(), right=True).clamp_(max=_BINS - 1)
    b = b.squeeze(-1) + (octave << MANTISSA_BITS)
    low, high = (((b + i + _FIRST_BIN_BITS) << _SHIFT).to(torch.int32).view(torch.float32).double() for i in (0, 1))
    median = torch.sqrt(low * high).clamp(mn, mx)  # the end bins' centres can lie outside the data
    stats = torch.stack([mn, mx, mean, median], -1)
    return stats.masked_fill((count == 0).unsqueeze(-1), float("nan")).float()


class _Fill(NamedTuple):
    """Elements ``start:stop`` of a staged spec's roots, filled at ``offset`` of the scratch buffer."""

    spec: RateSpec
    start: int
    stop: int
    offset: int


class _StagedLaunch(NamedTuple):
    """One launch of staged states: its fills, then per fill (a table row) the row in the block and the first of
    the row's partial slots it writes, on a grid of ``programs`` x fills."""

    fills: list[_Fill]
    rows: list[tuple[int, int]]
    programs: int
    key: _LaunchKey

    @classmethod
    def pack(cls, pack: list[tuple[int, _Fill]], programs: int, key: _LaunchKey) -> _StagedLaunch:
        """Whole small states side by side: each row's every slot written by this launch's ``programs``."""
        return cls([fill for _, fill in pack], [(r, 0) for r, _ in pack], programs, key)


def _staged_key(spec: RateSpec, numel: int) -> _LaunchKey:
    """The kernels' key of ``numel`` fp32 roots of ``spec`` in the scratch buffer (at a 64-byte boundary, so aligned
    where ``numel`` is a multiple of 16)."""
    return _LaunchKey.with_state(spec, torch.float32, False, 0, numel)


class _Block:
    """Rows of one token (:func:`_blocks`), and what phase 1 leaves for phase 2 about them."""

    def __init__(self, token: Hashable | None, index: list[int], programs: int) -> None:
        self.token = token
        self.index = index  # the spec of each row
        self.programs = programs  # the largest grid of its specs: the partials' rows per spec
        self.launches: list[tuple[int, int, _LaunchKey]] = []  # first table row, rows, the kernels' key
        self.staged: list[tuple[int, _StagedLaunch]] = []  # first table row, the launch (see _TritonPass._stage)
        self.out_index: Tensor | None = None  # [rows] int64, self.index on the device
        self.ext: Tensor | None = None  # [rows, 2] fp32 min, max
        self.sum_count: Tensor | None = None  # [rows, 2] fp64 sum, count
        self.octave: Tensor | None = None  # [rows] int64, the median's octave
        self.rank: Tensor | None = None  # [rows] fp64, the median's rank within it
        self.buckets: Tensor | None = None  # [rows] int64, each row's bucket (n_buckets for none)


def _blocks(tokens: list[Hashable | None], grids: list[int], max_programs: int) -> list[_Block]:
    """The rows grouped by token (in the order of each token's first appearance), in blocks.

    Sharded rows in blocks of ``BLOCK_ROWS``, in their order: only the sequence of tokens decides them, so every
    process makes the same ``reduce`` calls with blocks of the same sizes and rows (a shard's grid may differ from
    rank to rank). Whole rows, which no process reduces, largest grid first, in blocks of as many rows as fit into
    the partials of ``BLOCK_ROWS`` full grids (up to ``_MAX_BLOCK_ROWS``): a block's launches and torch ops are then
    shared by many parameters, and a small parameter rarely waits in the grid of a large one.
    """
    by_token: dict[Hashable | None, list[int]] = {}
    for i, t in enumerate(tokens):
        by_token.setdefault(t, []).append(i)
    blocks = []
    for t, index in by_token.items():
        if t is not None:
            for k in range(0, len(index), BLOCK_ROWS):
                chunk = index[k : k + BLOCK_ROWS]
                blocks.append(_Block(t, chunk, max(1, max(grids[i] for i in chunk))))
            continue
        chunk, programs = [], 1
        for i in sorted(index, key=lambda i: -grids[i]):  # stable: in their order within a grid size
            wider = max(programs, grids[i])
            if chunk and (len(chunk) == _MAX_BLOCK_ROWS or (len(chunk) + 1) * wider > BLOCK_ROWS * max_programs):
                blocks.append(_Block(t, chunk, programs))
                chunk, wider = [], max(1, grids[i])
            chunk.append(i)
            programs = wider
        blocks.append(_Block(t, chunk, programs))
    return blocks


def _no_extremes(rows: int, device: torch.device) -> Tensor:
    """``[rows, 2]`` fp32 rows of ``(+inf, -inf)``: the min and max of no elements."""
    ext = torch.empty(rows, 2, dtype=torch.float32, device=device)
    ext[:, 0].fill_(float("inf"))  # fill_, not a tensor from a list: a copy from pageable memory waits for the device
    ext[:, 1].fill_(float("-inf"))
    return ext


def _index_tensor(values: list[int], device: torch.device) -> Tensor:
    """``values`` as an int64 tensor on ``device``, copied without waiting for the device (from pinned memory)."""
    t = torch.tensor(values, dtype=torch.int64, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True)


def _extremes_by_index(ext: Tensor, index: Tensor, rows: int) -> Tensor:
    """``[rows, 2]`` fp32: the min and max of the rows of ``ext`` with each index, NaN where one of them is NaN (as
    torch.aminmax; ``scatter_reduce_`` does not promise to propagate a NaN, so NaNs are counted apart)."""
    nan = ext.isnan()
    lo = _no_extremes(rows, ext.device)
    lo[:, 0].scatter_reduce_(0, index, ext[:, 0].masked_fill(nan[:, 0], float("inf")), "amin")
    lo[:, 1].scatter_reduce_(0, index, ext[:, 1].masked_fill(nan[:, 1], float("-inf")), "amax")
    any_nan = torch.zeros(rows, dtype=torch.float32, device=ext.device).index_add_(0, index, nan.any(1).float())
    return lo.masked_fill((any_nan > 0).unsqueeze(1), float("nan"))


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """A kernel runs on the current CUDA device: make it the specs' (a host-side switch, no sync)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def triton_rate_statistics(
    specs: Sequence[RateSpec],
    per_parameter: bool = True,
    per_group: bool = True,
    shards: Sequence[Hashable | None] | None = None,
    reduce: Callable[[Partials, Any], None] | None = None,
    buckets: Sequence[int | None] | None = None,
    n_buckets: int = 0,
) -> Tensor:
    """:func:`lightning_wd.effective_lr.rate_statistics` by the Triton kernels: ``[min, max, mean, median]`` fp32 of
    each spec's rate (the first ``len(specs)`` rows, with ``per_parameter``), of the specs of each bucket together
    (the next ``n_buckets`` rows), and of all of them (the last row, with ``per_group``): the same numbers, with no
    host read.

    Each state is read twice, by one launch per phase for the like states of a block (see the module's docstring):
    phase 1 gives every row's min, max, sum, count and counts per octave, phase 2 the counts within the median's
    octave of the row, of its bucket and of the group. The rows are held in blocks
    (:data:`~lightning_wd.effective_lr.BLOCK_ROWS` sharded ones, or as many whole ones as fit into as many programs'
    partials), whose partials (one row per program of a capped grid: on an H200 at most 9 MB per block in phase 1,
    17 MB in phase 2, 26 MB with buckets) are reduced by torch ops; between the phases each row keeps a few numbers,
    so the memory grows with the number of parameters only as the output does.

    Sharded parameters (``shards[i]`` a token, not ``None``) get blocks of their own, as in ``rate_statistics``, and
    two ``reduce(partials, token)`` calls per block, every process the same calls in the same order: after phase 1
    with ``Partials(ext, sums)``, ``ext`` ``[rows, 2]`` fp32 ``[min, max]`` and ``sums`` ``[rows, 2 + 128]`` fp64
    ``[sum, count, counts per octave]``; after phase 2 with ``ext`` ``[rows, 2]`` of ``(+inf, -inf)`` (which the
    reduction leaves as they are) and ``sums`` ``[rows, 128 * k]`` fp64, the counts in the median's octave of each
    of the ``k`` targets (group, bucket, row) the call reports. So octaves and medians are the whole parameters'.

    Args:
        specs: the param group's rates, each accepted by :func:`triton_accepts` (on the CPU, too, when the kernels
            run in Triton's interpreter), all on one device.
        per_parameter: return a row per spec.
        per_group: return the group's row.
        shards: per spec, ``None`` for a whole tensor, else a token naming its sharding (default: all whole).
        reduce: ``reduce(partials, token)`` turns the rows of a block of sharded specs into those of the whole
            parameters (an ``all_reduce``: ``ext`` by min and max, ``sums`` by sum); needed with sharded specs.
        buckets: per spec, the index of its bucket (``0 <= b < n_buckets``), or ``None`` (default: none).
        n_buckets: the number of bucket rows (a bucket of no specs gives a NaN row).

    Raises:
        ValueError: for no specs, a spec that :func:`triton_accepts` refuses, specs on more than one device (the
            eager pass handles such a group), ``shards`` or ``buckets`` of another length than ``specs``, a bucket
            out of range, or sharded specs without ``reduce``.
    """
    if not specs:
        raise ValueError("triton_rate_statistics needs at least one RateSpec")
    staged = []
    for i, spec in enumerate(specs):
        read = triton_accepts(spec, interpret=_INTERPRETED)
        if not read and not stageable(spec, interpret=_INTERPRETED):
            raise ValueError(f"spec {i} is not one the Triton kernels take (triton_accepts, triton_stages); use"
                             " rate_statistics")
        staged.append(not read)
    device = specs[0].device
    if any(spec.device != device for spec in specs):
        raise ValueError("the specs of triton_rate_statistics must be on one device; use rate_statistics")
    tokens = list(shards) if shards is not None else [None] * len(specs)
    bucket_of = list(buckets) if buckets is not None else [None] * len(specs)
    if len(tokens) != len(specs) or len(bucket_of) != len(specs):
        raise ValueError(f"{len(tokens)} shards and {len(bucket_of)} buckets for {len(specs)} specs")
    if any(b is not None and not 0 <= b < n_buckets for b in bucket_of):
        raise ValueError(f"buckets must be None or in [0, {n_buckets})")
    if any(t is not None for t in tokens) and reduce is None:
        raise ValueError("sharded specs need a `reduce`")

    return checked_rate_statistics(specs, per_parameter, per_group, tokens, reduce, bucket_of, n_buckets, staged)


def checked_rate_statistics(specs: Sequence[RateSpec], per_parameter: bool, per_group: bool,
                            tokens: list[Hashable | None], reduce: Callable[[Partials, Any], None] | None,
                            bucket_of: list[int | None], n_buckets: int, staged: list[bool]) -> Tensor:
    """:func:`triton_rate_statistics` for arguments already checked (``rate_statistics`` vets every spec before it
    chooses this pass: a second check would repeat that host work at each logging step); ``staged[i]``: spec ``i``
    is staged (:func:`triton_stages`), not read as stored."""
    device = specs[0].device
    with _device_guard(device):
        return _statistics(specs, per_parameter, per_group, tokens, reduce, bucket_of, n_buckets, device, staged)


def _statistics(
    specs: Sequence[RateSpec],
    per_parameter: bool,
    per_group: bool,
    tokens: list[Hashable | None],
    reduce: Callable[[Partials, Any], None] | None,
    bucket_of: list[int | None],
    n_buckets: int,
    device: torch.device,
    staged: list[bool],
) -> Tensor:
    """:func:`triton_rate_statistics` once its arguments are checked, on the current device."""
    run = _TritonPass(specs, per_parameter, per_group, reduce, bucket_of, n_buckets, device, staged)
    if not len(run.out):  # nothing asked for (on every process alike: no reduce calls either)
        return run.out
    blocks = run.blocks(tokens)
    run.coarse(blocks)
    run.fine(blocks)
    return run.finish()


class _TritonPass:
    """One call of the Triton pass: the output rows, the launches, and what phase 1 leaves for phase 2 about the
    group and the buckets (see :func:`triton_rate_statistics`)."""

    def __init__(self, specs: Sequence[RateSpec], per_parameter: bool, per_group: bool, reduce: Any,
                 bucket_of: list[int | None], n_buckets: int, device: torch.device, staged: list[bool]) -> None:
        self.specs, self.per_parameter, self.per_group, self.reduce = specs, per_parameter, per_group, reduce
        self.bucket_of, self.n_buckets, self.device = bucket_of, n_buckets, device
        self.first_bucket = len(specs) if per_parameter else 0
        self.out = torch.empty(self.first_bucket + n_buckets + (1 if per_group else 0), len(STATS),
                               dtype=torch.float32, device=device)
        self.cap = _max_programs(device)
        self.f64 = {"dtype": torch.float64, "device": device}
        self.bucket_index: Tensor | None = None
        self.staged = staged
        self.scratch: Tensor | None = None  # where staged states are filled, one launch's worth at a time

    def blocks(self, tokens: list[Hashable | None]) -> list[_Block]:
        """The blocks, and for all of them one upload of int64 words: the launch tables (a block's rows grouped by
        the kernels they need, one launch per group and phase), then each block's output rows, then each row's
        bucket (``n_buckets`` for none)."""
        blocks = _blocks(tokens, [_grid(spec, self.cap) for spec in self.specs], self.cap)
        plans = self._stage(blocks)
        words: list[int] = []
        for block, staged in zip(blocks, plans):
            by_key: dict[_LaunchKey, list[int]] = {}
            for r, i in enumerate(block.index):
                if not self.staged[i]:
                    by_key.setdefault(_LaunchKey.of(self.specs[i]), []).append(r)
            for key, rows in by_key.items():
                block.launches.append((len(words) // _COLUMNS, len(rows), key))
                for r in rows:
                    spec = self.specs[block.index[r]]
                    words += (spec.fill.flat.data_ptr(), spec.numel, _word(spec.scale), _word(spec.eps), r, 0,
                              block.programs)
            for launch in staged:
                block.staged.append((len(words) // _COLUMNS, launch))
                for fill, (r, first) in zip(launch.fills, launch.rows):
                    assert self.scratch is not None
                    address = self.scratch.data_ptr() + fill.offset * self.scratch.element_size()
                    words += (address, fill.stop - fill.start, _word(fill.spec.scale), _word(fill.spec.eps), r, first,
                              block.programs)
        sizes = [len(block.index) for block in blocks]
        n_rows, out_at = sum(sizes), len(words)
        words += (i for block in blocks for i in block.index)
        if self.n_buckets:
            words += (self.n_buckets if self.bucket_of[i] is None else self.bucket_of[i]
                      for block in blocks for i in block.index)
        uploaded = _index_tensor(words, self.device)  # one host-to-device copy, not waited for
        self.table = uploaded[:out_at].view(-1, _COLUMNS)
        for block, out_index in zip(blocks, uploaded[out_at : out_at + n_rows].split(sizes)):
            block.out_index = out_index
        if self.n_buckets:
            self.bucket_index = uploaded[out_at + n_rows :]
            for block, ids in zip(blocks, self.bucket_index.split(sizes)):
                block.buckets = ids
        return blocks

    def _stage(self, blocks: list[_Block]) -> list[list[_StagedLaunch]]:
        """The launches of each block's staged specs, and the scratch buffer they are filled
        into: as large as the largest launch's fills (the eager pass's chunk, or a larger share of a huge state).

        A state larger than the chunk goes in pieces, one launch each (:func:`_pieces`, over its block's slots). The
        smaller ones that share the kernels' key are filled side by side, each from a 64-byte boundary, and read by
        one launch of as many table rows, as states read as stored are: a model's many small parameters (biases,
        norms) cost a launch per phase, not one per parameter."""
        at_least = _stage_elements(self.device)
        plans: list[list[_StagedLaunch]] = []
        for block in blocks:
            launches: list[_StagedLaunch] = []
            small: dict[_LaunchKey, list[tuple[int, RateSpec]]] = {}
            for r, i in enumerate(block.index):
                if not self.staged[i]:
                    continue
                spec = self.specs[i]
                if spec.numel <= at_least:
                    small.setdefault(_staged_key(spec, spec.numel), []).append((r, spec))
                    continue
                for start, stop, programs, first in _pieces(spec.numel, spec.row, block.programs, at_least):
                    launches.append(_StagedLaunch([_Fill(spec, start, stop, 0)], [(r, first)], programs,
                                                  _staged_key(spec, stop - start)))
            for key, members in small.items():
                pack: list[tuple[int, _Fill]] = []
                offset = 0
                for r, spec in members:
                    if pack and offset + spec.numel > at_least:
                        launches.append(_StagedLaunch.pack(pack, block.programs, key))
                        pack, offset = [], 0
                    pack.append((r, _Fill(spec, 0, spec.numel, offset)))
                    offset += -(-spec.numel // 16) * 16  # the next state 64-byte aligned: its loads as keyed
                launches.append(_StagedLaunch.pack(pack, block.programs, key))
            plans.append(launches)
        extent = max((f.offset + f.stop - f.start for found in plans for launch in found for f in launch.fills),
                     default=0)
        if any(plans):
            self.scratch = torch.empty(max(1, extent), dtype=torch.float32, device=self.device)
        return plans

    def _launch_staged(self, block: _Block, kernel: Any, part: Tensor, *args: Any, **kwargs: Any) -> None:
        """The staged launches of ``block``, each after its fills: the launches of one stream run in order, so the
        next fill waits for the kernel that reads the scratch before it."""
        for first, launch in block.staged:
            for fill in launch.fills:
                if fill.stop > fill.start:
                    assert self.scratch is not None
                    n = fill.stop - fill.start
                    fill.spec.fill(fill.start, fill.stop, self.scratch[fill.offset : fill.offset + n])
            kernel[(launch.programs, len(launch.fills))](self.table[first:], part, *args, **_constexprs(launch.key),
                                                          **kwargs)

    # --- phase 1: min, max, sum, count and counts per octave of every row; the median's octaves ------------------
    def coarse(self, blocks: list[_Block]) -> None:
        n_buckets, f64 = self.n_buckets, self.f64
        if self.per_group:
            self.group_sums = torch.zeros(1, _COARSE - 2, **f64)  # sum, count, counts per octave
        if n_buckets:
            self.bucket_sums = torch.zeros(n_buckets + 1, _COARSE - 2, **f64)  # and a last row for no bucket
        for block in blocks:
            # every program of the grid writes its slot: the partial of no elements past its state's tiles
            part = torch.empty(len(block.index), block.programs, _COARSE, **f64)
            for first, rows, key in block.launches:
                _coarse_kernel[(block.programs, rows)](self.table[first:], part, **_constexprs(key))
            self._launch_staged(block, _coarse_kernel, part)
            ext = torch.stack([part[:, :, 0].amin(1), part[:, :, 1].amax(1)], 1).float()  # exact: fp32 values
            sums = part[:, :, 2:].sum(1)
            if block.token is not None:
                self.reduce(Partials(ext, sums), block.token)
            block.ext = ext
            if self.per_parameter:  # each op here is a launch at every logging step: only for the rows asked for
                block.sum_count = sums[:, :2].clone()  # not a view: the counts per octave can go
                block.octave, block.rank = _median_octave(sums[:, 1], sums[:, 2:])
            if self.per_group:
                self.group_sums.add_(sums.sum(0))
            if n_buckets:
                self.bucket_sums.index_add_(0, block.buckets, sums)
        all_ext = torch.cat([block.ext for block in blocks]) if len(blocks) > 1 else blocks[0].ext
        self.group_octave = None
        if self.per_group:
            self.group_ext = torch.stack([all_ext[:, 0].amin(), all_ext[:, 1].amax()]).unsqueeze(0)  # NaN-propagating
            self.group_octave, self.group_rank = _median_octave(self.group_sums[:, 1], self.group_sums[:, 2:])
            self.group_fine = torch.zeros(1, _BINS, **f64)
        self.bucket_octave = None
        if n_buckets:
            self.bucket_ext = _extremes_by_index(all_ext, self.bucket_index, n_buckets + 1)
            self.bucket_octave, self.bucket_rank = _median_octave(self.bucket_sums[:, 1], self.bucket_sums[:, 2:])
            self.bucket_octave[n_buckets:].fill_(-1)  # no bucket: matches no octave
            self.bucket_fine = torch.zeros(n_buckets + 1, _BINS, **f64)

    # --- phase 2: the counts in the median's octave of each row, bucket and the group ----------------------------
    def fine(self, blocks: list[_Block]) -> None:
        # the slots of the fine histogram, in the order in which an element's octave is matched (see _fine_kernel)
        names = [name for name, on in (("group", self.per_group), ("bucket", self.n_buckets > 0),
                                       ("row", self.per_parameter)) if on]
        self.slot = {name: k for k, name in enumerate(names)}
        width = _BINS * len(names)
        slots = {"ROW_SLOT": self.slot.get("row", -1), "BUCKET_SLOT": self.slot.get("bucket", -1),
                 "GROUP_SLOT": self.slot.get("group", -1), "WIDTH": width,
                 "NBINS": _BINS * (1 << (len(names) - 1).bit_length())}
        for block in blocks:
            rows = len(block.index)
            part = torch.empty(rows, block.programs, width, **self.f64)  # every program writes its slot
            # a target not asked for is not read (its slot is -1): the table, an int64 tensor, stands in for it
            octaves = [self.table if t is None else t
                       for t in (block.octave, block.buckets, self.bucket_octave, self.group_octave)]
            for first, n, key in block.launches:
                _fine_kernel[(block.programs, n)](self.table[first:], part, *octaves, **_constexprs(key), **slots)
            self._launch_staged(block, _fine_kernel, part, *octaves, **slots)
            fine = part.sum(1)
            if block.token is not None:
                # the extremes are known already: rows of (+inf, -inf), which min and max leave as they are
                self.reduce(Partials(_no_extremes(rows, self.device), fine), block.token)
            self._fine_block(block, fine)

    def _counts(self, fine: Tensor, name: str) -> Tensor:
        return fine[:, self.slot[name] * _BINS : (self.slot[name] + 1) * _BINS]

    def _fine_block(self, block: _Block, fine: Tensor) -> None:
        """Each element is counted in one slot, the first target whose octave it is in: take each target's counts
        from the slot that holds them."""
        group_octave = self.group_octave
        if self.n_buckets:  # this block's rows' counts in their bucket's octave, where the group's slot took them
            row_bucket_octave = self.bucket_octave[block.buckets]
            in_bucket = self._counts(fine, "bucket")
            if self.per_group:
                in_bucket = torch.where((row_bucket_octave == group_octave).unsqueeze(-1), self._counts(fine, "group"),
                                        in_bucket)
            self.bucket_fine.index_add_(0, block.buckets, in_bucket)
        if self.per_parameter:  # the row's counts, where they are not in the slot of the bucket or the group
            own = self._counts(fine, "row")
            if self.n_buckets:
                own = torch.where((block.octave == row_bucket_octave).unsqueeze(-1), self._counts(fine, "bucket"), own)
            if self.per_group:
                own = torch.where((block.octave == group_octave).unsqueeze(-1), self._counts(fine, "group"), own)
            stats = _summarize(block.ext, block.sum_count, block.octave, block.rank, own)
            first, rows = block.index[0], len(block.index)
            if block.index == list(range(first, first + rows)):
                self.out[first : first + rows] = stats
            else:  # rows sorted by size, or sharded and whole parameters in one group
                self.out.index_copy_(0, block.out_index, stats)
        if self.per_group:
            self.group_fine.add_(self._counts(fine, "group").sum(0))

    def finish(self) -> Tensor:
        n, first = self.n_buckets, self.first_bucket
        if n:
            self.out[first : first + n] = _summarize(self.bucket_ext[:n], self.bucket_sums[:n, :2],
                                                     self.bucket_octave[:n], self.bucket_rank[:n], self.bucket_fine[:n])
        if self.per_group:
            self.out[-1] = _summarize(self.group_ext, self.group_sums[:, :2], self.group_octave, self.group_rank,
                                      self.group_fine)[0]
        return self.out
