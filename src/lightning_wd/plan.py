"""How each param group gets its decay in a step: one of three named outcomes.

- :class:`Native`: the optimizer applies the mode itself, in its own kernel, under the group settings given (for the
  duration of the step; empty where the group as configured already does);
- :class:`Generic`: the group's ``weight_decay`` is set to 0 for the step and lightning_wd applies the decay in its
  own batched pass (:mod:`lightning_wd.generic_pass`) before the update;
- :class:`Refused`: neither can give the group the mode; the reason says why and what to use instead.

The facts about the optimizer come from its registry entry (:mod:`lightning_wd.optimizers`); the planner only
combines them with the configuration and the group.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.config import DecayConfig
from lightning_wd.low_precision import LOW_PRECISION
from lightning_wd.modes import WITH_LR_MAX
from lightning_wd.optimizers import OptimizerRule

#: param-group key that holds the reference lr of ``mode="independent"`` and ``"corrected"``
LR_MAX_KEY = "lightning_wd_lr_max"

__all__ = ["GENERIC", "Generic", "LR_MAX_KEY", "Native", "Plan", "Planner", "Refused"]


@dataclass(frozen=True)
class Native:
    """The optimizer's own kernel applies the mode, under these group settings for the step."""

    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Generic:
    """lightning_wd's separate pass applies the decay; the group's ``weight_decay`` is 0 for the step."""


@dataclass(frozen=True)
class Refused:
    """No way to give the group the mode: ``reason`` says why, and what to use instead."""

    reason: str


GENERIC = Generic()
Plan = Union[Native, Generic, Refused]


def _same(a: Any, b: Any) -> bool:
    """Equal values; a tensor is compared by identity (reading it would sync a device)."""
    return a is b or (not isinstance(a, Tensor) and not isinstance(b, Tensor) and a == b)


class Planner:
    """Plans the groups of one optimizer under one configuration.

    Args:
        optimizer: the optimizer.
        rule: its registry entry.
        config: the decay's configuration.
        per_parameter: whether some of the optimizer's parameters need the per-parameter pass (excluded, or
            uncorrected under ``mode="corrected"``); a function of the group.
    """

    def __init__(self, optimizer: Optimizer, rule: OptimizerRule, config: DecayConfig, per_parameter: Any) -> None:
        self.optimizer, self.rule, self.config = optimizer, rule, config
        self._per_parameter = per_parameter
        self._name = type(optimizer).__name__

    def plan(self, group: Mapping[str, Any], wd: Any, dtypes: Collection[torch.dtype]) -> Plan:
        """The plan of ``group`` for a step whose decay is ``wd``; ``dtypes``: those of its parameters."""
        refusal = self._refusal(group, dtypes)
        if refusal is not None:
            return Refused(refusal)
        settings = self._native_settings(group, wd, any(d in LOW_PRECISION for d in dtypes))
        if settings is not None:
            return Native(settings)
        refusal = self._generic_refusal(group)
        return GENERIC if refusal is None else Refused(refusal)

    def _refusal(self, group: Mapping[str, Any], dtypes: Collection[torch.dtype]) -> str | None:
        rule, mode = self.rule, self.config.mode
        if rule.refuse is not None:
            reason = rule.refuse(self.optimizer, group, mode)
            if reason is not None:
                return reason
        if self.config.cautious and rule.update_direction is None:
            return (f"cautious decay needs the sign of each step's update before the step, and lightning_wd does not"
                    f" know how to compute it for {self._name}. Use cautious=False.")
        if self.config.cautious and any(d.is_complex for d in dtypes):
            return ("cautious decay compares the signs of the update and the weight, which complex parameters do not"
                    " have. Use cautious=False, or put the complex parameters in a group with weight_decay=0.")
        if mode in WITH_LR_MAX and (group.get("lr") is None or group.get(LR_MAX_KEY) is None):
            return (f"mode={mode!r} scales the decay by lr / lr_max, and this group's lr is None ({self._name} then"
                    " takes a relative step size of its own). Give the optimizer an lr, or use mode='decoupled'.")
        return None

    def _native_settings(self, group: Mapping[str, Any], wd: Any, low_precision: bool) -> dict[str, Any] | None:
        """The group settings under which the optimizer's own decay is this step's decay ``wd`` in the mode, or
        ``None`` where the generic pass is needed."""
        config, rule, mode = self.config, self.rule, self.config.mode
        if not config.native or config.cautious or self._per_parameter(group):
            return None
        if config.stochastic_rounding and low_precision:
            return None  # the optimizer rounds to nearest: the decay below the format's resolution would be lost
        own = rule.own_rule(self.optimizer, group)
        changed = {} if _same(wd, group.get("weight_decay")) else {"weight_decay": wd}  # a scheduled value
        same_reference = mode not in WITH_LR_MAX or rule.own_lr_max(self.optimizer, group) == group.get(LR_MAX_KEY)
        if own == mode and same_reference:
            return changed
        switched = rule.switches.get(mode)
        if switched is not None and all(k in group for k in switched) and same_reference:
            return {**switched, **changed}
        if mode in WITH_LR_MAX and self._steps_by_lr(group):
            return self._rescaled(group, wd, own)
        return None

    def _steps_by_lr(self, group: Mapping[str, Any]) -> bool:
        """Whether the optimizer's own decay is scaled by the group's lr itself in this step (and alike for every
        parameter): only then does a rescaled ``weight_decay`` give another mode's decay exactly."""
        if self.rule.param_step_factor is not None:
            return False
        step, lr = self.rule.group_step_size(self.optimizer, group), group.get("lr")
        return step is lr or (isinstance(step, (int, float)) and isinstance(lr, (int, float)) and step == lr)

    def _rescaled(self, group: Mapping[str, Any], wd: Any, own: str | None) -> dict[str, Any] | None:
        """Its own decoupled decay ``lr * c`` (in its own form and place), handed ``c = x / lr`` (independent:
        ``wd / lr_max``; corrected: ``wd * lr / lr_max``), is this mode's decay ``x``. For ``corrected`` a tensor lr
        would make ``c`` a tensor: generic pass."""
        base = {} if own == "decoupled" else self.rule.switches.get("decoupled")
        lr, lr_max = group["lr"], group.get(LR_MAX_KEY)
        if base is None or not all(k in group for k in base) or lr_max is None:
            return None
        if self.config.mode == "independent":
            return {**base, "weight_decay": wd / lr_max}
        if isinstance(lr, (int, float)):
            return {**base, "weight_decay": wd * lr / lr_max}
        return None

    def _generic_refusal(self, group: Mapping[str, Any]) -> str | None:
        rule, mode, name = self.rule, self.config.mode, self._name
        why = self.why_generic(group)
        if rule.own_rule(self.optimizer, group) == mode and not rule.generic_is_exact(group):
            return (f"{name}'s own {mode} decay ({rule.description}) happens where lightning_wd's separate pass,"
                    f" needed for {why}, cannot reproduce it. Give the parameters to exclude a param group with"
                    " weight_decay=0 instead of `exclude`, or leave the decay to the optimizer (native=True).")
        if rule.generic_refusal is not None:
            reason = rule.generic_refusal(self.optimizer, group, mode)
            if reason is not None:
                return f"mode={mode!r} needs lightning_wd's separate pass for {why}, but {reason}"
        if mode in ("decoupled", "corrected") and rule.group_step_size(self.optimizer, group) is None:
            return (f"{name}'s step size is relative (set per parameter inside its step), so a decay that follows it"
                    " cannot be applied outside the step. Give it an lr (e.g. relative_step=False), or use"
                    " mode='decoupled' without exclusions so that it applies its own decay.")
        return None

    def why_generic(self, group: Mapping[str, Any]) -> str:
        """Why a group takes the generic pass, in words, for messages."""
        config = self.config
        if config.cautious:
            return "cautious decay"
        if not config.native:
            return "native=False"
        if self._per_parameter(group):
            return "excluded or uncorrected parameters"
        if config.stochastic_rounding:
            return "stochastic rounding"
        return f"mode={config.mode!r}, which {self._name} does not implement itself"
