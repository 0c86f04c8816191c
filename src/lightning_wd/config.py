"""The validated configuration of a weight decay, shared by :class:`lightning_wd.WeightDecay` and
:func:`lightning_wd.attach_weight_decay`, and the argument checks every public entry point uses.

Every check names the argument it refuses and the values it accepts, and none coerces: ``native="False"`` is an
error, not ``True``.

Example::

    >>> DecayConfig(mode="corrected", weight_decay=0.1).mode
    'corrected'
    >>> DecayConfig(weight_decay=-1)
    Traceback (most recent call last):
    ...
    ValueError: `weight_decay` must be >= 0 (a float >= 0 or None), got -1.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from lightning_wd.modes import MODES, Mode
from lightning_wd.schedules import SCHEDULES

LrMax = Union[float, Sequence[float], None]

__all__ = [
    "DecayConfig",
    "LrMax",
    "check_bool",
    "check_choice",
    "check_number",
    "check_positive_int",
]


def check_bool(name: str, value: Any, optional: bool = False) -> bool | None:
    """``value`` if it is a bool (or ``None`` where ``optional``); a string such as ``"False"`` is refused, not read."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        accepted = "True, False or None" if optional else "True or False"
        raise TypeError(f"`{name}` must be {accepted}, got {value!r} ({type(value).__name__}).")
    return value


def check_choice(name: str, value: Any, choices: Collection[str], optional: bool = False) -> str | None:
    """``value`` if it is one of ``choices`` (or ``None`` where ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or value not in choices:
        accepted = ", ".join(map(repr, choices)) + (" or None" if optional else "")
        raise ValueError(f"`{name}` must be one of {accepted}, got {value!r}.")
    return value


def check_number(name: str, value: Any, low: float, low_inclusive: bool, accepted: str,
                 optional: bool = True) -> float | None:
    """``value`` as a finite float ``>= low`` (or ``> low``), or ``None`` where ``optional``; a bool, a string, a
    NaN, an infinity or an int too large for a float is refused, naming ``name`` and what is ``accepted``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be {accepted}, got {value!r} ({type(value).__name__}).")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be a finite number ({accepted}), got {value!r}.")
    if number < low or (number == low and not low_inclusive):
        raise ValueError(f"`{name}` must be {'>=' if low_inclusive else '>'} {low:g} ({accepted}), got {value!r}.")
    return number


def check_positive_int(name: str, value: Any, optional: bool = True) -> int | None:
    """``value`` if it is an int >= 1 (or ``None`` where ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int{' or None' if optional else ''}, got {value!r}.")
    return value


def _check_lr_max(lr_max: Any) -> float | tuple[float, ...] | None:
    accepted = "a float > 0, one per param group, or None (the group's peak or initial lr)"
    if isinstance(lr_max, Sequence) and not isinstance(lr_max, str):
        return tuple(check_number("lr_max", v, 0.0, False, accepted, optional=False) for v in lr_max)
    return check_number("lr_max", lr_max, 0.0, False, accepted)


@dataclass(frozen=True)
class DecayConfig:
    """What to do with the optimizer's decay, checked when made (see :func:`lightning_wd.attach_weight_decay` for
    the meaning of each field).

    ``total_steps`` (the length of a ``schedule``) and ``timescale_steps`` are in optimizer steps: the callback
    fills them in at fit start from the Trainer, a plain loop passes them.
    """

    mode: Mode = "decoupled"
    weight_decay: float | None = None
    lr_max: float | tuple[float, ...] | None = None
    native: bool = True
    stochastic_rounding: bool = False
    schedule: Literal["cosine", "linear"] | None = None
    weight_decay_end: float | None = None
    cautious: bool = False
    total_steps: int | None = None
    timescale_steps: float | None = None

    def __post_init__(self) -> None:
        decay = "a float >= 0 or None"
        checked = {
            "mode": check_choice("mode", self.mode, MODES),
            "weight_decay": check_number("weight_decay", self.weight_decay, 0.0, True, decay),
            "lr_max": _check_lr_max(self.lr_max),
            "native": check_bool("native", self.native),
            "stochastic_rounding": check_bool("stochastic_rounding", self.stochastic_rounding),
            "schedule": check_choice("schedule", self.schedule, SCHEDULES, optional=True),
            "weight_decay_end": check_number("weight_decay_end", self.weight_decay_end, 0.0, True, decay),
            "cautious": check_bool("cautious", self.cautious),
            "total_steps": check_positive_int("total_steps", self.total_steps),
            "timescale_steps": check_number("timescale_steps", self.timescale_steps, 0.0, False, "a float > 0 or None"),
        }
        for key, value in checked.items():
            object.__setattr__(self, key, value)
        self._check_combinations()

    def _check_combinations(self) -> None:
        if self.schedule is None and self.weight_decay_end is not None:
            raise ValueError("`weight_decay_end` needs a `schedule` ('cosine' or 'linear').")
        if self.schedule is not None and self.weight_decay_end is None:
            raise ValueError(f"`schedule={self.schedule!r}` needs `weight_decay_end`, the decay reached at the end"
                             " of the run.")
        if self.cautious and self.stochastic_rounding:
            raise ValueError("`cautious=True` and `stochastic_rounding=True` cannot be combined yet; choose one.")
        if self.timescale_steps is not None:
            check_timescale_mode("timescale_steps", self.mode, self.weight_decay)


def check_timescale_mode(name: str, mode: str, weight_decay: float | None) -> None:
    """A timescale sets the weight decay of a mode that shrinks the weights: not with ``coupled``, nor beside an
    explicit ``weight_decay``."""
    if mode == "coupled":
        raise ValueError(f"`{name}` sets how fast the weights decay; mode='coupled' does not shrink them.")
    if weight_decay is not None:
        raise ValueError(f"Pass either `weight_decay` or `{name}` (which sets the weight decay), not both.")
