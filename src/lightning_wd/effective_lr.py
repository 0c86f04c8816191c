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
    "combine_partials",
    "effective_lr_from_state",
    "histogram_median",
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
    if isinstance(step, Tensor):
        bias_correction2 = 1 - torch.pow(beta2, step.to(v.device, torch.float64)).to(torch.float32)
        denom = v.sqrt().div_(bias_correction2.sqrt()).add_(eps)
    else:
        denom = v.sqrt().div_(math.sqrt(1 - beta2**step)).add_(eps)
    # in place, and `reciprocal_().mul_(lr)` rather than `lr / denom`: scalar / tensor is a slow kernel on CPU
    # (3x the whole computation); the result differs from `lr / denom` by at most an ulp
    return denom.reciprocal_().mul_(lr)


def effective_lr_from_state(state: dict[str, Any], group: dict[str, Any], lr: float | Tensor | None = None) -> Tensor:
    """The effective lr of one parameter of a ``torch.optim.Adam``/``AdamW`` from its state and param group."""
    amsgrad = group.get("amsgrad", False)
    v = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
    step = state["step"]
    if isinstance(step, Tensor) and step.device.type == "cpu":
        step = float(step)  # a CPU scalar: reading it costs no device sync
    return adam_effective_lr(v, step, group["lr"] if lr is None else lr, group["betas"][1], group["eps"])


def partial_stats(
    x: Tensor,
    bins: int = HIST_BINS,
    log10_range: tuple[float, float] = HIST_LOG10_RANGE,
    overwrite: bool = False,
) -> Tensor:
    """Statistics of ``x`` that add up across shards: ``[min, max, sum, count, hist_0, ..., hist_{bins-1}]`` (fp64).

    ``hist`` counts ``log10(x)`` in ``bins`` equal bins over ``log10_range`` (values outside go to the end bins).
    The partials of several shards combine with min, max and sums (:func:`combine_partials`, or one
    ``all_reduce`` per operation across processes) into the partials of the whole tensor. An empty ``x`` gives the
    identities (+inf, -inf, 0, 0, zeros). Nothing is read on the host. ``overwrite=True`` lets the function use
    ``x`` (floating point) as its scratch buffer, which saves a temporary of ``x``'s size.
    """
    x = x.detach().flatten()
    out = torch.zeros(4 + bins, dtype=torch.float64, device=x.device)
    if x.numel() == 0:
        out[0], out[1] = float("inf"), float("-inf")
        return out
    out[0], out[1] = torch.aminmax(x)
    # an fp64 sum would first copy x to fp64 (the costliest op here); torch's cascade fp32 sum is accurate to ~1e-7
    out[2], out[3] = x.sum(), x.numel()
    lo, hi = log10_range
    logs = x.log10_() if overwrite and x.dtype == torch.float32 else torch.log10(x.float())
    idx = logs.sub_(lo).mul_(bins / (hi - lo)).clamp_(0, bins - 1).long()
    if x.device.type == "cpu":
        out[4:] = torch.bincount(idx, minlength=bins)
    else:  # bincount sizes its output from the data (a host sync); scatter_add into fixed bins does not
        out[4:].scatter_add_(0, idx, torch.ones((), dtype=torch.float64, device=x.device).expand(idx.shape))
    return out


def combine_partials(partials: Tensor) -> Tensor:
    """The partials of the union of the tensors whose partials are the rows of ``partials``."""
    return torch.cat([partials[:, :1].min(0).values, partials[:, 1:2].max(0).values, partials[:, 2:].sum(0)])


def stats_from_partials(partials: Tensor, log10_range: tuple[float, float] = HIST_LOG10_RANGE) -> Tensor:
    """``[min, max, mean, median]`` (fp32) for each row of partials ``[..., 4 + bins]``.

    ``median`` is the geometric centre of the histogram bin that holds the lower median: within
    :func:`histogram_median_rel_error` of the exact lower median (0.58% with the defaults), for values inside
    ``log10_range``.
    """
    mean = partials[..., 2] / partials[..., 3].clamp(min=1)
    stats = torch.stack([partials[..., 0], partials[..., 1], mean, histogram_median(partials[..., 4:], log10_range)])
    return stats.movedim(0, -1).float()


def histogram_median(hist: Tensor, log10_range: tuple[float, float] = HIST_LOG10_RANGE) -> Tensor:
    """The lower median from histogram(s) of ``log10`` values (last dim: bins), as the centre of its bin."""
    lo, hi = log10_range
    bins = hist.shape[-1]
    cum = hist.cumsum(-1)
    k = torch.ceil(cum[..., -1:] / 2).clamp(min=1)  # rank of the lower median, 1-based: ceil(n / 2)
    idx = torch.searchsorted(cum.contiguous(), k.contiguous()).clamp(max=bins - 1).squeeze(-1)
    return torch.pow(10.0, lo + (idx.double() + 0.5) * ((hi - lo) / bins))


def histogram_median_rel_error(bins: int = HIST_BINS, log10_range: tuple[float, float] = HIST_LOG10_RANGE) -> float:
    """Bound on ``|approx / exact - 1|`` of the histogram median: half a bin in log10 space (plus 1e-5 decades for
    the fp32 rounding of ``log10`` that can put a value on a bin edge into the neighbouring bin)."""
    lo, hi = log10_range
    return 10 ** ((hi - lo) / bins / 2 + 1e-5) - 1
