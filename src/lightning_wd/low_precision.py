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
    >>> w = torch.ones(10_000, dtype=torch.bfloat16)
    >>> for _ in range(100):
    ...     decay_weights_stochastic_([w], lr=1e-3, weight_decay=0.1, generator=torch.Generator().manual_seed(_))
    >>> round(w.float().mean().item(), 2)   # fp32 gives (1 - 1e-4) ** 100 = 0.990
    0.99
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_wd.decay import Scalar, _on_device, group_by_device_and_dtype, local_tensor

#: the dtypes whose decay can be lost to rounding, and that stochastic rounding serves
LOW_PRECISION: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)

__all__ = ["LOW_PRECISION", "decay_is_lost", "decay_weights_stochastic_", "smallest_safe_decay"]


def smallest_safe_decay(dtype: torch.dtype) -> float:
    """The smallest per-step decay ``lr * wd`` that changes every weight of ``dtype``: ``eps / 2``."""
    return torch.finfo(dtype).eps / 2


def decay_is_lost(per_step_decay: float, dtype: torch.dtype) -> bool:
    """Whether ``p * (1 - per_step_decay)`` rounds back to ``p`` for some or all weights of ``dtype``."""
    return dtype in LOW_PRECISION and 0 < per_step_decay < smallest_safe_decay(dtype)


def _stochastic_round(y: Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
    """``y`` (fp32) rounded to ``dtype`` up or down at random, so that the expected result is ``y``."""
    nearest = y.to(dtype)
    towards = torch.where(nearest.float() > y, float("-inf"), float("inf")).to(dtype)
    other = torch.nextafter(nearest, towards)
    gap = other.float() - nearest.float()
    p_other = ((y - nearest.float()) / gap).nan_to_num_(0.0).clamp_(0, 1)
    u = torch.rand(y.shape, device=y.device, generator=generator)
    return torch.where(u < p_other, other, nearest)


def decay_weights_stochastic_(
    params: Sequence[Tensor],
    lr: Scalar,
    weight_decay: float,
    skip: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """``p *= 1 - lr * weight_decay`` with stochastic rounding for bf16/fp16 tensors (others as ``decay_weights_``).

    Costs an fp32 temporary per tensor; meant for low-precision weights, where the plain product loses the decay.
    """
    if not params or weight_decay == 0:
        return
    factor: Scalar = 1 - lr * weight_decay
    for (device, dtype), (tensors,) in group_by_device_and_dtype([local_tensor(p) for p in params]).items():
        f = _on_device(factor, device)
        if skip is not None:
            f = torch.where(_on_device(skip, device) > 0, torch.ones((), device=device), f)
        if dtype not in LOW_PRECISION:
            torch._foreach_mul_(tensors, f)
            continue
        for t in tensors:  # per tensor: the rounding needs an fp32 temporary of the tensor's size
            t.copy_(_stochastic_round(t.float() * f, dtype, generator))
