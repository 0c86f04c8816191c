"""The checks on the decay a step is about to apply: refused where it would zero, flip or poison the weights, warned
where bf16/fp16 rounding loses it or the lr passes the reference lr of the lr-scaled modes.

They run when a group is adopted (so that a refusal comes at fit start, before any step: for a ``schedule`` also
with the largest decay it will reach, at the peak lr) and at every step whose decay differs from the last one
checked; a decay held in a tensor is not read (that would sync a device).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.config import DecayConfig
from lightning_wd.low_precision import decay_is_lost, lost_decay_message
from lightning_wd.modes import WITH_LR_MAX
from lightning_wd.plan import LR_MAX_KEY

__all__ = ["DecayChecks"]


class DecayChecks:
    """The checks of one optimizer's decay (see the module docstring)."""

    def __init__(self, optimizer: Optimizer, config: DecayConfig) -> None:
        self.optimizer, self.config = optimizer, config
        self._last: dict[int, Any] = {}  # the last decay checked, per group (by its params list)
        self._warned: set[tuple[Any, ...]] = set()

    def _where(self, index: int) -> str:
        return f"lightning_wd: param group {index} of {type(self.optimizer).__name__}"

    def check_weight_decay(self, index: int, wd: Any) -> None:
        """A group's ``weight_decay`` (written by the user, a schedule or a callback) must be a number >= 0."""
        if isinstance(wd, Tensor):
            return
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
            raise ValueError(f"{self._where(index)} has weight_decay={wd!r}; it must be a finite number >= 0.")

    def check(self, index: int, group: dict[str, Any], wd: Any, x: Any, dtypes: Collection[torch.dtype],
              what: str = "would be decayed") -> None:
        """Check the per-step shrink ``x`` (``p *= 1 - x``) of decay ``wd``, where it changed since the last check."""
        self.check_weight_decay(index, wd)
        if x is None or isinstance(x, Tensor) or self._last.get(id(group["params"])) == x:
            return
        self._last[id(group["params"])] = x
        if not math.isfinite(x) or x >= 1:
            raise ValueError(
                f"{self._where(index)} {what} by {x:.4g} per step (p *= 1 - {x:.4g}), which"
                f" {'poisons' if not math.isfinite(x) else 'zeroes or flips the sign of'} every weight"
                f" (mode={self.config.mode!r}, weight_decay={wd:g}). A per-step decay must be below 1; typical"
                " values are 1e-5 to 1e-2."
            )
        self._warn_lr_above_lr_max(index, group)
        if not self.config.stochastic_rounding:  # stochastic rounding keeps the decay
            self._warn_lost(index, x, dtypes)

    def forget(self) -> None:
        """Check every decay again (after a checkpoint was restored)."""
        self._last.clear()

    def _warn_lr_above_lr_max(self, index: int, group: dict[str, Any]) -> None:
        lr, lr_max = group.get("lr"), group.get(LR_MAX_KEY)
        if self.config.mode not in WITH_LR_MAX or ("lr", index) in self._warned or isinstance(lr, Tensor):
            return
        if lr is not None and lr_max is not None and lr > lr_max:
            self._warned.add(("lr", index))
            rank_zero_warn(
                f"{self._where(index)} has lr {lr:.4g}, above its lr_max {lr_max:.4g}, so mode={self.config.mode!r}"
                " decays it by more than at the peak it assumes. Pass `lr_max` = the schedule's peak lr."
            )

    def _warn_lost(self, index: int, x: float, dtypes: Collection[torch.dtype]) -> None:
        for dtype in dtypes:
            if decay_is_lost(x, dtype) and (index, dtype) not in self._warned:
                self._warned.add((index, dtype))
                rank_zero_warn(
                    f"{self._where(index)}: {lost_decay_message(x, dtype)} Pass `stochastic_rounding=True` to keep"
                    " the decay, or keep fp32 master weights (e.g. bf16-mixed)."
                )
