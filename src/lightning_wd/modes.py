"""The decay modes and the checks on their arguments, shared by the callback and the plain-PyTorch API."""

from __future__ import annotations

import math
from typing import Literal, Union

from torch import Tensor

Mode = Literal["decoupled", "coupled", "independent", "corrected"]
MODES: tuple[str, ...] = ("decoupled", "coupled", "independent", "corrected")
#: the modes whose decay is measured against a reference lr ``lr_max``
WITH_LR_MAX: tuple[str, ...] = ("independent", "corrected")
Scalar = Union[float, Tensor]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}.")
    return mode


def _check_number(name: str, value: object, accepted: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number ({accepted}), got {value!r}.")
    return float(value)


def check_weight_decay(weight_decay: float | None) -> float | None:
    if weight_decay is None:
        return None
    value = _check_number("weight_decay", weight_decay, "a float >= 0 or None")
    if value < 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
    return value


def check_lr_max(lr_max: float | None) -> float | None:
    if lr_max is None:
        return None
    value = _check_number("lr_max", lr_max, "a float > 0 or None (the group's peak or initial lr)")
    if value <= 0:
        raise ValueError(f"`lr_max` must be a float > 0 or None (the group's peak or initial lr), got {lr_max!r}.")
    return value


def check_timescale(timescale: float | None, mode: str, weight_decay: float | None) -> float | None:
    """``timescale`` (> 0, finite), with a mode that shrinks the weights and no explicit ``weight_decay``."""
    if timescale is None:
        return None
    value = _check_number("timescale", timescale, "a float > 0 or None")
    if value <= 0:
        raise ValueError(f"`timescale` must be > 0, got {timescale!r}.")
    if mode == "coupled":
        raise ValueError("`timescale` sets how fast the weights decay; mode='coupled' does not shrink them.")
    if weight_decay is not None:
        raise ValueError("Pass either `weight_decay` or `timescale` (which sets the weight decay), not both.")
    return value


def per_step_decay(
    mode: str, lr: Scalar, weight_decay: Scalar, lr_max: float | None, step_size: Scalar | None = None
) -> Scalar | None:
    """The ``x`` of ``p *= 1 - x`` that ``mode`` applies in one step (``None`` for ``"coupled"``, which multiplies
    nothing: it adds ``weight_decay * p`` to the gradient).

    ``step_size`` is what the optimizer's own decoupled decay multiplies ``weight_decay`` by (``lr`` unless given:
    ``d * lr`` for Prodigy): ``decoupled`` is ``step_size * wd``, ``independent`` ``(lr / lr_max) * wd`` (the schedule,
    not the lr's size) and ``corrected`` ``step_size * (lr / lr_max) * wd`` (AdamC: ``wd * lr**2 / lr_max``).
    """
    step = lr if step_size is None else step_size
    if mode == "decoupled":
        return step * weight_decay
    if mode == "independent":
        return lr / lr_max * weight_decay
    if mode == "corrected":
        return step * (lr / lr_max) * weight_decay
    return None


def describe_mode_change(old: str, new: str, lr: float, old_lr_max: float | None, new_lr_max: float | None) -> str:
    """How the per-step decay changes when a run trained in ``old`` mode goes on in ``new`` mode (at lr ``lr``)."""
    if "coupled" in (old, new):
        return (
            "coupled decay adds wd*p to the gradient (scaled by the optimizer's adaptive denominator) and the other"
            " modes shrink the weights directly, so the decay changes in kind, not by one factor"
        )
    before = per_step_decay(old, lr, 1.0, old_lr_max)
    after = per_step_decay(new, lr, 1.0, new_lr_max)
    return f"the per-step decay changes by a factor {after / before:.4g} at the current lr {lr:.4g}"
