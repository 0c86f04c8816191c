"""Weight-decay schedules: the decay of each step as a function of the steps taken, as plain functions.

DINO and iBOT raise the decay over training (cosine, 0.04 to 0.4); others lower it. ``λ_0`` is the group's configured
``weight_decay``, ``λ_end`` the value reached after ``total`` steps, ``t`` the number of steps taken before this one:

- ``"cosine"``: ``λ_t = λ_end + (λ_0 - λ_end) * (1 + cos(π t / total)) / 2``
- ``"linear"``: ``λ_t = λ_0 + (λ_end - λ_0) * t / total``

after which ``λ_t`` stays at ``λ_end``. A group configured with no decay (``λ_0 = 0``, e.g. biases and norms) keeps
none.

Example::

    >>> [round(scheduled_weight_decay("cosine", 0.04, 0.4, t, total=4), 4) for t in range(6)]
    [0.04, 0.0927, 0.22, 0.3473, 0.4, 0.4]
"""

from __future__ import annotations

import math

SCHEDULES: tuple[str, ...] = ("cosine", "linear")

__all__ = ["SCHEDULES", "check_schedule", "scheduled_weight_decay"]


def check_schedule(schedule: str | None, weight_decay_end: float | None) -> str | None:
    """``schedule`` if it is one of :data:`SCHEDULES` (or ``None``) with the ``weight_decay_end`` it needs."""
    if schedule is None:
        if weight_decay_end is not None:
            raise ValueError("`weight_decay_end` needs a `schedule` ('cosine' or 'linear').")
        return None
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {', '.join(map(repr, SCHEDULES))} or None, got {schedule!r}.")
    if weight_decay_end is None:
        raise ValueError(f"`schedule={schedule!r}` needs `weight_decay_end`, the decay reached at the end of the run.")
    return schedule


def scheduled_weight_decay(schedule: str, wd0: float, wd_end: float, t: int, total: int) -> float:
    """``λ_t`` of ``schedule`` (see the module docstring) at the step taken after ``t`` steps of ``total``."""
    if wd0 == 0:
        return 0.0
    t = min(t, total)
    if schedule == "cosine":
        return wd_end + (wd0 - wd_end) * (1 + math.cos(math.pi * t / total)) / 2
    return wd0 + (wd_end - wd0) * t / total
