"""Adam's effective learning rate, and the statistics that summarize it, as plain torch functions.

Adam's update is ``p -= lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - beta1^t)`` and
``v_hat = v / (1 - beta2^t)``; for AMSGrad ``v`` is the running maximum ``max_exp_avg_sq``. The effective learning
rate of each element is the factor that multiplies ``m_hat``: ``lr / (sqrt(v_hat) + eps)``.

Example::

    >>> import torch
    >>> v = torch.tensor([1e-4, 1e-8])
    >>> adam_effective_lr(v, step=1, lr=1e-3, beta2=0.0, eps=1e-8)  # beta2=0: v_hat = v
    tensor([0.1000, 9.9990])
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

#: the statistics logged for every parameter, in this order
STATS: tuple[str, ...] = ("min", "max", "mean", "median")

#: the histogram of v_hat behind the median: ``2**MANTISSA_BITS`` bins per power of two of v_hat, over
#: ``2**V_HAT_EXPONENTS[0] <= v_hat < 2**V_HAT_EXPONENTS[1]`` (values outside go to the end bins)
MANTISSA_BITS: int = 6
V_HAT_EXPONENTS: tuple[int, int] = (-100, 40)
HIST_BINS: int = (V_HAT_EXPONENTS[1] - V_HAT_EXPONENTS[0]) << MANTISSA_BITS
_FIRST_BIN_BITS = (V_HAT_EXPONENTS[0] + 127) << MANTISSA_BITS  # fp32 bits of 2**lo, shifted like the bin index
_SHIFT = 23 - MANTISSA_BITS

__all__ = [
    "HIST_BINS",
    "STATS",
    "adam_effective_lr",
    "adam_v_hat",
    "combine_partials",
    "effective_lr_from_state",
    "histogram_median_rel_error",
    "partial_stats",
    "stats_from_partials",
]


def adam_effective_lr(
    v: Tensor,
    step: float | Tensor,
    lr: float | Tensor,
    beta2: float,
    eps: float,
) -> Tensor:
    """``lr / (sqrt(v / (1 - beta2^step)) + eps)``, computed in the order torch's Adam computes its denominator.

    Args:
        v: ``exp_avg_sq`` (or ``max_exp_avg_sq`` for AMSGrad).
        step: the optimizer step count ``t`` after the update (a float, or a tensor on any device).
        lr: the learning rate that the update used.
        beta2, eps: the group's hyperparameters.
    """
    bias_correction2 = _bias_correction2(beta2, step, v.device)
    if isinstance(bias_correction2, Tensor):
        denom = v.sqrt().div_(bias_correction2.sqrt()).add_(eps)
    else:
        denom = v.sqrt().div_(math.sqrt(bias_correction2)).add_(eps)
    # in place, and `reciprocal_().mul_(lr)` rather than `lr / denom`: scalar / tensor is a slow kernel on CPU
    # (3x the whole computation); the result differs from `lr / denom` by at most an ulp
    return denom.reciprocal_().mul_(lr)


def effective_lr_from_state(state: dict[str, Any], group: dict[str, Any], lr: float | Tensor | None = None) -> Tensor:
    """The effective lr of one parameter of a ``torch.optim.Adam``/``AdamW`` from its state and param group."""
    v = _second_moment(state, group)
    return adam_effective_lr(v, _step(state), group["lr"] if lr is None else lr, group["betas"][1], group["eps"])


def adam_v_hat(state: dict[str, Any], group: dict[str, Any], out: Tensor | None = None) -> Tensor:
    """``v_hat = v / (1 - beta2^t)`` of one Adam parameter in fp32 (``max_exp_avg_sq`` for AMSGrad), written into
    ``out`` (fp32, at least as many elements) when given, else into a new tensor.

    The effective lr is ``lr / (sqrt(v_hat) + eps)``; :func:`partial_stats` summarizes it from ``v_hat``.
    """
    v = _second_moment(state, group)
    bias_correction2 = _bias_correction2(group["betas"][1], _step(state), v.device)
    dest = out[: v.numel()].view(v.shape) if out is not None else None
    return torch.div(v.float(), bias_correction2, out=dest)


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


def partial_stats(v_hat: Tensor, eps: float, overwrite: bool = False, scratch: Tensor | None = None) -> Tensor:
    """Statistics of ``1 / (sqrt(v_hat) + eps)`` that add up across shards, as one fp64 row:
    ``[min v_hat, max v_hat, sum of 1 / (sqrt(v_hat) + eps), count, hist_0, ..., hist_{HIST_BINS-1}]``.

    Multiplied by the lr, ``1 / (sqrt(v_hat) + eps)`` is the effective lr; since it falls as ``v_hat`` grows, its
    min and max come from the max and min of ``v_hat``, and its median from a histogram of ``v_hat``, whose bins
    are read straight off the bits of the fp32 numbers (for non-negative floats the bit pattern grows with the
    value): the exponent and the first :data:`MANTISSA_BITS` bits of the mantissa. Only the sum needs the
    elementwise map. Rows of shards combine with min, max and sums (:func:`combine_partials`, or one ``all_reduce``
    per operation across processes); an empty ``v_hat`` gives the identities. Nothing is read on the host.
    ``overwrite=True`` lets the function use ``v_hat`` (fp32) as its scratch buffer; ``scratch``, an int32 tensor
    of at least ``v_hat.numel()`` elements, saves the allocation of the bin indices (large fresh allocations cost
    page faults that, on a CPU, take longer than the arithmetic).
    """
    x = v_hat.detach().flatten()
    out = torch.zeros(4 + HIST_BINS, dtype=torch.float64, device=x.device)
    if x.numel() == 0:
        out[0], out[1] = float("inf"), float("-inf")
        return out
    if x.dtype != torch.float32 or not overwrite:
        x = x.float() if x.dtype != torch.float32 else x.clone()
    out[0], out[1] = torch.aminmax(x)
    idx = torch.bitwise_right_shift(x.view(torch.int32), _SHIFT, out=None if scratch is None else scratch[: x.numel()])
    idx = idx.sub_(_FIRST_BIN_BITS).clamp_(0, HIST_BINS - 1)
    if x.device.type == "cpu":
        out[4:] = torch.bincount(idx, minlength=HIST_BINS)
    else:  # bincount sizes its output from the data (a host sync); scatter_add into fixed bins does not
        out[4:].scatter_add_(0, idx.long(), torch.ones((), dtype=torch.float64, device=x.device).expand(idx.shape))
    # torch's fp32 sum is a cascade sum, accurate to ~1e-7 without an fp64 copy of x
    out[2], out[3] = x.sqrt_().add_(eps).reciprocal_().sum(), x.numel()
    return out


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
    bin holding the median, within :func:`histogram_median_rel_error` (0.39%) of the exact lower median.
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
    return torch.stack(stats).movedim(0, -1).float()


def histogram_median_rel_error() -> float:
    """Bound on ``|approx / exact - 1|`` of the median, for ``v_hat`` inside the histogram's range (or where ``eps``
    dominates ``sqrt(v_hat)``, as for elements that never had a gradient).

    A bin spans at most a factor ``1 + 2**-MANTISSA_BITS`` of ``v_hat``; the rate varies at most as ``v_hat**-1/2``,
    so reporting the rate at the bin's geometric centre is off by at most a factor ``(1 + 2**-MANTISSA_BITS)**(1/4)``
    (plus 1e-6 for the fp32 arithmetic).
    """
    return (1 + 2.0**-MANTISSA_BITS) ** 0.25 - 1 + 1e-6
