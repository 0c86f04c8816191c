"""The decay modes and the checks on their arguments, shared by the callback and the plain-PyTorch API."""

from __future__ import annotations

from typing import Literal

Mode = Literal["decoupled", "coupled", "independent"]
MODES: tuple[str, ...] = ("decoupled", "coupled", "independent")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}.")
    return mode


def check_weight_decay(weight_decay: float | None) -> float | None:
    if weight_decay is None:
        return None
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise ValueError(f"`weight_decay` must be a float >= 0 or None, got {weight_decay!r}.")
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
    return float(weight_decay)


def check_lr_max(lr_max: float | None) -> float | None:
    if lr_max is None:
        return None
    if isinstance(lr_max, bool) or not isinstance(lr_max, (int, float)) or lr_max <= 0:
        raise ValueError(f"`lr_max` must be a float > 0 or None (the group's initial lr), got {lr_max!r}.")
    return float(lr_max)
