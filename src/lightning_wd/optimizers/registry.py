"""What lightning_wd knows about each optimizer class: how it applies its own ``weight_decay``, which switches of its
param groups select the rule, what its decoupled decay is scaled by, and what it cannot do.

The decay engine (:mod:`lightning_wd.attach`) is the reader; it never asks ``isinstance`` itself. Entries are keyed by
import path (``"torch.optim.Adam"``) and resolved only once their package has been imported, so this module imports
no optimizer package. A user (or another library) declares an optimizer in a few lines::

    >>> from lightning_wd.optimizers import OptimizerRule, register_optimizer
    >>> register_optimizer(
    ...     "my_package.MyAdamW",
    ...     OptimizerRule(own="decoupled", description="p *= 1 - lr*wd before the update"),
    ... )
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from torch import Tensor
from torch.optim import Optimizer

Scalar = Union[float, Tensor]
Group = Mapping[str, Any]

GroupTest = Callable[[Group], bool]
Refusal = Callable[[Optimizer, Group, str], Union[str, None]]

__all__ = [
    "OptimizerRule",
    "UNKNOWN",
    "always",
    "formula_for",
    "group_lr",
    "switch",
    "register_optimizer",
    "rule_for",
]


def group_lr(optimizer: Optimizer, group: Group) -> Scalar:
    """The step size most optimizers' decoupled decay multiplies: the group's current lr."""
    return group["lr"]


def always(reason: str) -> Refusal:
    """A refusal that holds for every group and rule."""
    return lambda optimizer, group, rule: reason


@dataclass(frozen=True)
class OptimizerRule:
    """How one optimizer class applies its param groups' ``weight_decay``.

    Args:
        own: the rule its own ``weight_decay`` implements for a group as configured: ``"coupled"`` (``g += wd*p``
            before the update), ``"decoupled"`` (a decay of the weights outside the gradient, scaled by its step
            size), ``"independent"`` or ``"corrected"`` (against its own reference lr, see ``reference_lr``), or
            ``None`` for none of these (a rule of its own, or no ``weight_decay`` at all). A callable gets the
            optimizer and the param group and returns one of these, for optimizers with switches.
        switches: for each rule the group settings under which its own decay is that rule, e.g.
            ``{"decoupled": {"decoupled_weight_decay": True}, "coupled": {"decoupled_weight_decay": False}}``. The
            engine sets them for the duration of a step (native handoff) and puts the user's values back after it.
        step_size: what its decoupled decay multiplies ``wd`` by (``group["lr"]``; ``d * lr`` for Prodigy), as a
            function of the optimizer and the group; the generic pass uses it. ``None`` (or a ``None`` result): not
            knowable before the step (a relative, per-parameter step size): the generic decoupled pass is refused.
        exact_generic: whether the generic pass (``weight_decay`` set to 0 for the step, ``p *= 1 - step_size*wd``
            or ``g += wd*p`` applied before it) reproduces its own decay: the same rule at the same point, up to
            rounding. ``False`` where its own decay sits elsewhere (after the update, between computations that
            read ``p``): where it must be given its own rule but the generic pass is needed (exclusions, cautious
            decay, ``native=False``), the engine refuses. A callable gets the group.
        reference_lr: the reference lr its own ``"independent"``/``"corrected"`` decay divides by (optimi's
            ``max_lr``, timm's ``max_lr_snapshot``), as a function of the optimizer and the group; it is the
            default ``lr_max`` of those modes, and native handoff needs the two to agree.
        refuse: ``(optimizer, group, rule) -> reason or None``: why no path can give the group ``rule`` (LBFGS).
        generic_refusal: ``(optimizer, group, rule) -> reason or None``: what else ``weight_decay`` does in it, or
            what breaks, when the generic pass is used (a trust ratio switched on by ``weight_decay != 0``; an
            in-place decay before a Hessian-vector product); native handoff stays allowed.
        update_direction: for cautious decay, a function ``(optimizer, group, param, grad) -> direction`` where
            ``direction(start, stop)`` gives this step's update direction (its sign is what matters) for the
            flattened elements ``[start, stop)``, computed before the step from the state and the gradient; ``None``
            (or a ``None`` result) where the sign of the update cannot be known before the step.
        effective_lr: what :class:`lightning_wd.EffectiveLRMonitor` reads: a
            :class:`lightning_wd.effective_lr.Formula` (the function that makes a parameter's rate from its state, or
            the reason why the optimizer has no per-element rate); ``None``: not known.
        description: its own rule in words, for the compatibility table and messages.
    """

    own: str | None | Callable[[Optimizer, Group], str | None] = None
    switches: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    step_size: Callable[[Optimizer, Group], Scalar] | None = group_lr
    exact_generic: bool | GroupTest = True
    reference_lr: Callable[[Optimizer, Group], float | None] | None = None
    refuse: Refusal | None = None
    generic_refusal: Refusal | None = None
    update_direction: Callable[[Optimizer, Group, Tensor, Tensor], Callable[[int, int], Tensor] | None] | None = None
    effective_lr: Any = None
    description: str = ""

    def own_rule(self, optimizer: Optimizer, group: Group) -> str | None:
        return self.own(optimizer, group) if callable(self.own) else self.own

    def generic_is_exact(self, group: Group) -> bool:
        return self.exact_generic(group) if callable(self.exact_generic) else self.exact_generic


#: the rule assumed for a class nobody registered: its ``weight_decay`` only adds a decay, its step size is ``lr``
UNKNOWN = OptimizerRule(own=None, description="unknown")

_BY_PATH: dict[str, OptimizerRule] = {}
_BY_CLASS: dict[type, OptimizerRule] = {}
_UNRESOLVED: set[str] = set()


def register_optimizer(cls: type | str, rule: OptimizerRule) -> None:
    """Declare how ``cls`` (a class, or its import path such as ``"pytorch_optimizer.Lion"``) applies its decay.

    A later registration of the same class replaces the earlier one, so a user can correct an entry.
    """
    if isinstance(cls, str):
        _BY_PATH[cls] = rule
        _UNRESOLVED.add(cls)
    else:
        _BY_CLASS[cls] = rule


def _resolve() -> None:
    """Turn the import paths whose package is already imported into classes (a class in use was imported)."""
    for path in list(_UNRESOLVED):
        module, _, name = path.rpartition(".")
        if module.split(".")[0] not in sys.modules:
            continue
        _UNRESOLVED.discard(path)
        try:
            obj: Any = importlib.import_module(module)
            obj = getattr(obj, name)
        except (ImportError, AttributeError):
            continue  # not in this version of the package
        _BY_CLASS[obj] = _BY_PATH[path]


def rule_for(optimizer: Optimizer | type) -> tuple[OptimizerRule, type | None]:
    """The rule of ``optimizer``'s class, and the class it was registered under (a base class for a subclass;
    ``None`` when nothing is registered and :data:`UNKNOWN` is returned).

    A class matches an entry registered as a class, or under its defining ``module.qualname`` (no import needed);
    other import paths (a package's public re-export) are resolved by importing them once their package is.
    """
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for attempt in range(2):
        for klass in cls.__mro__:
            rule = _BY_CLASS.get(klass) or _BY_PATH.get(f"{klass.__module__}.{klass.__qualname__}")
            if rule is not None:
                return rule, klass
        if attempt == 0:
            _resolve()
    return UNKNOWN, None


def formula_for(optimizer: Optimizer | type) -> tuple[type, Any] | None:
    """The effective-lr :class:`~lightning_wd.effective_lr.Formula` of ``optimizer``'s class (or of the nearest
    registered base class), with that class; ``None`` where none is known.

    Example::

        >>> import torch
        >>> cls, formula = formula_for(torch.optim.AdamW([torch.zeros(1)]))
        >>> cls.__name__, formula.spec.__name__
        ('AdamW', 'adam_rate')
    """
    rule, cls = rule_for(optimizer)
    return None if cls is None or rule.effective_lr is None else (cls, rule.effective_lr)


def switch(key: str, when_true: str | None, when_false: str | None, default: bool = False
           ) -> Callable[[Optimizer, Group], str | None]:
    """An ``own`` rule chosen by one boolean group key (missing: ``default``)."""
    return lambda optimizer, group: when_true if group.get(key, default) else when_false
