"""Decay of bf16/fp16 weights: when it is lost to rounding, and stochastic rounding that keeps it.

A decoupled decay step multiplies each weight by ``1 - x`` with ``x = lr * wd``. Write a weight as ``m * 2**e`` with
the mantissa ``1 <= m < 2``; the spacing of the format around it is ``eps * 2**e`` (bf16: ``eps = 2**-7``, fp16:
``2**-10``), so ``p * (1 - x)`` rounds back to ``p`` unless the change ``x * m * 2**e`` exceeds half of it, i.e.
unless ``m > eps / (2 * x)``. Hence:

- ``x >= eps / 2`` (bf16: ``2**-8``): every weight moves;
- ``eps / 4 < x < eps / 2``: only weights whose mantissa exceeds ``eps / (2 * x)`` move, by one unit in the last
  place each; for mantissas spread log-uniformly (weights spanning several powers of two) that is a fraction
  ``log2(4 * x / eps)`` of them (59% at ``x = 1.5 * 2**-9`` in bf16). A weight stops decaying once its mantissa has
  fallen below ``eps / (2 * x)``, so the decay stalls wherever the update does not move the weights;
- ``x <= eps / 4`` (bf16: ``2**-9``): no weight moves. With lr=1e-3 and wd=0.01, ``x = 1e-5``: a bf16 weight never
  decays (AdamW has the same flaw).

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

import math

import torch
from torch import Tensor

#: the dtypes whose decay can be lost to rounding, and that stochastic rounding serves
LOW_PRECISION: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)

__all__ = ["LOW_PRECISION", "decay_is_lost", "fraction_decayed", "lost_decay_message", "smallest_safe_decay",
           "stochastic_round"]


def smallest_safe_decay(dtype: torch.dtype) -> float:
    """The smallest per-step decay ``lr * wd`` that changes every weight of ``dtype``: ``eps / 2``."""
    return torch.finfo(dtype).eps / 2


def decay_is_lost(per_step_decay: float, dtype: torch.dtype) -> bool:
    """Whether ``p * (1 - per_step_decay)`` rounds back to ``p`` for some or all weights of ``dtype``."""
    return dtype in LOW_PRECISION and 0 < per_step_decay < smallest_safe_decay(dtype)


def fraction_decayed(per_step_decay: float, dtype: torch.dtype) -> float:
    """The fraction of weights of ``dtype`` that one step ``p *= 1 - per_step_decay`` moves, for mantissas spread
    log-uniformly over ``[1, 2)``: 1 at and above :func:`smallest_safe_decay`, 0 at and below half of it, and
    ``log2(4 * x / eps)`` in between (see the module docstring)."""
    if dtype not in LOW_PRECISION or per_step_decay >= smallest_safe_decay(dtype):
        return 1.0
    if per_step_decay <= 0:
        return 0.0
    return min(1.0, max(0.0, math.log2(4 * per_step_decay / torch.finfo(dtype).eps)))


def lost_decay_message(per_step_decay: float, dtype: torch.dtype) -> str:
    """What bf16/fp16 rounding does to a decay of ``per_step_decay`` per step, in words, for the warning."""
    x, safe = per_step_decay, smallest_safe_decay(dtype)
    moved = fraction_decayed(x, dtype)
    if moved == 0:
        what = f"at or below {safe / 2:.3g}, so no weight decays at all: p * (1 - {x:.3g}) rounds back to p"
    else:
        mantissa = torch.finfo(dtype).eps / (2 * x)
        what = (
            f"below {safe:.3g}, the smallest decay {dtype} applies to every weight: a step moves only the weights"
            f" whose mantissa exceeds {mantissa:.3f} (about {moved:.0%} of them, by one unit in the last place), and"
            " a weight stops decaying once its mantissa falls below that"
        )
    return f"{dtype} weights decay by {x:.3g} per step (p *= 1 - {x:.3g}), {what}."


def stochastic_round(y: Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> Tensor:
    """``y`` (fp32) rounded to ``dtype`` up or down at random, so that the expected result is ``y``."""
    nearest = y.to(dtype)
    towards = torch.where(nearest.float() > y, float("-inf"), float("inf")).to(dtype)
    other = torch.nextafter(nearest, towards)
    gap = other.float() - nearest.float()
    p_other = ((y - nearest.float()) / gap).nan_to_num_(0.0).clamp_(0, 1)
    u = torch.rand(y.shape, device=y.device, generator=generator)
    return torch.where(u < p_other, other, nearest)
