"""lightning_wd's own decay pass, for the param groups whose optimizer cannot apply the mode itself
(:class:`lightning_wd.plan.Generic`): one batched ``torch._foreach_*`` call per (device, dtype), before the update.

It runs at every step of such a run, so its host work per parameter is kept small: the parameters a group decays
(those not excluded), grouped by device and dtype, are worked out once per group and reused while the group holds the
same parameters and each of them has a gradient; only the gradients are looked up at every step.

Stochastic rounding draws from generators of its own, seeded from the step count the group records
(``"lightning_wd_rounding_step"``), the group's index and the device: the same random stream on every rank, in a run
resumed from a checkpoint as in the uninterrupted one, and none drawn from the user's global generator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_wd._types import Scalar
from lightning_wd.config import DecayConfig
from lightning_wd.decay import (
    add_l2_to_grads_,
    cautious_decay_,
    decay_weights_,
    group_by_device_and_dtype,
    shrink_bucket_,
)
from lightning_wd.modes import per_step_decay
from lightning_wd.optimizers import OptimizerRule

#: param-group key counting the steps decayed with stochastic rounding (its random stream goes on after a resume)
ROUNDING_KEY = "lightning_wd_rounding_step"
#: the seed of the stochastic-rounding streams, the same on every rank
ROUNDING_SEED = 0x5EED_DECA1

__all__ = ["GenericPass", "ROUNDING_KEY"]


class _Decayed:
    """The parameters of one group that the pass decays, remembered while the group holds the same ones, and, where
    they are plain tensors (not DTensor shards), grouped by device and dtype once."""

    def __init__(self, params: list[Tensor], excluded: set[int]) -> None:
        self.source, self.size = params, len(params)
        self.params = [p for p in params if id(p) not in excluded]
        plain = all(type(p) in (Tensor, torch.nn.Parameter) for p in self.params)
        self.buckets = group_by_device_and_dtype(self.params) if plain else None

    def fits(self, params: list[Tensor]) -> bool:
        return params is self.source and len(params) == self.size


class GenericPass:
    """Applies the decay of the groups planned :class:`~lightning_wd.plan.Generic`.

    Args:
        optimizer: the optimizer.
        rule: its registry entry (step size, per-parameter factors, update direction).
        config: the decay's configuration.
        excluded: ids of the parameters never decayed.
        uncorrected: ids of the parameters that get the plain decoupled decay under ``mode="corrected"``.
    """

    def __init__(self, optimizer: Optimizer, rule: OptimizerRule, config: DecayConfig, excluded: set[int],
                 uncorrected: set[int]) -> None:
        self.optimizer, self.rule, self.config = optimizer, rule, config
        self.excluded, self.uncorrected = excluded, uncorrected
        self._decayed: dict[int, _Decayed] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def params(self, group: Mapping[str, Any]) -> tuple[list[Tensor], dict | None]:
        """The parameters of ``group`` decayed in this step (not excluded, and with a gradient), and the same grouped
        by (device, dtype) where that grouping is known already (every one of them has a gradient)."""
        source = group["params"]
        decayed = self._decayed.get(id(source))
        if decayed is None or not decayed.fits(source):
            decayed = self._decayed[id(source)] = _Decayed(source, self.excluded)
        params = [p for p in decayed.params if p.grad is not None]
        return params, decayed.buckets if len(params) == len(decayed.params) else None

    @torch.no_grad()
    def apply(self, groups: Sequence[tuple[int, dict[str, Any], Any, Any]]) -> None:
        """Decay each ``(index, group, wd, x)``: ``wd`` the step's weight decay, ``x`` its per-step shrink."""
        opt = self.optimizer
        # Optimizers that handle AMP scaling themselves (torch's fused=True) are stepped even when the gradients
        # are not finite, with `found_inf` and `grad_scale` set on them; their gradients are still scaled.
        amp_in_step = getattr(opt, "_step_supports_amp_scaling", False)
        found_inf = getattr(opt, "found_inf", None) if amp_in_step else None
        grad_scale = getattr(opt, "grad_scale", None) if amp_in_step else None
        for index, group, wd, x in groups:
            params, buckets = self.params(group)
            if not params:
                continue
            if self.config.cautious:
                self._cautious(group, params, wd, x, found_inf, grad_scale)
            elif self.config.mode == "coupled":
                l2 = -wd if group.get("maximize", False) else wd
                add_l2_to_grads_(params, [p.grad for p in params], l2, grad_scale)
            else:
                self._shrink(index, group, params, buckets, wd, x, found_inf)

    def _shrink(self, index: int, group: dict[str, Any], params: list[Tensor], buckets: dict | None, wd: Any,
                x: Scalar, found_inf: Any) -> None:
        """``p *= 1 - x``; the common case (one shrink for the whole group, its grouping kept) at its least host
        work: one multiply per kept (device, dtype) group."""
        rounding = self.config.stochastic_rounding
        generator = self._generator(index, group) if rounding else None
        if buckets is not None and not self.uncorrected and self.rule.param_step_factor is None:
            for (device, dtype), (tensors,) in buckets.items():
                shrink_bucket_(tensors, device, dtype, 1 - x, found_inf, rounding, generator)
            return
        for subset, shrink in self.shrinks(group, params, wd, x):
            decay_weights_(subset, shrink, 1.0, skip=found_inf, stochastic_rounding=rounding, generator=generator)

    def shrinks(self, group: Mapping[str, Any], params: list[Tensor], wd: Any, x: Scalar
                ) -> list[tuple[list[Tensor], Scalar]]:
        """``(parameters, x)`` pairs of the multiplicative decay ``p *= 1 - x``: under mode="corrected" the
        ``uncorrected`` parameters get the plain decoupled decay; where the optimizer's own decay scales its step
        size per parameter (its entry's ``param_step_factor``), each parameter gets its own factor."""
        pairs: list[tuple[list[Tensor], Scalar]] = [(params, x)]
        if self.uncorrected:
            plain = [p for p in params if id(p) in self.uncorrected]
            step = self.rule.group_step_size(self.optimizer, group)
            pairs = [([p for p in params if id(p) not in self.uncorrected], x),
                     (plain, per_step_decay("decoupled", group["lr"], wd, None, step))]
        factor = self.rule.param_step_factor
        if factor is None or self.config.mode == "independent":  # independent decay does not follow the step size
            return pairs
        out: dict[tuple[int, float], tuple[list[Tensor], Scalar]] = {}
        for k, (subset, shrink) in enumerate(pairs):
            for p in subset:
                f = float(factor(self.optimizer, group, p))
                out.setdefault((k, f), ([], shrink * f if f != 1.0 else shrink))[0].append(p)
        return list(out.values())

    def _cautious(self, group: dict[str, Any], params: list[Tensor], wd: Any, x: Scalar, found_inf: Any,
                  grad_scale: Any) -> None:
        direction = self.rule.update_direction
        assert direction is not None  # the planner refuses cautious decay without one
        if grad_scale is not None:  # the gradient still carries the loss scale, the state does not
            raise ValueError("lightning_wd: cautious decay does not support fused optimizers under fp16 AMP yet.")
        pairs = [(params, None)] if self.config.mode == "coupled" else self.shrinks(group, params, wd, x)
        for subset, shrink in pairs:
            grads = [p.grad for p in subset]
            directions = [direction(self.optimizer, group, p, g) for p, g in zip(subset, grads)]
            if any(d is None for d in directions):
                raise ValueError(
                    f"lightning_wd: cautious decay cannot know the sign of {type(self.optimizer).__name__}'s update"
                    " with these settings (e.g. RMSprop with momentum). Use cautious=False."
                )
            if self.config.mode == "coupled":
                l2 = -wd if group.get("maximize", False) else wd
                cautious_decay_(subset, directions, grads=grads, weight_decay=l2)
            else:
                cautious_decay_(subset, directions, per_step_decay=shrink, skip=found_inf)

    def _generator(self, index: int, group: Mapping[str, Any]) -> Callable[[torch.device], torch.Generator]:
        """The stochastic-rounding generator of each device for this step of group ``index``: seeded from the
        step the group has counted, so that its stream depends on nothing but the run's own progress."""
        step = group.get(ROUNDING_KEY, 0)

        def on(device: torch.device) -> torch.Generator:
            g = self._generators.get(device)
            if g is None:
                g = self._generators[device] = torch.Generator(device=device)
            # a 63-bit mix of (step, group, device index): distinct streams, reproducible from the checkpoint
            g.manual_seed((ROUNDING_SEED * 1_000_003 + step * 65_537 + index * 257 + (device.index or 0))
                          % (1 << 63))
            return g

        return on

