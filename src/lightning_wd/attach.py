"""Attach weight decay to any ``torch.optim.Optimizer`` through its step hooks.

This is the engine behind :class:`lightning_wd.WeightDecay`, usable on its own in a hand-written loop or with
Lightning Fabric::

    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.01)
    handle = attach_weight_decay(opt, mode="decoupled")   # now trains exactly as AdamW
    for x, y in data:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    handle.detach()

The state model. Between steps every param group holds what the user configured: its ``weight_decay`` (which an LR
or weight-decay schedule may rewrite at any time) and its switches such as ``decoupled_weight_decay``. The decay is
taken over only for the duration of each ``step()``, after the gradients are final:

- when ``step()`` gets a closure (Lightning's automatic optimization runs forward, backward, the
  ``on_before_optimizer_step`` hooks and gradient clipping inside it), the closure is wrapped and the decay is taken
  over right after it, still before the update;
- without a closure (a plain loop, Lightning's 16-mixed path, which runs the closure itself and calls ``step()``
  only when the gradients are finite), the step pre-hook takes it over at once.

Taking over reads each group's *current* ``weight_decay`` and, per the optimizer's entry in
:mod:`lightning_wd.optimizers`, either hands it to the optimizer with the switches that make its own decay the
chosen mode (native handoff: its own kernel, no extra pass), or sets the group's ``weight_decay`` to 0 and applies
the decay in one batched ``_foreach_*`` pass (the generic pass). The step post-hook puts the user's values back; a
step that raises puts them back at once, and ``detach()`` always does.

Each group also records the mode it is trained in (``"lightning_wd_mode"``) and, for ``mode="independent"``, its
reference lr (``"lightning_wd_lr_max"``), so that a checkpoint resumed in another mode warns.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.fabric.wrappers import _FabricOptimizer
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.decay import add_l2_to_grads_, cautious_decay_, decay_weights_
from lightning_wd.low_precision import LOW_PRECISION, decay_is_lost, lost_decay_message
from lightning_wd.modes import (
    WITH_LR_MAX,
    Mode,
    check_lr_max,
    check_mode,
    check_timescale,
    check_weight_decay,
    describe_mode_change,
    per_step_decay,
)
from lightning_wd.optimizers import OptimizerRule, group_lr, rule_for
from lightning_wd.schedules import check_schedule, scheduled_weight_decay

#: param-group key that records the mode a group is trained in
MODE_KEY = "lightning_wd_mode"
#: param-group key that holds the reference lr of ``mode="independent"`` and ``"corrected"``
LR_MAX_KEY = "lightning_wd_lr_max"
#: param-group key that counts the steps taken under a weight-decay ``schedule`` (saved, so a resume goes on)
STEP_KEY = "lightning_wd_step"
#: the key in which lightning-wd 0.1.0 kept the decay (with ``weight_decay`` at 0); read once and converted
_LEGACY_KEY = "lightning_wd"

LrMax = Union[float, Sequence[float], None]

__all__ = [
    "AttachedWeightDecay",
    "LR_MAX_KEY",
    "MODE_KEY",
    "STEP_KEY",
    "attach_weight_decay",
    "unwrap_optimizer",
]

# one attachment per optimizer: a second would decay twice, or silently overrule the first
_ATTACHED: weakref.WeakKeyDictionary[Optimizer, AttachedWeightDecay] = weakref.WeakKeyDictionary()


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The ``torch.optim.Optimizer`` inside Lightning's ``LightningOptimizer`` or Fabric's ``_FabricOptimizer``.

    Fabric's wrapper poses as a subclass of the optimizer's class (for ``isinstance``), so it is unwrapped by type.
    """
    inner = optimizer
    while isinstance(inner, (LightningOptimizer, _FabricOptimizer)):
        inner = inner.optimizer
    if not isinstance(inner, Optimizer):
        raise TypeError(
            "`optimizer` must be a torch.optim.Optimizer (or a Lightning/Fabric wrapper of one),"
            f" got {type(optimizer).__name__}."
        )
    return inner


def _closure_of(args: tuple, kwargs: dict) -> tuple[Callable[[], Any] | None, bool]:
    """The closure passed to ``step()``, and whether it was passed by position."""
    if len(args) > 1 and callable(args[1]):
        return args[1], True
    closure = kwargs.get("closure")
    return (closure if callable(closure) else None), False


def _host_float(x: Any) -> float:
    """A number's value, read once at attach time (a tensor lr on a GPU costs one sync there, never in a step)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class AttachedWeightDecay:
    """Weight decay attached to one optimizer; made by :func:`attach_weight_decay`. ``detach()`` undoes it."""

    def __init__(
        self,
        optimizer: Optimizer,
        mode: Mode = "decoupled",
        weight_decay: float | None = None,
        exclude: Iterable[Tensor] = (),
        lr_max: LrMax = None,
        native: bool = True,
        stochastic_rounding: bool = False,
        schedule: str | None = None,
        weight_decay_end: float | None = None,
        total_steps: int | None = None,
        uncorrected: Iterable[Tensor] = (),
        cautious: bool = False,
        timescale_steps: float | None = None,
    ) -> None:
        optimizer = unwrap_optimizer(optimizer)
        self.optimizer = optimizer
        self.mode = check_mode(mode)
        self.weight_decay = check_weight_decay(weight_decay)
        self._lr_max = _check_lr_max_arg(lr_max)
        self.native = bool(native)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.schedule = check_schedule(schedule, weight_decay_end)
        self.weight_decay_end = check_weight_decay(weight_decay_end)
        if self.schedule is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                          or total_steps < 1):
            raise ValueError(f"`schedule={schedule!r}` needs `total_steps`, a positive int, got {total_steps!r}.")
        self.total_steps = total_steps
        self.cautious = bool(cautious)
        if self.cautious and self.stochastic_rounding:
            raise ValueError("`cautious=True` and `stochastic_rounding=True` cannot be combined yet; choose one.")
        self.timescale_steps = check_timescale(timescale_steps, self.mode, self.weight_decay)
        self._excluded = {id(p) for p in exclude}
        self._uncorrected = {id(p) for p in uncorrected}
        if self._uncorrected and self.mode != "corrected":
            raise ValueError("`uncorrected` parameters only make sense with mode='corrected'.")
        self.rule, registered_as = rule_for(optimizer)
        other = _ATTACHED.get(optimizer)
        if other is not None:
            raise ValueError(
                f"{type(optimizer).__name__} already has weight decay attached ({other!r}); a second attachment would"
                " decay twice or overrule the first. Detach it first."
            )
        _warn_if_assumed(optimizer, registered_as)
        # groups seen so far, by their params list (which load_state_dict carries over into the new group dicts);
        # the list itself is kept so that its id cannot be reused by another
        self._seen: dict[int, list[Tensor]] = {}
        self._group_info: dict[int, tuple[list[Tensor], int, frozenset[torch.dtype], bool]] = {}
        self._stash: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (group, the user's values) during a step
        self._step_frame: Any = None  # the frame of the step() being taken over (see _pre_step)
        self._last_decay: dict[int, float] = {}
        self._warned: set[tuple[Any, ...]] = set()
        self._adopt(restored=False)
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
            optimizer.register_load_state_dict_post_hook(self._after_load),
        ]
        _ATTACHED[optimizer] = self

    def __repr__(self) -> str:
        args = [f"mode={self.mode!r}"]
        if self.weight_decay is not None:
            args.append(f"weight_decay={self.weight_decay}")
        if self.schedule is not None:
            args.append(f"schedule={self.schedule!r}, weight_decay_end={self.weight_decay_end}")
        if self.cautious:
            args.append("cautious=True")
        if not self.native:
            args.append("native=False")
        return f"AttachedWeightDecay({', '.join(args)})"

    # --- groups: adopting them, and what they record ------------------------------------------------------------
    def _adopt(self, restored: bool) -> None:
        """Write the ``weight_decay`` argument into the groups not seen yet (all of them when ``restored`` from a
        checkpoint by ``load_state_dict``), check their mode record, record ours, and refuse a group whose decay
        cannot be had."""
        snapshots = [(g, {k: v for k, v in g.items() if k != "params"}) for g in self.optimizer.param_groups]
        try:
            self._adopt_groups(restored)
        except BaseException:  # a refusal leaves the groups as they were
            for group, values in snapshots:
                for key in [k for k in group if k != "params" and k not in values]:
                    del group[key]
                group.update(values)
            raise

    def _adopt_groups(self, restored: bool) -> None:
        for index, group in enumerate(self.optimizer.param_groups):
            if not restored and id(group["params"]) in self._seen:
                continue
            if _LEGACY_KEY in group:  # a 0.1.0 checkpoint: the decay was kept aside, weight_decay held 0
                legacy = group.pop(_LEGACY_KEY)
                if "weight_decay" in group:
                    group["weight_decay"] = legacy
            if self.weight_decay is not None:  # an explicit argument wins over a resumed value
                group["weight_decay"] = self.weight_decay
            self._record(index, group)
            if self.timescale_steps is not None:  # as the argument: lambda = 1 / (lr_max * tau) at the peak lr
                peak = 1.0 if self.mode == "independent" else group.get(LR_MAX_KEY, _peak_lr(group))
                if peak is None:
                    raise ValueError(f"lightning_wd: param group {index}: `timescale` needs an lr, and it is None.")
                group["weight_decay"] = 1.0 / (peak * self.timescale_steps)
            refusal = self._plan(group)[1]
            if refusal is not None:
                raise ValueError(f"lightning_wd: param group {index} of {type(self.optimizer).__name__}: {refusal}")
            self._seen[id(group["params"])] = group["params"]

    def _record(self, index: int, group: dict[str, Any]) -> None:
        old_mode, old_lr_max = group.get(MODE_KEY), group.get(LR_MAX_KEY)
        if self.mode in WITH_LR_MAX:
            explicit = self._lr_max(index)
            lr_max = explicit if explicit is not None else old_lr_max if old_mode in WITH_LR_MAX else None
            if lr_max is None:  # the optimizer's own reference (optimi's max_lr), else the schedule's peak
                lr_max = self._own_lr_max(group)
            group[LR_MAX_KEY] = lr_max if lr_max is not None else _peak_lr(group)
        else:
            group.pop(LR_MAX_KEY, None)
        group[MODE_KEY] = self.mode
        if old_mode is None or (old_mode, old_lr_max) == (self.mode, group.get(LR_MAX_KEY)):
            return
        lr = _host_float(group["lr"]) if group.get("lr") is not None else 1.0
        change = describe_mode_change(old_mode, self.mode, lr, old_lr_max, group.get(LR_MAX_KEY))
        was = f"{old_mode!r}" + (f" (lr_max={old_lr_max:g})" if old_mode in WITH_LR_MAX else "")
        now = f"{self.mode!r}" + (f" (lr_max={group[LR_MAX_KEY]:g})" if self.mode in WITH_LR_MAX else "")
        rank_zero_warn(
            f"lightning_wd: param group {index} of {type(self.optimizer).__name__} was trained with mode={was} and"
            f" goes on with mode={now}: {change}."
        )

    def _after_load(self, optimizer: Optimizer) -> None:
        self._adopt(restored=True)
        self._last_decay.clear()

    # --- what each group gets: native handoff, the generic pass, or a refusal -----------------------------------
    def _info(self, group: dict[str, Any]) -> tuple[frozenset[torch.dtype], bool]:
        """The dtypes of the group's parameters, and whether some of them need the per-parameter pass (excluded, or
        uncorrected under mode="corrected")."""
        params = group["params"]
        info = self._group_info.get(id(params))
        if info is None or info[1] != len(params):
            dtypes = frozenset(p.dtype for p in params)
            special = self._excluded | self._uncorrected
            info = (params, len(params), dtypes, any(id(p) in special for p in params))
            self._group_info[id(params)] = info
        return info[2], info[3]

    def is_excluded(self, param: Tensor) -> bool:
        """Whether ``param`` gets no decay (``exclude``)."""
        return id(param) in self._excluded

    def is_uncorrected(self, param: Tensor) -> bool:
        """Whether ``param`` gets the plain decoupled decay under ``mode="corrected"`` (``uncorrected``)."""
        return id(param) in self._uncorrected

    def step_size(self, group: dict[str, Any]) -> Any:
        """What the optimizer's own decoupled decay multiplies ``wd`` by for ``group`` (its lr; ``d * lr`` for
        Prodigy), or ``None`` where it is known only inside its step (a relative step size)."""
        return self._step_size(group)

    def current_weight_decay(self, group: dict[str, Any]) -> Any:
        """The ``weight_decay`` the coming step applies to ``group``: the group's own, or its ``schedule`` value."""
        wd = group.get("weight_decay", 0.0)
        if self.schedule is None or isinstance(wd, Tensor):
            return wd
        return scheduled_weight_decay(self.schedule, wd, self.weight_decay_end, group.get(STEP_KEY, 0),
                                      self.total_steps)

    def per_step_decay(self, group: dict[str, Any], wd: Any = None) -> Any:
        """The ``x`` of ``p *= 1 - x`` the coming step applies to ``group``'s parameters (``None`` in coupled
        mode, which adds ``wd * p`` to the gradient instead); a host float, or a device tensor for a tensor lr."""
        wd = self.current_weight_decay(group) if wd is None else wd
        if self.mode == "coupled" or group.get("lr") is None:
            return None  # coupled multiplies nothing; a relative step size (lr None) is not known outside the step
        step_size = self._step_size(group)
        if step_size is None and self.mode != "independent":
            return None
        return per_step_decay(self.mode, group["lr"], wd, group.get(LR_MAX_KEY), step_size)

    def _step_size(self, group: dict[str, Any]) -> Any:
        """What the optimizer's own decoupled decay multiplies ``wd`` by, or ``None`` where it is not known."""
        return self.rule.step_size(self.optimizer, group) if self.rule.step_size is not None else None

    def _native_settings(self, group: dict[str, Any], wd: Any) -> dict[str, Any] | None:
        """The group settings under which the optimizer's own decay is this step's decay ``wd`` in ``self.mode``,
        or ``None`` where it needs the generic pass."""
        if not self.native or self.cautious:
            return None
        dtypes, has_special = self._info(group)
        if has_special or (self.stochastic_rounding and dtypes & set(LOW_PRECISION)):
            return None  # the optimizer's decay is per group; exclusions and rounding need the per-parameter pass
        rule = self.rule
        own = rule.own_rule(self.optimizer, group)
        own_wd = group.get("weight_decay")
        same = wd is own_wd or not isinstance(wd, Tensor) and not isinstance(own_wd, Tensor) and wd == own_wd
        changed = {} if same else {"weight_decay": wd}  # a scheduled value (a tensor is compared by identity: no sync)
        same_reference = self.mode not in WITH_LR_MAX or self._own_lr_max(group) == group.get(LR_MAX_KEY)
        if own == self.mode and same_reference:
            return changed
        switched = rule.switches.get(self.mode)
        if switched is not None and all(k in group for k in switched) and same_reference:
            return {**switched, **changed}
        if self.mode in WITH_LR_MAX and rule.step_size is group_lr:
            # its own decoupled decay `lr * c` (in its own form and place), handed `c = x / lr` (independent:
            # wd / lr_max; corrected: wd * lr / lr_max), is this mode's decay `x`; a tensor lr would make `c` a
            # tensor: generic pass
            base = {} if own == "decoupled" else rule.switches.get("decoupled")
            if base is None or not all(k in group for k in base) or group.get(LR_MAX_KEY) is None:
                return None
            if self.mode == "independent":
                return {**base, "weight_decay": wd / group[LR_MAX_KEY]}
            if isinstance(group["lr"], (int, float)):
                return {**base, "weight_decay": wd * group["lr"] / group[LR_MAX_KEY]}
        return None

    def _own_lr_max(self, group: dict[str, Any]) -> float | None:
        """The reference lr of the optimizer's own independent/corrected decay, where it has one."""
        return self.rule.reference_lr(self.optimizer, group) if self.rule.reference_lr is not None else None

    def _plan(self, group: dict[str, Any], wd: Any = None) -> tuple[dict[str, Any] | None, str | None]:
        """``(settings, None)`` for the native handoff, ``(None, None)`` for the generic pass, ``(None, reason)`` where
        this group cannot be given ``self.mode`` (checked at attach and at every step)."""
        rule: OptimizerRule = self.rule
        mode, name = self.mode, type(self.optimizer).__name__
        if rule.refuse is not None:
            reason = rule.refuse(self.optimizer, group, mode)
            if reason is not None:
                return None, reason
        if self.cautious and rule.update_direction is None:
            return None, (
                f"cautious decay needs the sign of each step's update before the step, and lightning_wd does not know"
                f" how to compute it for {name}. Use cautious=False."
            )
        if mode in WITH_LR_MAX and (group.get("lr") is None or group.get(LR_MAX_KEY) is None):
            return None, (
                f"mode={mode!r} scales the decay by lr / lr_max, and this group's lr is None ({name} then takes a"
                " relative step size of its own). Give the optimizer an lr, or use mode='decoupled'."
            )
        settings = self._native_settings(group, self.current_weight_decay(group) if wd is None else wd)
        if settings is not None:
            return settings, None
        # the generic pass: weight_decay set to 0 for the step, the decay applied by lightning_wd before it
        why = self._why_generic()
        if rule.own_rule(self.optimizer, group) == mode and not rule.generic_is_exact(group):
            return None, (
                f"{name}'s own {mode} decay ({rule.description}) happens where lightning_wd's separate pass, needed"
                f" for {why}, cannot reproduce it. Give the parameters to exclude a param group with"
                " weight_decay=0 instead of `exclude`, or leave the decay to the optimizer (native=True)."
            )
        if rule.generic_refusal is not None:
            reason = rule.generic_refusal(self.optimizer, group, mode)
            if reason is not None:
                return None, f"mode={mode!r} needs lightning_wd's separate pass for {why}, but {reason}"
        if mode in ("decoupled", "corrected") and self._step_size(group) is None:
            return None, (
                f"{name}'s step size is relative (set per parameter inside its step), so a decay that follows it"
                " cannot be applied outside the step. Give it an lr (e.g. relative_step=False), or use"
                " mode='decoupled' without exclusions so that it applies its own decay."
            )
        return None, None

    def _why_generic(self) -> str:
        """Why a group takes the generic pass, in words, for messages."""
        if self.cautious:
            return "cautious decay"
        if not self.native:
            return "native=False"
        if self._excluded or self._uncorrected:
            return "excluded or uncorrected parameters"
        if self.stochastic_rounding:
            return "stochastic rounding"
        return f"mode={self.mode!r}, which {type(self.optimizer).__name__} does not implement itself"

    # --- per step ------------------------------------------------------------------------------------------------
    def check_decay(self) -> None:
        """Check every group's per-step decay now (also done whenever it changes): refuse one that would zero or
        flip the weights, warn where bf16/fp16 rounding loses it."""
        for index, group in enumerate(self.optimizer.param_groups):
            wd = self.current_weight_decay(group)
            if isinstance(wd, Tensor) or wd != 0:
                self._check_step(index, group, wd)

    def _check_step(self, index: int, group: dict[str, Any], wd: Any) -> None:
        if self.mode == "coupled":
            return  # coupled decay multiplies nothing: it adds wd * p to the gradient
        x = self.per_step_decay(group, wd)
        if x is None or isinstance(x, Tensor) or self._last_decay.get(id(group["params"])) == x:
            return  # a tensor is not read on the host (that would sync the device); an unchanged decay was checked
        self._last_decay[id(group["params"])] = x
        name = type(self.optimizer).__name__
        if x >= 1:
            raise ValueError(
                f"lightning_wd: param group {index} of {name} would be decayed by {x:.4g} per step (p *= 1 - {x:.4g}),"
                f" which zeroes or flips the sign of every weight (mode={self.mode!r}, weight_decay={wd:g}). A"
                " per-step decay must be below 1; typical values are 1e-5 to 1e-2."
            )
        if self.mode in WITH_LR_MAX and ("lr", index) not in self._warned and group["lr"] > group[LR_MAX_KEY]:
            self._warned.add(("lr", index))
            rank_zero_warn(
                f"lightning_wd: param group {index} of {name} has lr {group['lr']:.4g}, above its lr_max"
                f" {group[LR_MAX_KEY]:.4g}, so mode={self.mode!r} decays it by more than at the peak it assumes."
                " Pass `lr_max` = the schedule's peak lr."
            )
        if self.stochastic_rounding:
            return  # stochastic rounding keeps the decay
        for dtype in self._info(group)[0]:
            if decay_is_lost(x, dtype) and (index, dtype) not in self._warned:
                self._warned.add((index, dtype))
                rank_zero_warn(
                    f"lightning_wd: param group {index} of {name}: {lost_decay_message(x, dtype)} Pass"
                    " `stochastic_rounding=True` to keep the decay, or keep fp32 master weights (e.g. bf16-mixed)."
                )

    def _pre_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # torch runs the hooks in a wrapper around each class's step(); a subclass whose step() calls super().step()
        # runs them twice, nested. Only the outermost step takes the decay over: the wrapper's frame of the step in
        # progress is still on the stack in a nested call (and not after a step that raised).
        caller = sys._getframe(1)
        if self._step_frame is not None and _on_stack(self._step_frame, caller):
            return None
        self._step_frame = caller
        self._restore()  # a step that raised inside the optimizer left its values: the user's come back first
        if len(self._seen) != len(self.optimizer.param_groups):
            self._adopt(restored=False)  # groups added during training (BackboneFinetuning, add_param_group)
        closure, positional = _closure_of(args, kwargs)
        if closure is None:
            self._take_over()
            return None
        wrapped = self._wrap_closure(closure)
        if positional:
            return (args[0], wrapped, *args[2:]), kwargs
        return args, {**kwargs, "closure": wrapped}

    def _post_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        if sys._getframe(1) is not self._step_frame:
            return  # the end of a nested step(): the outer one is still running
        self._step_frame = None
        self._restore()
        if self.schedule is not None:
            for group in optimizer.param_groups:
                group[STEP_KEY] = group.get(STEP_KEY, 0) + 1

    def _restore(self) -> None:
        """Put the user's values back into every group the current step changed."""
        for group, saved in self._stash:
            group.update(saved)
        self._stash.clear()

    def _take_over(self) -> None:
        """For this step: hand each group's current decay to the optimizer or take it and apply it; on any
        exception, the groups get the user's values back before it propagates."""
        try:
            generic = []
            for index, group in enumerate(self.optimizer.param_groups):
                wd = self.current_weight_decay(group)
                if not isinstance(wd, Tensor) and wd == 0:
                    if group.get("weight_decay", 0.0) != 0:  # a schedule at 0 for this step
                        self._stash.append((group, {"weight_decay": group["weight_decay"]}))
                        group["weight_decay"] = 0.0
                    continue
                settings, refusal = self._plan(group, wd)
                if refusal is not None:  # e.g. a switch the user flipped since attach
                    raise ValueError(f"lightning_wd: param group {index} of {type(self.optimizer).__name__}: {refusal}")
                self._check_step(index, group, wd)
                if settings is None:
                    self._stash.append((group, {"weight_decay": group.get("weight_decay", 0.0)}))
                    group["weight_decay"] = 0.0
                    generic.append((group, wd))
                elif settings:
                    self._stash.append((group, {k: group[k] for k in settings}))
                    group.update(settings)
            self._apply(generic)
        except BaseException:
            self._restore()
            raise

    def _wrap_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        calls = 0

        def closure_then_take_over() -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise RuntimeError(
                    f"{type(self.optimizer).__name__}.step() called its closure more than once; lightning_wd applies"
                    " the decay once per step after the closure and cannot follow an optimizer that re-evaluates it."
                )
            with torch.enable_grad():
                out = closure()
            self._take_over()
            return out

        return closure_then_take_over

    @torch.no_grad()
    def _apply(self, groups: list[tuple[dict[str, Any], Any]]) -> None:
        opt = self.optimizer
        # Optimizers that handle AMP scaling themselves (torch's fused=True) are stepped even when the gradients
        # are not finite, with `found_inf` and `grad_scale` set on them; their gradients are still scaled.
        amp_in_step = getattr(opt, "_step_supports_amp_scaling", False)
        found_inf = getattr(opt, "found_inf", None) if amp_in_step else None
        grad_scale = getattr(opt, "grad_scale", None) if amp_in_step else None
        for group, wd in groups:
            params = [p for p in group["params"] if p.grad is not None and id(p) not in self._excluded]
            if self.cautious:
                self._apply_cautious(group, params, wd, found_inf, grad_scale)
            elif self.mode == "coupled":
                grads = [p.grad for p in params]
                add_l2_to_grads_(params, grads, -wd if group.get("maximize", False) else wd, grad_scale)
            else:
                for subset, x in self._decays(group, params, wd):
                    decay_weights_(subset, x, 1.0, skip=found_inf, stochastic_rounding=self.stochastic_rounding)

    def _decays(self, group: dict[str, Any], params: list[Tensor], wd: Any) -> list[tuple[list[Tensor], Any]]:
        """``(parameters, x)`` pairs of the multiplicative decay ``p *= 1 - x``: under mode="corrected" the
        ``uncorrected`` parameters get the plain decoupled decay."""
        x = self.per_step_decay(group, wd)
        if not self._uncorrected:
            return [(params, x)]
        plain = [p for p in params if id(p) in self._uncorrected]
        corrected = [p for p in params if id(p) not in self._uncorrected]
        return [(corrected, x), (plain, per_step_decay("decoupled", group["lr"], wd, None, self._step_size(group)))]

    def _apply_cautious(self, group: dict[str, Any], params: list[Tensor], wd: Any, found_inf: Any,
                        grad_scale: Any) -> None:
        direction = self.rule.update_direction
        for subset, x in self._decays(group, params, wd):
            grads = [p.grad for p in subset]
            directions = [direction(self.optimizer, group, p, g) for p, g in zip(subset, grads)]
            if any(d is None for d in directions):
                raise ValueError(
                    f"lightning_wd: cautious decay cannot know the sign of {type(self.optimizer).__name__}'s update"
                    " with these settings (e.g. RMSprop with momentum). Use cautious=False."
                )
            if grad_scale is not None:  # the gradient still carries the loss scale, the state does not
                raise ValueError("lightning_wd: cautious decay does not support fused optimizers under fp16 AMP yet.")
            if self.mode == "coupled":
                l2 = -wd if group.get("maximize", False) else wd
                cautious_decay_(subset, directions, grads=grads, weight_decay=l2)
            else:
                cautious_decay_(subset, directions, per_step_decay=x, skip=found_inf)

    # --- detaching -----------------------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove the hooks; the groups hold the user's values (and the record of the mode they were trained in)."""
        self._restore()
        self._step_frame = None
        for h in self._handles:
            h.remove()
        self._handles = []
        if _ATTACHED.get(self.optimizer) is self:
            del _ATTACHED[self.optimizer]

    def __enter__(self) -> AttachedWeightDecay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def _on_stack(frame: Any, start: Any) -> bool:
    """Whether ``frame`` is ``start`` or one of its callers."""
    while start is not None:
        if start is frame:
            return True
        start = start.f_back
    return False


def _check_lr_max_arg(lr_max: LrMax) -> Callable[[int], float | None]:
    """``lr_max`` as a function of the group index (``None``: the group's own peak or initial lr)."""
    if isinstance(lr_max, Sequence) and not isinstance(lr_max, str):
        per_group = [check_lr_max(v) for v in lr_max]
        return lambda index: per_group[index] if index < len(per_group) else None
    value = check_lr_max(lr_max)
    return lambda index: value


def _peak_lr(group: Mapping[str, Any]) -> float | None:
    """The reference lr of ``mode="independent"``: the schedule's peak where the scheduler records one in the group
    (``OneCycleLR``'s ``max_lr``), else the lr it started from (``initial_lr``), else the current lr; a tensor lr's
    value, not the tensor (which the scheduler goes on changing). ``None`` for an lr of ``None`` (relative steps)."""
    for key in ("max_lr", "initial_lr", "lr"):
        if group.get(key) is not None:
            return _host_float(group[key])
    return None


def _warn_if_assumed(optimizer: Optimizer, registered_as: type | None) -> None:
    cls = type(optimizer)
    if registered_as is cls:
        return
    if registered_as is None:
        what = "is not in lightning_wd's optimizer registry"
        assumed = (
            "its `weight_decay` only adds a decay (nothing else depends on it) and its step size is the group's lr"
        )
    else:
        what = f"is a subclass of {registered_as.__module__}.{registered_as.__qualname__}, whose entry it gets"
        assumed = f"its `weight_decay` behaves as {registered_as.__qualname__}'s"
    rank_zero_warn(
        f"lightning_wd: {cls.__module__}.{cls.__qualname__} {what}; assuming that {assumed}. Declare it with"
        " `lightning_wd.optimizers.register_optimizer` to make this explicit and silence this warning."
    )


def attach_weight_decay(
    optimizer: Optimizer,
    mode: Mode = "decoupled",
    weight_decay: float | None = None,
    exclude: Iterable[Tensor] = (),
    lr_max: LrMax = None,
    native: bool = True,
    stochastic_rounding: bool = False,
    schedule: str | None = None,
    weight_decay_end: float | None = None,
    total_steps: int | None = None,
    uncorrected: Iterable[Tensor] = (),
    cautious: bool = False,
    timescale_steps: float | None = None,
) -> AttachedWeightDecay:
    """Take over the weight decay of ``optimizer`` for each step and apply it in ``mode``.

    Between steps the param groups keep the user's values (``weight_decay``, ``decoupled_weight_decay``, ...): a
    schedule that writes ``group["weight_decay"]`` is followed at every step, and a ``state_dict()`` saved at any time
    holds the configured optimizer.

    Args:
        optimizer: any ``torch.optim.Optimizer`` whose ``step()`` evaluates its closure at most once, or the
            optimizer that ``fabric.setup(...)`` returns.
        mode: ``"decoupled"`` (``p -= lr * wd * p``, AdamW), ``"coupled"`` (``grad += wd * p``, L2 as in
            ``Adam(weight_decay=...)``), ``"independent"`` (``p -= (lr / lr_max) * wd * p``, decay that follows the
            lr schedule but not the lr's size) or ``"corrected"`` (``p -= (lr**2 / lr_max) * wd * p``, AdamC).
        weight_decay: one decay for every group, written into the groups now and again after ``load_state_dict``;
            ``None`` keeps each group's own ``weight_decay``.
        exclude: parameters never decayed (e.g. biases and norm weights).
        lr_max: the reference lr of ``mode="independent"``: one for every group, or one per group; ``None`` takes
            each group's ``max_lr`` (set by ``OneCycleLR``), else its ``initial_lr`` (set by LR schedulers), else its
            lr when first seen.
        native: let optimizers that implement the mode themselves (``torch.optim.AdamW``, ``Adam`` through its
            ``decoupled_weight_decay`` switch, ...) apply the decay in their own kernel (same result, no extra pass).
        stochastic_rounding: decay bf16/fp16 weights with stochastic rounding, so that a per-step decay smaller than
            the format's resolution is not rounded away (see :mod:`lightning_wd.low_precision`). Without it, such a
            lost decay is reported with a warning, once per group and dtype.
        schedule: ``"cosine"`` or ``"linear"``: the decay goes from each group's ``weight_decay`` to
            ``weight_decay_end`` over ``total_steps`` steps (see :mod:`lightning_wd.schedules`); the steps taken are
            counted in the groups (``"lightning_wd_step"``), so a resumed ``state_dict`` goes on.
        weight_decay_end, total_steps: the end value and length of ``schedule``.
        uncorrected: under ``mode="corrected"``, parameters that get the plain decoupled decay instead.
        cautious: decay only the elements whose update (its sign, read from the optimizer's state and gradient
            before the step) has the weight's sign (Chen et al. 2025).
        timescale_steps: set each group's ``weight_decay`` so that the decay's timescale ``1 / (per-step decay)`` at
            the peak lr is this many steps: ``1 / (lr_max * timescale_steps)`` (independent: ``1 / timescale_steps``).

    Returns:
        A handle whose ``detach()`` removes the hooks.

    Raises:
        ValueError: for a bad argument, an optimizer that already has weight decay attached, or a group whose decay
            cannot be given in ``mode`` (the message says why and what to use instead).

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.5)
        >>> handle = attach_weight_decay(opt)
        >>> opt.param_groups[0]["weight_decay"], opt.param_groups[0]["decoupled_weight_decay"]  # as configured
        (0.5, False)
        >>> model(torch.randn(3, 4)).sum().backward()
        >>> opt.step()  # for this step only, Adam applies its decay as AdamW does
        >>> opt.param_groups[0]["lightning_wd_mode"]
        'decoupled'
        >>> handle.detach()
    """
    return AttachedWeightDecay(
        optimizer, mode, weight_decay, exclude, lr_max, native, stochastic_rounding, schedule, weight_decay_end,
        total_steps, uncorrected, cautious, timescale_steps,
    )
