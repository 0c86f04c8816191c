"""The EffectiveLRMonitor's statistics pass as it was before the rate-space, streamed version (commit 92127b1 of
``src/lightning_wd/effective_lr.py``, unchanged but for what the benchmarks do not call): kept only so that
``stats_pass.py`` can time the old pass against the current one in the same run. Not part of the package.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

MANTISSA_BITS: int = 6
V_HAT_EXPONENTS: tuple[int, int] = (-100, 40)
HIST_BINS: int = (V_HAT_EXPONENTS[1] - V_HAT_EXPONENTS[0]) << MANTISSA_BITS
_FIRST_BIN_BITS = (V_HAT_EXPONENTS[0] + 127) << MANTISSA_BITS  # fp32 bits of 2**lo, shifted like the bin index
_LAST_BIN_BITS = _FIRST_BIN_BITS + HIST_BINS - 1
_SHIFT = 23 - MANTISSA_BITS





def adam_partial_stats(
    state: dict[str, Any],
    group: dict[str, Any],
    scratch: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """:func:`partial_stats` of one ``torch.optim.Adam``/``AdamW`` parameter, from its state and param group
    (``max_exp_avg_sq`` under AMSGrad); ``scratch`` as made by :func:`make_scratch`."""
    v = _second_moment(state, group)
    bias_correction2 = _bias_correction2(group["betas"][1], _step(state), v.device)
    return partial_stats(v, group["eps"], bias_correction2, scratch)


def _second_moment(state: dict[str, Any], group: dict[str, Any]) -> Tensor:
    """The ``v`` that Adam divides by: ``max_exp_avg_sq`` under AMSGrad, else ``exp_avg_sq``."""
    return state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]


def _bias_correction2(beta2: float, step: float | Tensor, device: torch.device) -> float | Tensor:
    """``1 - beta2^step``: a float for a host step, an fp32 tensor on ``device`` for a device step (no sync)."""
    if isinstance(step, Tensor):
        return (1 - torch.pow(beta2, step.to(device, torch.float64))).to(torch.float32)
    return 1 - beta2**step


def _step(state: dict[str, Any]) -> float | Tensor:
    step = state["step"]
    if isinstance(step, Tensor) and step.device.type == "cpu":
        return float(step)  # a CPU scalar: reading it costs no device sync
    return step




def make_scratch(numel: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The fp32 and int32 buffers that :func:`partial_stats` works in, for tensors of up to ``numel`` elements;
    reuse them across tensors (fresh allocations each cost page faults, which on a CPU take longer than the
    arithmetic)."""
    n = max(1, min(numel, 1 << 19 if device.type == "cpu" else 1 << 24))
    return torch.empty(n, dtype=torch.float32, device=device), torch.empty(n, dtype=torch.int32, device=device)


def partial_stats(
    v: Tensor,
    eps: float,
    bias_correction2: float | Tensor = 1.0,
    scratch: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Statistics of ``1 / (sqrt(v_hat) + eps)``, ``v_hat = v / bias_correction2``, that add up across shards, as
    one fp64 row: ``[min v_hat, max v_hat, sum of 1 / (sqrt(v_hat) + eps), count, hist_0, ..., hist_{HIST_BINS-1}]``.

    Multiplied by the lr, ``1 / (sqrt(v_hat) + eps)`` is the effective lr; since it falls as ``v_hat`` grows, its
    min and max come from the max and min of ``v_hat``, and its median from a histogram of ``v_hat``, whose bins
    are read straight off the bits of the fp32 numbers (for non-negative floats the bit pattern grows with the
    value): the exponent and the first :data:`MANTISSA_BITS` bits of the mantissa. Only the sum needs the
    elementwise map. Rows of shards combine with min, max and sums (:func:`combine_partials`, or one ``all_reduce``
    per operation across processes); an empty ``v`` gives the identities. Nothing is read on the host and ``v`` is
    left alone: ``v_hat`` is computed in fp32 in ``scratch`` (:func:`make_scratch`, made here when not given),
    :func:`chunk_elements` at a time.

    Example::

        >>> v_hat = torch.tensor([1e-4, 4e-4, 1e-2])
        >>> row = partial_stats(v_hat, eps=0.0)
        >>> row[:4].tolist()  # min, max, sum of 1 / sqrt(v_hat) = 100 + 50 + 10, count
        [9.999999747378752e-05, 0.009999999776482582, 160.0, 3.0]
    """
    x = v.detach().flatten()
    out = torch.zeros(4 + HIST_BINS, dtype=torch.float64, device=x.device)
    if x.numel() == 0:
        out[0], out[1] = float("inf"), float("-inf")
        return out
    values, indices = make_scratch(x.numel(), x.device) if scratch is None else scratch
    # counted from bin index 0, so that the offset of the first bin costs no pass over the elements
    counts = torch.zeros(_LAST_BIN_BITS + 1, dtype=torch.float64, device=x.device)
    mins, maxs, sums = [], [], []
    for chunk in x.split(values.numel()):
        v_hat = values[: chunk.numel()]
        if chunk.dtype == torch.float32:
            torch.div(chunk, bias_correction2, out=v_hat)
        else:  # a low-precision state (bf16 v) is summarized in fp32, like everything else
            v_hat.copy_(chunk).div_(bias_correction2)
        lo, hi = torch.aminmax(v_hat)
        mins.append(lo)
        maxs.append(hi)
        idx = torch.bitwise_right_shift(v_hat.view(torch.int32), _SHIFT, out=indices[: chunk.numel()])
        _count_bins(idx.clamp_(_FIRST_BIN_BITS, _LAST_BIN_BITS), counts)
        # torch's fp32 sum is a cascade sum, accurate to ~1e-7 without an fp64 copy
        sums.append(v_hat.sqrt_().add_(eps).reciprocal_().sum())
    out[:3] = torch.stack([torch.stack(mins).min(), torch.stack(maxs).max(), torch.stack(sums).sum()])
    out[3] = x.numel()
    out[4:] = counts[_FIRST_BIN_BITS:]
    return out


def _count_bins(idx: Tensor, counts: Tensor, bincount: bool | None = None) -> None:
    """``counts[i] += (idx == i).sum()`` for every ``i``: ``bincount`` on a CPU (the fastest there), elsewhere an
    ``index_add_`` into the fixed bins (``bincount`` sizes its output from the data, which costs a host sync;
    ``index_add_`` takes the int32 ``idx`` as it is, where ``scatter_add_`` would need an int64 copy)."""
    use_bincount = idx.device.type == "cpu" if bincount is None else bincount
    if use_bincount:
        counts += torch.bincount(idx, minlength=counts.numel())
    else:
        counts.index_add_(0, idx, torch.ones((), dtype=counts.dtype, device=counts.device).expand(idx.shape))


def combine_partials(partials: Tensor) -> Tensor:
    """The partials of the union of the tensors whose partials are the rows of ``partials``."""
    return torch.cat([partials[:, :1].min(0).values, partials[:, 1:2].max(0).values, partials[:, 2:].sum(0)])


def _rate(v_hat: Tensor, lr: float | Tensor, eps: float) -> Tensor:
    # the elementwise formula of partial_stats, in fp32, so that min and max are the elementwise values exactly
    return torch.sqrt(v_hat.float()).add_(eps).reciprocal_().mul_(lr)


def stats_from_partials(partials: Tensor, lr: float | Tensor, eps: float) -> Tensor:
    """``[min, max, mean, median]`` (fp32) of the effective lr ``lr / (sqrt(v_hat) + eps)`` for each row of
    partials ``[..., 4 + HIST_BINS]``.

    ``min``, ``max`` and ``mean`` are exact; ``median`` is the effective lr at the geometric centre of the histogram
    bin holding the median, within :func:`histogram_median_rel_error` (0.39%) of the exact lower median. A row of
    no elements (count 0) gives NaN for all four.
    """
    if isinstance(lr, Tensor):
        lr = lr.to(partials.device)
    count = partials[..., 3].clamp(min=1)
    mean = partials[..., 2] * lr / count
    # the lower median of the rate is the upper median of v_hat (the rate falls as v_hat grows): rank n // 2 + 1
    hist = partials[..., 4:]
    cum = hist.cumsum(-1)
    rank = torch.floor(cum[..., -1:] / 2) + 1
    b = torch.searchsorted(cum.contiguous(), rank.contiguous()).clamp(max=HIST_BINS - 1).squeeze(-1)
    edges = ((b.to(torch.int32) + _FIRST_BIN_BITS).unsqueeze(-1) + torch.tensor([0, 1], device=b.device)) << _SHIFT
    low, high = edges.to(torch.int32).view(torch.float32).double().unbind(-1)
    centre = torch.sqrt(low * high)
    median = 1 / (torch.sqrt(centre) + eps) * lr
    stats = [_rate(partials[..., 1], lr, eps).double(), _rate(partials[..., 0], lr, eps).double(), mean, median]
    stats = torch.stack(stats).movedim(0, -1)
    # no elements, no statistics (rather than the rate of an empty histogram's first bin)
    return stats.masked_fill(partials[..., 3:4] == 0, float("nan")).float()


def group_statistics(states: list[dict[str, Any]], group: dict[str, Any]) -> Tensor:
    """What the monitor did for one param group: a row of partials per parameter in shared scratch, all rows
    stacked, their combination, and one summary call for the parameters and the group."""
    v0 = _second_moment(states[0], group)
    scratch = make_scratch(max(_second_moment(s, group).numel() for s in states), v0.device)
    partials = torch.stack([adam_partial_stats(s, group, scratch) for s in states])
    rows = torch.cat([partials, combine_partials(partials).unsqueeze(0)])
    return stats_from_partials(rows, group["lr"], group["eps"])
