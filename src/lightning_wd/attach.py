"""Attach weight decay to any ``torch.optim.Optimizer``: the engine behind :class:`lightning_wd.WeightDecay`, usable on
its own in a hand-written loop or with Lightning Fabric::

    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.01)
    handle = attach_weight_decay(opt, mode="decoupled")   # now trains exactly as AdamW
    for x, y in data:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    handle.detach()

The state model. Between steps every param group holds what the user configured: its ``weight_decay`` (which an LR
or weight-decay schedule may rewrite at any time) and its switches such as ``decoupled_weight_decay``. The decay is
taken over only for the duration of each ``step()``, once the gradients are final (:mod:`lightning_wd.stepping`): each
group's *current* ``weight_decay`` is either handed to the optimizer with the switches that make its own decay the
chosen mode (native handoff: its own kernel, no extra pass), or the group's ``weight_decay`` is set to 0 and the decay
applied in one batched pass (:mod:`lightning_wd.generic_pass`); :mod:`lightning_wd.plan` decides which, from the
optimizer's registry entry (:mod:`lightning_wd.optimizers`). When the step ends, or raises, the user's values come
back. What each group records for a resume is in :mod:`lightning_wd.records`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.fabric.wrappers import _FabricOptimizer
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.checks import DecayChecks
from lightning_wd.config import DecayConfig, LrMax
from lightning_wd.generic_pass import ROUNDING_KEY, GenericPass
from lightning_wd.modes import Mode
from lightning_wd.optimizers import rule_for
from lightning_wd.plan import GENERIC, LR_MAX_KEY, Native, Plan, Planner, Refused
from lightning_wd.records import (
    MODE_KEY,
    STEP_KEY,
    GroupRecords,
    current_weight_decay,
    group_per_step_decay,
)
from lightning_wd.stepping import StepHooks

__all__ = [
    "AttachedWeightDecay",
    "LR_MAX_KEY",
    "MODE_KEY",
    "STEP_KEY",
    "attach_weight_decay",
    "attached_to",
    "unwrap_optimizer",
]

# one attachment per optimizer: a second would decay twice, or silently overrule the first
_ATTACHED: weakref.WeakKeyDictionary[Optimizer, AttachedWeightDecay] = weakref.WeakKeyDictionary()


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The ``torch.optim.Optimizer`` that steps: inside Lightning's ``LightningOptimizer`` or Fabric's
    ``_FabricOptimizer`` (Fabric's poses as a subclass of the optimizer's class, so it is unwrapped by type), and
    inside a wrapper optimizer whose registry entry names the optimizer it wraps (Lookahead)."""
    inner = optimizer
    while True:
        while isinstance(inner, (LightningOptimizer, _FabricOptimizer)):
            inner = inner.optimizer
        rule, _ = rule_for(type(inner))  # a wrapper need not be a torch optimizer (schedulefree's is not)
        if rule.inner is not None:
            inner = rule.inner(inner)
            continue
        if not isinstance(inner, Optimizer):
            raise TypeError(
                "`optimizer` must be a torch.optim.Optimizer (or a Lightning/Fabric wrapper of one),"
                f" got {type(optimizer).__name__}."
            )
        return inner


def _tensors(name: str, values: Any) -> set[int]:
    """The ids of the tensors in ``values``; anything else is refused, naming the argument."""
    if values is None:
        return set()
    if isinstance(values, (str, Tensor)) or not isinstance(values, Iterable):
        raise TypeError(f"`{name}` must be a list of parameters (tensors), got {values!r}.")
    values = list(values)
    bad = [v for v in values if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(
            f"`{name}` must hold parameters (tensors), got {bad[:3]!r}. To select parameters by name pattern, pass"
            f" `lightning_wd.excluded_parameters(model, [...]).values()`, or use the WeightDecay callback, whose"
            f" `{name}` takes patterns."
        )
    return {id(v) for v in values}


class AttachedWeightDecay:
    """Weight decay attached to one optimizer; made by :func:`attach_weight_decay`, undone by :meth:`detach`.

    It answers the monitors' questions about the decay each group gets (:meth:`current_weight_decay`,
    :meth:`per_step_decay`, :meth:`is_excluded`, ...). It is the listener of the optimizer's steps
    (:class:`lightning_wd.stepping.StepHooks`) that takes the decay over: after the monitors have read the gradients.
    """

    priority = 10

    def __init__(self, optimizer: Any, config: DecayConfig, exclude: Iterable[Tensor] = (),
                 uncorrected: Iterable[Tensor] = ()) -> None:
        self.optimizer = optimizer = unwrap_optimizer(optimizer)
        self.config = config
        self._excluded, self._uncorrected = _tensors("exclude", exclude), _tensors("uncorrected", uncorrected)
        if self._uncorrected and config.mode != "corrected":
            raise ValueError("`uncorrected` parameters only make sense with mode='corrected'.")
        if config.schedule is not None and config.total_steps is None:
            raise ValueError(f"`schedule={config.schedule!r}` needs `total_steps`, a positive int, got None.")
        other = _ATTACHED.get(optimizer)
        if other is not None:
            raise ValueError(f"{type(optimizer).__name__} already has weight decay attached ({other!r}); a second"
                             " attachment would decay twice or overrule the first. Detach it first.")
        self.rule, registered_as = rule_for(optimizer)
        self._planner = Planner(optimizer, self.rule, config, self._has_special)
        self._pass = GenericPass(optimizer, self.rule, config, self._excluded, self._uncorrected)
        self._checks = DecayChecks(optimizer, config)
        self._records = GroupRecords(optimizer, self.rule, config, self._check_adopted)
        self._dtypes: dict[int, tuple[list[Tensor], int, frozenset[torch.dtype]]] = {}
        self._stash: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (group, the user's values) during a step
        self._records.adopt(restored=False)  # all or nothing: refused before any hook is in place
        _warn_if_assumed(optimizer, registered_as)
        self._load_hook = optimizer.register_load_state_dict_post_hook(self._after_load)
        StepHooks.of(optimizer).add(self)
        _ATTACHED[optimizer] = self

    @property
    def mode(self) -> Mode:
        return self.config.mode

    def __repr__(self) -> str:
        c = self.config
        args = [f"mode={c.mode!r}"]
        if c.weight_decay is not None:
            args.append(f"weight_decay={c.weight_decay}")
        if c.schedule is not None:
            args.append(f"schedule={c.schedule!r}, weight_decay_end={c.weight_decay_end}")
        if c.cautious:
            args.append("cautious=True")
        if not c.native:
            args.append("native=False")
        return f"AttachedWeightDecay({', '.join(args)})"

    # --- what each group gets --------------------------------------------------------------------------------
    def _group_dtypes(self, group: dict[str, Any]) -> frozenset[torch.dtype]:
        params = group["params"]
        known = self._dtypes.get(id(params))
        if known is None or known[0] is not params or known[1] != len(params):
            known = self._dtypes[id(params)] = (params, len(params), frozenset(p.dtype for p in params))
        return known[2]

    def _has_special(self, group: dict[str, Any]) -> bool:
        """Whether some parameters of ``group`` need the per-parameter pass (excluded, or uncorrected)."""
        special = self._excluded | self._uncorrected
        return bool(special) and any(id(p) in special for p in group["params"])

    def plan(self, group: dict[str, Any], wd: Any = None) -> Plan:
        """How ``group`` gets its decay in the coming step: :class:`~lightning_wd.plan.Native`,
        :data:`~lightning_wd.plan.GENERIC` or :class:`~lightning_wd.plan.Refused`."""
        wd = self.current_weight_decay(group) if wd is None else wd
        return self._planner.plan(group, wd, self._group_dtypes(group))

    def is_excluded(self, param: Tensor) -> bool:
        """Whether ``param`` gets no decay (``exclude``)."""
        return id(param) in self._excluded

    def is_uncorrected(self, param: Tensor) -> bool:
        """Whether ``param`` gets the plain decoupled decay under ``mode="corrected"`` (``uncorrected``)."""
        return id(param) in self._uncorrected

    def step_size(self, group: dict[str, Any]) -> Any:
        """What the optimizer's own decoupled decay multiplies ``wd`` by for ``group`` (its lr; ``d * lr`` for
        Prodigy), or ``None`` where it is known only inside its step (a relative step size)."""
        return self.rule.group_step_size(self.optimizer, group)

    def current_weight_decay(self, group: dict[str, Any]) -> Any:
        """The ``weight_decay`` the coming step applies to ``group``: the group's own, or its ``schedule`` value."""
        return current_weight_decay(self.config, group)

    def per_step_decay(self, group: dict[str, Any], wd: Any = None) -> Any:
        """The ``x`` of ``p *= 1 - x`` the coming step applies to ``group``'s parameters (``None`` in coupled
        mode, which adds ``wd * p`` to the gradient instead); a host float, or a device tensor for a tensor lr."""
        wd = self.current_weight_decay(group) if wd is None else wd
        return group_per_step_decay(self.rule, self.optimizer, self.config, group, wd)

    # --- checks --------------------------------------------------------------------------------------------------
    def _check_adopted(self, index: int, group: dict[str, Any]) -> None:
        """At adoption: refuse a group whose decay cannot be had, also at the largest decay a schedule reaches."""
        plan = self.plan(group)
        if isinstance(plan, Refused):
            raise ValueError(f"lightning_wd: param group {index} of {type(self.optimizer).__name__}: {plan.reason}")
        self._records.warn_if_switch_overruled(index, group)
        if self.config.schedule is not None and not isinstance(group.get("weight_decay"), Tensor):
            end = self.config.weight_decay_end if group.get("weight_decay", 0.0) != 0 else 0.0
            wd = max(group.get("weight_decay", 0.0), end)
            x = self._peak_decay(group, wd)
            self._checks.check(index, group, wd, x, (), what="would be decayed at its schedule's largest decay")
            self._checks.forget()

    def _peak_decay(self, group: dict[str, Any], wd: float) -> Any:
        """The per-step shrink of decay ``wd`` at the group's peak lr (its ``max_lr``/``initial_lr``, else lr)."""
        lr = next((group[k] for k in ("max_lr", "initial_lr", "lr") if group.get(k) is not None), None)
        return group_per_step_decay(self.rule, self.optimizer, self.config, {**group, "lr": lr}, wd)

    def check_decay(self) -> None:
        """Check every group's per-step decay now (also done whenever it changes): refuse one that would zero, flip
        or poison the weights, warn where bf16/fp16 rounding loses it."""
        for index, group in enumerate(self.optimizer.param_groups):
            wd = self.current_weight_decay(group)
            self._checks.check(index, group, wd, self.per_step_decay(group, wd), self._group_dtypes(group))

    # --- the step (StepHooks listener) ---------------------------------------------------------------------------
    def on_begin(self, optimizer: Optimizer) -> None:
        if self._records.pending():
            self._records.adopt(restored=False)  # groups added during training (BackboneFinetuning) or replaced

    def on_grads_ready(self, optimizer: Optimizer) -> None:
        """For this step: hand each group's current decay to the optimizer, or take it and apply it."""
        generic = []
        for index, group in enumerate(optimizer.param_groups):
            wd = self.current_weight_decay(group)
            if not isinstance(wd, Tensor) and wd == 0:
                if group.get("weight_decay", 0.0) != 0:  # a schedule at 0 for this step
                    self._stash_and_set(group, {"weight_decay": 0.0})
                continue
            dtypes = self._group_dtypes(group)
            plan = self._planner.plan(group, wd, dtypes)
            if isinstance(plan, Refused):  # e.g. a switch the user flipped since attach
                raise ValueError(f"lightning_wd: param group {index} of {type(optimizer).__name__}: {plan.reason}")
            x = self.per_step_decay(group, wd)
            self._checks.check(index, group, wd, x, dtypes)
            if plan is GENERIC:
                self._stash_and_set(group, {"weight_decay": 0.0})
                generic.append((index, group, wd, x))
            elif isinstance(plan, Native) and plan.settings:
                self._stash_and_set(group, plan.settings)
        if generic:  # not even its no_grad context when every group is handed over (the native handoff)
            self._pass.apply(generic)

    def _stash_and_set(self, group: dict[str, Any], settings: Any) -> None:
        self._stash.append((group, {k: group[k] for k in settings if k in group}))
        group.update(settings)

    def on_end(self, optimizer: Optimizer) -> None:
        self._restore()
        for group in optimizer.param_groups:
            if self.config.schedule is not None:
                group[STEP_KEY] = group.get(STEP_KEY, 0) + 1
            if self.config.stochastic_rounding:
                group[ROUNDING_KEY] = group.get(ROUNDING_KEY, 0) + 1

    def on_abort(self, optimizer: Optimizer) -> None:
        self._restore()  # the user's values are back before the exception leaves step()

    def on_closure_repeat(self, optimizer: Optimizer) -> None:
        raise RuntimeError(
            f"{type(optimizer).__name__}.step() called its closure more than once; lightning_wd applies the decay"
            " once per step after the closure and cannot follow an optimizer that re-evaluates it."
        )

    def _restore(self) -> None:
        """Put the user's values back into every group the current step changed."""
        for group, saved in reversed(self._stash):
            group.update(saved)
        self._stash.clear()

    def _after_load(self, optimizer: Optimizer) -> None:
        self._records.adopt(restored=True)
        self._checks.forget()

    # --- detaching -----------------------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove the hooks; the groups hold the user's values (and the record of the mode they were trained in)."""
        self._restore()
        StepHooks.of(self.optimizer).remove(self)
        self._load_hook.remove()
        if _ATTACHED.get(self.optimizer) is self:
            del _ATTACHED[self.optimizer]

    def __enter__(self) -> AttachedWeightDecay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attached_to(optimizer: Any) -> AttachedWeightDecay | None:
    """The weight decay attached to ``optimizer`` (or to the optimizer it wraps), if any."""
    try:
        return _ATTACHED.get(unwrap_optimizer(optimizer))
    except TypeError:
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
            optimizer that ``fabric.setup(...)`` returns, or a wrapper the registry knows (Lookahead: the decay goes
            to the optimizer it wraps).
        mode: ``"decoupled"`` (``p -= lr * wd * p``, AdamW), ``"coupled"`` (``grad += wd * p``, L2 as in
            ``Adam(weight_decay=...)``), ``"independent"`` (``p -= (lr / lr_max) * wd * p``, decay that follows the
            lr schedule but not the lr's size) or ``"corrected"`` (``p -= (lr**2 / lr_max) * wd * p``, AdamC).
        weight_decay: one decay for every group, written into the groups now and again after ``load_state_dict``;
            ``None`` keeps each group's own ``weight_decay``. A group configured with no decay keeps none (see
            :mod:`lightning_wd.records`).
        exclude: parameters (tensors) never decayed (e.g. biases and norm weights); for name patterns use
            :func:`lightning_wd.excluded_parameters`.
        lr_max: the reference lr of the lr-scaled modes: one for every group, or one per group; ``None`` takes each
            group's scheduler-recorded peak (``OneCycleLR``'s ``max_lr``), else the optimizer's own reference, else
            its ``initial_lr`` (set by LR schedulers), else its lr when first seen (:mod:`lightning_wd.lr_reference`).
        native: let optimizers that implement the mode themselves (``torch.optim.AdamW``, ``Adam`` through its
            ``decoupled_weight_decay`` switch, ...) apply the decay in their own kernel (same result, no extra pass).
        stochastic_rounding: decay bf16/fp16 weights with stochastic rounding, so that a per-step decay smaller than
            the format's resolution is not rounded away (see :mod:`lightning_wd.low_precision`), from a random stream
            of its own (reproducible on resume, the same on every rank). Without it, such a lost decay is reported
            with a warning, once per group and dtype.
        schedule: ``"cosine"`` or ``"linear"``: the decay goes from each group's ``weight_decay`` to
            ``weight_decay_end`` over ``total_steps`` steps (see :mod:`lightning_wd.schedules`); the steps taken are
            counted in the groups (``"lightning_wd_step"``), so a resumed ``state_dict`` goes on.
        weight_decay_end: the decay ``schedule`` reaches at its end.
        total_steps: the length of ``schedule``, in optimizer steps.
        uncorrected: under ``mode="corrected"``, parameters (tensors) that get the plain decoupled decay instead.
        cautious: decay only the elements whose update (its sign, read from the optimizer's state and gradient
            before the step) has the weight's sign (Chen et al. 2025).
        timescale_steps: set each group's ``weight_decay`` so that the decay's timescale ``1 / (per-step decay)`` at
            the peak lr is this many steps: ``1 / (lr_max * timescale_steps)`` (independent: ``1 / timescale_steps``).

    Returns:
        A handle whose ``detach()`` removes the hooks.

    Raises:
        TypeError: for an argument of the wrong type (``exclude`` holding name patterns, ``native="False"``, ...).
        ValueError: for a bad value, an optimizer that already has weight decay attached, or a group whose decay
            cannot be given in ``mode`` (the message says why and what to use instead). Nothing is attached then.

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
    config = DecayConfig(
        mode=mode, weight_decay=weight_decay, lr_max=lr_max, native=native, stochastic_rounding=stochastic_rounding,
        schedule=schedule, weight_decay_end=weight_decay_end, cautious=cautious, total_steps=total_steps,
        timescale_steps=timescale_steps,
    )
    return AttachedWeightDecay(optimizer, config, exclude, uncorrected)

