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

#: log10 range and bin count of the histogram median used for sharded parameters
HIST_LOG10_RANGE: tuple[float, float] = (-16.0, 4.0)
HIST_BINS: int = 4000

__all__ = [
    "HIST_BINS",
    "HIST_LOG10_RANGE",
    "STATS",
    "adam_effective_lr",
    "effective_lr_from_state",
    "histogram_median",
    "histogram_median_rel_error",
    "log10_histogram",
    "summary_stats",
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
    if isinstance(step, Tensor):
        bias_correction2 = 1 - torch.pow(beta2, step.to(v.device, torch.float64)).to(torch.float32)
        denom = v.sqrt() / bias_correction2.sqrt() + eps
    else:
        denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
    return lr / denom


def effective_lr_from_state(state: dict[str, Any], group: dict[str, Any], lr: float | Tensor | None = None) -> Tensor:
    """The effective lr of one parameter of a ``torch.optim.Adam``/``AdamW`` from its state and param group."""
    amsgrad = group.get("amsgrad", False)
    v = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
    step = state["step"]
    if isinstance(step, Tensor) and step.device.type == "cpu":
        step = float(step)  # a CPU scalar: reading it costs no device sync
    return adam_effective_lr(v, step, group["lr"] if lr is None else lr, group["betas"][1], group["eps"])


def summary_stats(x: Tensor) -> Tensor:
    """``[min, max, mean, median]`` of ``x`` as one fp32 tensor on ``x``'s device (no host transfer).

    ``median`` is torch's: the lower of the two middle values for an even number of elements.
    """
    x = x.detach().flatten().float()
    return torch.stack([x.min(), x.max(), x.mean(), x.median()])


def log10_histogram(x: Tensor, bins: int = HIST_BINS, log10_range: tuple[float, float] = HIST_LOG10_RANGE) -> Tensor:
    """Counts of ``log10(x)`` in ``bins`` equal bins over ``log10_range``; values outside are clamped to the ends.

    Counts add across shards, so an ``all_reduce(SUM)`` of the local histograms is the histogram of the whole tensor.
    """
    lo, hi = log10_range
    logs = torch.log10(x.detach().flatten().double()).clamp(lo, hi)
    return torch.histc(logs, bins=bins, min=lo, max=hi).double()


def histogram_median(hist: Tensor, log10_range: tuple[float, float] = HIST_LOG10_RANGE) -> Tensor:
    """The lower median from a :func:`log10_histogram`: the geometric centre of the bin that holds it.

    Its relative error against the exact (lower) median is at most :func:`histogram_median_rel_error`, for values
    inside ``log10_range``.
    """
    lo, hi = log10_range
    bins = hist.numel()
    total = hist.sum()
    # rank of the lower median, 1-based: ceil(n / 2)
    k = torch.ceil(total / 2).clamp(min=1)
    idx = torch.searchsorted(hist.cumsum(0), k.reshape(1)).clamp(max=bins - 1)
    width = (hi - lo) / bins
    centre = lo + (idx.double() + 0.5) * width
    return torch.pow(10.0, centre).reshape(())


def histogram_median_rel_error(bins: int = HIST_BINS, log10_range: tuple[float, float] = HIST_LOG10_RANGE) -> float:
    """Bound on ``|approx / exact - 1|`` of :func:`histogram_median`: half a bin in log10 space."""
    lo, hi = log10_range
    return 10 ** ((hi - lo) / bins / 2) - 1
