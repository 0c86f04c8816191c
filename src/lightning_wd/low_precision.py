"""Decay of bf16/fp16 weights: when it is lost to rounding, and stochastic rounding that keeps it.

A decoupled decay step multiplies each weight by ``1 - x`` with ``x = lr * wd``. In a format with machine epsilon
``eps`` (bf16: ``2**-7``, fp16: ``2**-10``) the spacing of numbers around a weight is between ``eps/2`` and ``eps``
of its magnitude, so ``p * (1 - x)`` rounds back to ``p`` for every weight when ``x < eps / 4`` and for some weights
when ``x < eps / 2``. With lr=1e-3 and wd=0.01, ``x = 1e-5``: a bf16 weight never decays (AdamW has the same flaw).

Stochastic rounding computes ``p * (1 - x)`` in fp32 and rounds it to the lower of the two neighbouring bf16/fp16
values or to the upper one, with probabilities that make the rounded value right *on average*; the decay then
accumulates over steps as it does in fp32.

Example::

    >>> import torch
    >>> from lightning_wd.decay import decay_weights_
    >>> w = torch.ones(10_000, dtype=torch.bfloat16)
    >>> for _ in range(100):
    ...     decay_weights_([w], lr=1e-3, weight_decay=0.1, stochastic_rounding=True)
    >>> round(w.float().mean().item(), 2)   # fp32 gives (1 - 1e-4) ** 100 = 0.990
    0.99
    >>> w = torch.ones(10_000, dtype=torch.bfloat16)
    >>> decay_weights_([w], lr=1e-3, weight_decay=0.1)   # without: 1 - 1e-4 rounds back to 1 in bf16
    >>> w.float().mean().item()
    1.0
"""

from __future__ import annotations

import torch
from torch import Tensor

#: the dtypes whose decay can be lost to rounding, and that stochastic rounding serves
LOW_PRECISION: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)

__all__ = ["LOW_PRECISION", "decay_is_lost", "smallest_safe_decay", "stochastic_round"]


def smallest_safe_decay(dtype: torch.dtype) -> float:
    """The smallest per-step decay ``lr * wd`` that changes every weight of ``dtype``: ``eps / 2``."""
    return torch.finfo(dtype).eps / 2


def decay_is_lost(per_step_decay: float, dtype: torch.dtype) -> bool:
    """Whether ``p * (1 - per_step_decay)`` rounds back to ``p`` for some or all weights of ``dtype``."""
    return dtype in LOW_PRECISION and 0 < per_step_decay < smallest_safe_decay(dtype)


def stochastic_round(y: Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> Tensor:
    """``y`` (fp32) rounded to ``dtype`` up or down at random, so that the expected result is ``y``."""
    nearest = y.to(dtype)
    towards = torch.where(nearest.float() > y, float("-inf"), float("inf")).to(dtype)
    other = torch.nextafter(nearest, towards)
    gap = other.float() - nearest.float()
    p_other = ((y - nearest.float()) / gap).nan_to_num_(0.0).clamp_(0, 1)
    u = torch.rand(y.shape, device=y.device, generator=generator)
    return torch.where(u < p_other, other, nearest)
