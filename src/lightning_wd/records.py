"""The param groups a decay has taken over, and what each records for a resume.

A group is *adopted* the first time it is seen (at attach, at the first step after ``add_param_group`` or after a
group was replaced, and again after ``load_state_dict`` restored a checkpoint): the ``weight_decay`` argument (or the
``timescale``) is written into it, it records the mode it is trained in (``"lightning_wd_mode"``), the reference lr of
the lr-scaled modes (``"lightning_wd_lr_max"``) and a schedule's length (``"lightning_wd_total_steps"``), and where a
restored group was trained otherwise, a warning says how the decay changes. Adoption is all or nothing: a refusal
leaves every group as it was.

A group configured with no decay keeps none: where the user gave some groups ``weight_decay=0`` beside groups with
decay (Hugging Face's no-decay group), or where the optimizer's default decay is not 0, the ``weight_decay`` argument
and the ``timescale`` leave those groups at 0. Only where every group is at 0 and so is the default (an optimizer
built without decay, which the callback is to give one) does the argument go into every group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.config import DecayConfig
from lightning_wd.lr_reference import group_peak_lr, host_float
from lightning_wd.modes import WITH_LR_MAX, describe_mode_change, per_step_decay
from lightning_wd.optimizers import OptimizerRule
from lightning_wd.plan import LR_MAX_KEY
from lightning_wd.schedules import scheduled_weight_decay

#: param-group key that records the mode a group is trained in
MODE_KEY = "lightning_wd_mode"
#: param-group key that counts the steps taken under a weight-decay ``schedule`` (saved, so a resume goes on)
STEP_KEY = "lightning_wd_step"
#: param-group key that records the length of a weight-decay ``schedule``
TOTAL_KEY = "lightning_wd_total_steps"

__all__ = ["GroupRecords", "LR_MAX_KEY", "MODE_KEY", "STEP_KEY", "TOTAL_KEY", "splits_decay"]


def splits_decay(optimizer: Optimizer) -> bool:
    """Whether the optimizer, as configured, gives some groups no decay on purpose: its default decay is not 0 (a
    group at 0 was set so), or some groups have decay and others none (Hugging Face's no-decay group). Its groups at
    0 then keep no decay (see the module docstring)."""
    decays = [g.get("weight_decay", 0.0) for g in optimizer.param_groups]
    default = optimizer.defaults.get("weight_decay", 0.0)
    return not _is_zero(default) or (any(map(_is_zero, decays)) and not all(map(_is_zero, decays)))


def _is_zero(wd: Any) -> bool:
    return not isinstance(wd, Tensor) and wd == 0


class GroupRecords:
    """Adopts the groups of one optimizer.

    Args:
        optimizer, rule, config: the optimizer, its registry entry, the decay's configuration.
        check: called with ``(index, group)`` once the group is adopted; raises ``ValueError`` to refuse it.
    """

    def __init__(self, optimizer: Optimizer, rule: OptimizerRule, config: DecayConfig,
                 check: Callable[[int, dict[str, Any]], None]) -> None:
        self.optimizer, self.rule, self.config, self._check = optimizer, rule, config, check
        # groups adopted, by their params list (which load_state_dict carries over into the new group dicts); the
        # list itself is kept so that its id cannot be reused by another
        self._seen: dict[int, list[Any]] = {}
        self._warned: set[Any] = set()
        # read from the groups as the user configured them, before anything is written into them
        self._keep_zero = splits_decay(optimizer)

    def pending(self) -> bool:
        """Whether some group has not been adopted (added, or put in place of another, since the last step)."""
        return any(id(g["params"]) not in self._seen for g in self.optimizer.param_groups)

    def adopt(self, restored: bool) -> None:
        """Adopt the groups not seen yet (all of them when ``restored`` from a checkpoint); on any exception the
        groups get back the values they had."""
        groups = self.optimizer.param_groups
        snapshots = [(g, {k: v for k, v in g.items() if k != "params"}) for g in groups]
        fresh = [(i, g) for i, g in enumerate(groups) if restored or id(g["params"]) not in self._seen]
        try:
            for index, group in fresh:
                self._adopt_group(index, group, restored)
        except BaseException:  # a refusal leaves the groups as they were
            for group, values in snapshots:
                for key in [k for k in group if k != "params" and k not in values]:
                    del group[key]
                group.update(values)
            raise
        live = {id(g["params"]) for g in groups}
        self._seen = {k: v for k, v in self._seen.items() if k in live}
        self._seen.update((id(g["params"]), g["params"]) for _, g in fresh)

    def _adopt_group(self, index: int, group: dict[str, Any], restored: bool) -> None:
        config = self.config
        zero = self._keep_zero and _is_zero(group.get("weight_decay", 0.0))  # configured with no decay: keeps none
        if restored:
            self._warn_if_trained_otherwise(index, group)
        if config.weight_decay is not None and not zero:  # an explicit argument wins over a resumed value
            group["weight_decay"] = config.weight_decay
        self._record(index, group)
        if config.timescale_steps is not None and not zero:  # lambda = 1 / (lr_max * tau) at the peak lr
            peak = 1.0 if config.mode == "independent" else group.get(LR_MAX_KEY, group_peak_lr(group))
            if not peak:
                raise ValueError(f"lightning_wd: param group {index}: `timescale` needs an lr > 0, and it is {peak}.")
            group["weight_decay"] = 1.0 / (peak * config.timescale_steps)
        self._check(index, group)

    def warn_if_switch_overruled(self, index: int, group: dict[str, Any]) -> None:
        """Where the user chose a decay rule on the optimizer and the mode replaces it, say so once."""
        rule, opt, mode = self.rule, self.optimizer, self.config.mode
        chosen = rule.chosen_switch(opt, group) if rule.chosen_switch is not None else None
        own = rule.own_rule(opt, group)
        if chosen is None or own == mode or ("switch", index) in self._warned or _is_zero(group.get("weight_decay")):
            return
        self._warned.add(("switch", index))
        lr = group["lr"] if isinstance(group.get("lr"), (int, float)) else 1.0
        change = describe_mode_change(own, mode, lr, rule.own_lr_max(opt, group), group.get(LR_MAX_KEY)) if own \
            else "its own rule is none of lightning_wd's modes"
        keep = f"mode={own!r}" if own else "no WeightDecay"
        rank_zero_warn(
            f"lightning_wd: {type(opt).__name__} was configured with {chosen} (its own decay: {own or 'its own rule'}"
            f"), and mode={mode!r} replaces it in param group {index}: {change}. Use {keep} to keep the decay you"
            " configured."
        )

    # --- what a group records --------------------------------------------------------------------------------
    def _record(self, index: int, group: dict[str, Any]) -> None:
        mode, old_mode, old_lr_max = self.config.mode, group.get(MODE_KEY), group.get(LR_MAX_KEY)
        if mode in WITH_LR_MAX:
            group[LR_MAX_KEY] = self._lr_max(index, group, old_mode, old_lr_max)
        else:
            group.pop(LR_MAX_KEY, None)
        group[MODE_KEY] = mode
        if self.config.schedule is not None:
            self._record_schedule(index, group)
        if old_mode is None or (old_mode, old_lr_max) == (mode, group.get(LR_MAX_KEY)):
            return
        lr = host_float(group["lr"]) if group.get("lr") is not None else 1.0
        change = describe_mode_change(old_mode, mode, lr, old_lr_max, group.get(LR_MAX_KEY))
        was = f"{old_mode!r}" + (f" (lr_max={old_lr_max:g})" if old_mode in WITH_LR_MAX else "")
        now = f"{mode!r}" + (f" (lr_max={group[LR_MAX_KEY]:g})" if mode in WITH_LR_MAX else "")
        rank_zero_warn(
            f"lightning_wd: param group {index} of {type(self.optimizer).__name__} was trained with mode={was} and"
            f" goes on with mode={now}: {change}."
        )

    def _lr_max(self, index: int, group: dict[str, Any], old_mode: str | None, old_lr_max: Any) -> float:
        """The explicit ``lr_max``, else the one the group recorded, else its reference lr (lr_reference)."""
        explicit = self.config.lr_max
        if isinstance(explicit, tuple):
            explicit = explicit[index] if index < len(explicit) else None
        if explicit is not None:
            return explicit
        if old_mode in WITH_LR_MAX and old_lr_max is not None:
            return old_lr_max
        lr_max = group_peak_lr(group, self.rule.own_lr_max(self.optimizer, group))
        if lr_max is not None and lr_max <= 0:
            raise ValueError(
                f"lightning_wd: param group {index} of {type(self.optimizer).__name__}: mode={self.config.mode!r}"
                f" measures the lr against a reference lr_max > 0, and this group's lr is {lr_max:g} with no peak"
                " recorded by a scheduler (a warm-up written by hand?). Pass `lr_max`, the schedule's peak lr."
            )
        return lr_max  # type: ignore[return-value]  # None: an lr of None, which the planner refuses

    def _record_schedule(self, index: int, group: dict[str, Any]) -> None:
        total, old_total, t = self.config.total_steps, group.get(TOTAL_KEY), group.get(STEP_KEY, 0)
        group[TOTAL_KEY] = total
        if old_total is None or old_total == total or t == 0 or ("total", index) in self._warned:
            return
        self._warned.add(("total", index))
        wd0, end, schedule = group.get("weight_decay", 0.0), self.config.weight_decay_end, self.config.schedule
        before = scheduled_weight_decay(schedule, wd0, end, t, old_total)
        now = scheduled_weight_decay(schedule, wd0, end, t, total)
        rank_zero_warn(
            f"lightning_wd: param group {index} of {type(self.optimizer).__name__} was scheduled over {old_total}"
            f" steps and goes on over {total}: at step {t} its weight decay changes from {before:.4g} to {now:.4g}."
        )

    def _warn_if_trained_otherwise(self, index: int, group: dict[str, Any]) -> None:
        """A restored group of a run that trained otherwise: say how its decay changes."""
        if not self.optimizer.state:
            return  # nothing trained yet
        if group.get(MODE_KEY) is None:
            self._warn_without_us(index, group)
        elif self.config.schedule is not None and STEP_KEY not in group:
            self._warn_schedule_added(index)

    def _warn_without_us(self, index: int, group: dict[str, Any]) -> None:
        own, wd = self.rule.own_rule(self.optimizer, group), group.get("weight_decay", 0.0)
        if ("resumed", index) in self._warned or _is_zero(wd) or (own == self.config.mode and not self.config.schedule):
            return
        self._warned.add(("resumed", index))
        own_words = f"its own {own} decay" if own else "its own decay rule"
        rank_zero_warn(
            f"lightning_wd: param group {index} of {type(self.optimizer).__name__} was trained without lightning_wd"
            f" ({own_words}, weight_decay={wd}) and goes on with mode={self.config.mode!r}"
            + (f" and a {self.config.schedule} schedule from its start" if self.config.schedule else "")
            + ": the decay the run follows changes here."
        )

    def _warn_schedule_added(self, index: int) -> None:
        if ("schedule", index) in self._warned:
            return
        self._warned.add(("schedule", index))
        rank_zero_warn(
            f"lightning_wd: param group {index} of {type(self.optimizer).__name__} trained without a weight-decay"
            f" schedule and goes on with `schedule={self.config.schedule!r}`, which starts from its first step (its"
            f" decay at step 0) now: the decay the run follows changes here."
        )


def current_weight_decay(config: DecayConfig, group: dict[str, Any]) -> Any:
    """The ``weight_decay`` the coming step applies to ``group``: the group's own, or its ``schedule`` value."""
    wd = group.get("weight_decay", 0.0)
    if config.schedule is None or isinstance(wd, Tensor):
        return wd
    return scheduled_weight_decay(config.schedule, wd, config.weight_decay_end, group.get(STEP_KEY, 0),
                                  config.total_steps)


def group_per_step_decay(rule: OptimizerRule, optimizer: Optimizer, config: DecayConfig, group: dict[str, Any],
                         wd: Any) -> Any:
    """The ``x`` of ``p *= 1 - x`` the coming step applies to ``group``'s parameters (``None`` in coupled mode, which
    adds ``wd * p`` to the gradient instead, and where the step size is known only inside the step)."""
    if config.mode == "coupled" or group.get("lr") is None:
        return None
    step_size = rule.group_step_size(optimizer, group)
    if step_size is None and config.mode != "independent":
        return None
    return per_step_decay(config.mode, group["lr"], wd, group.get(LR_MAX_KEY), step_size)
