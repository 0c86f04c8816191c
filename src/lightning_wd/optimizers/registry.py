"""What lightning_wd knows about each optimizer class, in one entry per class: how it applies its own
``weight_decay`` and which switches of its param groups select the rule, what its decay is scaled by (per group and
per parameter), what it cannot do, the sign of its update (cautious decay), its effective learning rate
(:class:`~lightning_wd.EffectiveLRMonitor`), the form of its update that rotational equilibrium predicts a weight norm
for (:class:`~lightning_wd.WeightNormMonitor`), and, for a wrapper, the optimizer it wraps.

The decay engine and the monitors are its readers; none of them asks ``isinstance`` or reads an optimizer's private
keys itself. Entries are keyed by import path (``"torch.optim.Adam"``) and resolved only once their package has been
imported, so this module imports no optimizer package. A user (or another library) declares an optimizer in a few
lines::

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
from typing import Any, Literal, NamedTuple, Union

from torch import Tensor
from torch.optim import Optimizer

from lightning_wd._types import Group, Scalar
from lightning_wd.modes import MODES
from lightning_wd.rates import Formula

GroupTest = Callable[[Group], bool]
Refusal = Callable[[Optimizer, Group, str], Union[str, None]]
StepSize = Callable[[Optimizer, Group], Union[Scalar, None]]

__all__ = [
    "Equilibrium",
    "OptimizerRule",
    "UNKNOWN",
    "always",
    "formula_for",
    "group_lr",
    "non_default",
    "switch",
    "register_optimizer",
    "rule_for",
]


def group_lr(optimizer: Optimizer, group: Group) -> Scalar:
    """The step size most optimizers' decoupled decay multiplies: the group's current lr (the default
    ``step_size``, also spelled ``"lr"``)."""
    return group["lr"]


def always(reason: str) -> Refusal:
    """A refusal that holds for every group and rule."""
    return lambda optimizer, group, rule: reason


def switch(key: str, when_true: str | None, when_false: str | None, default: bool = False
           ) -> Callable[[Optimizer, Group], str | None]:
    """An ``own`` rule chosen by one boolean group key (missing: ``default``)."""
    return lambda optimizer, group: when_true if group.get(key, default) else when_false


def non_default(**defaults: Any) -> Callable[[Optimizer, Group], str | None]:
    """A ``chosen_switch``: the group keys among ``defaults`` that the user set to another value than the class's
    default, as ``"key=value"`` (``None`` where all are at their default)."""

    def chosen(optimizer: Optimizer, group: Group) -> str | None:
        changed = [f"{k}={group[k]!r}" for k, v in defaults.items() if k in group and group[k] != v]
        return ", ".join(changed) or None

    return chosen


class Equilibrium(NamedTuple):
    """The update form of rotational equilibrium (:mod:`lightning_wd.weight_norm`): ``"adam"`` (``m_hat /
    sqrt(v_hat)``, per-element RMS about 1), ``"lion"`` (a sign, RMS exactly 1) or ``"sgdm"`` (SGD's momentum
    buffer, with its ``momentum`` and ``dampening``)."""

    kind: Literal["adam", "lion", "sgdm"]
    momentum: float = 0.0
    dampening: float = 0.0


def _check_callable(name: str, value: Any, allowed: tuple = (None,)) -> None:
    if callable(value) or any(value is a or (isinstance(a, str) and value == a) for a in allowed):
        return
    raise TypeError(f"OptimizerRule `{name}` must be a function{' or None' if None in allowed else ''}, got {value!r}.")


@dataclass(frozen=True)
class OptimizerRule:
    """How one optimizer class applies its param groups' ``weight_decay``, and what else the library reads of it.

    Args:
        own: the rule its own ``weight_decay`` implements for a group as configured: ``"coupled"`` (``g += wd*p``
            before the update), ``"decoupled"`` (a decay of the weights outside the gradient, scaled by its step
            size), ``"independent"`` or ``"corrected"`` (against its own reference lr, see ``reference_lr``), or
            ``None`` for none of these (a rule of its own, or no ``weight_decay`` at all). A function gets the
            optimizer and the param group and returns one of these, for optimizers with switches.
        switches: for each rule the group settings under which its own decay is that rule, e.g.
            ``{"decoupled": {"decoupled_weight_decay": True}, "coupled": {"decoupled_weight_decay": False}}``. The
            engine sets them for the duration of a step (native handoff) and puts the user's values back after it.
        step_size: what its decoupled decay multiplies ``wd`` by: ``"lr"`` (the group's current lr, the default), or
            a function of the optimizer and the group (``d * lr`` for Prodigy); the generic pass uses it. ``None``
            (or a ``None`` result): not knowable before the step (a relative step size): the generic decoupled pass
            is refused.
        param_step_factor: where its decay's step size differs per parameter, a function ``(optimizer, group,
            param) -> factor`` of the group's ``step_size`` (timm's Mars: ``lr_1d_factor`` for 1-D parameters), so
            that the generic pass decays each parameter as its own rule would.
        exact_generic: whether the generic pass (``weight_decay`` set to 0 for the step, ``p *= 1 - step_size*wd``
            or ``g += wd*p`` applied before it) reproduces its own decay: the same rule at the same point, up to
            rounding. ``False`` where its own decay sits elsewhere (after the update, between computations that
            read ``p``): where it must be given its own rule but the generic pass is needed (exclusions, cautious
            decay, ``native=False``), the engine refuses. A function gets the group.
        reference_lr: the reference lr its own ``"independent"``/``"corrected"`` decay divides by (optimi's
            ``max_lr``, timm's ``max_lr_snapshot``), as a function of the optimizer and the group, returning ``None``
            where its own rule uses none; it is a default ``lr_max`` of those modes (after a scheduler's recorded
            peak, :mod:`lightning_wd.lr_reference`), and native handoff needs the two to agree.
        chosen_switch: the switches a user set to select a decay rule other than the class's default, in words
            (``"decouple_lr=True"``), or ``None``: a mode that replaces such a rule warns, naming it.
        refuse: ``(optimizer, group, rule) -> reason or None``: why no path can give the group ``rule`` (LBFGS).
        generic_refusal: ``(optimizer, group, rule) -> reason or None``: what else ``weight_decay`` does in it, or
            what breaks, when the generic pass is used (a trust ratio switched on by ``weight_decay != 0``; an
            in-place decay before a Hessian-vector product); native handoff stays allowed.
        update_direction: for cautious decay, a function ``(optimizer, group, param, grad) -> direction`` where
            ``direction(start, stop)`` gives this step's update direction (its sign is what matters) for the
            flattened elements ``[start, stop)``, computed before the step from the state and the gradient; ``None``
            (or a ``None`` result) where the sign of the update cannot be known before the step.
        effective_lr: what :class:`lightning_wd.EffectiveLRMonitor` reads: a
            :class:`lightning_wd.rates.Formula` (the function that makes a parameter's rate from its state, or
            the reason why the optimizer has no per-element rate); ``None``: not known.
        equilibrium: the :class:`Equilibrium` form of its update for a group (a function of the optimizer and the
            group, ``None`` where the paper's forms do not apply, e.g. AMSGrad), for the equilibrium norm of
            :class:`lightning_wd.WeightNormMonitor`; ``None``: none.
        inner: for a wrapper that steps another optimizer (Lookahead), a function returning the wrapped optimizer,
            which the decay and the monitors attach to instead.
        description: its own rule in words, for the compatibility table and messages.

    Raises:
        TypeError: for a field of the wrong type. ValueError: for a rule name that is not one of the modes.
    """

    own: str | None | Callable[[Optimizer, Group], str | None] = None
    switches: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    step_size: StepSize | Literal["lr"] | None = "lr"
    param_step_factor: Callable[[Optimizer, Group, Tensor], float] | None = None
    exact_generic: bool | GroupTest = True
    reference_lr: Callable[[Optimizer, Group], float | None] | None = None
    chosen_switch: Callable[[Optimizer, Group], str | None] | None = None
    refuse: Refusal | None = None
    generic_refusal: Refusal | None = None
    update_direction: Callable[[Optimizer, Group, Tensor, Tensor], Callable[[int, int], Tensor] | None] | None = None
    effective_lr: Formula | None = None
    equilibrium: Callable[[Optimizer, Group], Equilibrium | None] | None = None
    inner: Callable[[Optimizer], Optimizer] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.step_size is group_lr:
            object.__setattr__(self, "step_size", "lr")
        if isinstance(self.own, str) and self.own not in MODES:
            raise ValueError(f"OptimizerRule `own` must be one of {', '.join(map(repr, MODES))}, None or a function,"
                             f" got {self.own!r}.")
        _check_callable("own", self.own, (None, *MODES))
        if not isinstance(self.switches, Mapping) or any(
            k not in MODES or not isinstance(v, Mapping) for k, v in self.switches.items()
        ):
            raise TypeError(f"OptimizerRule `switches` must map modes ({', '.join(MODES)}) to group settings (dicts),"
                            f" got {self.switches!r}.")
        _check_callable("step_size", self.step_size, (None, "lr"))
        _check_callable("exact_generic", self.exact_generic, (True, False))
        for name in ("param_step_factor", "reference_lr", "chosen_switch", "refuse", "generic_refusal",
                     "update_direction", "equilibrium", "inner"):
            _check_callable(name, getattr(self, name))
        if self.effective_lr is not None and not isinstance(self.effective_lr, Formula):
            raise TypeError(f"OptimizerRule `effective_lr` must be a lightning_wd.rates.Formula or None, got"
                            f" {self.effective_lr!r}.")
        if not isinstance(self.description, str):
            raise TypeError(f"OptimizerRule `description` must be a string, got {self.description!r}.")

    def own_rule(self, optimizer: Optimizer, group: Group) -> str | None:
        return self.own(optimizer, group) if callable(self.own) else self.own

    def generic_is_exact(self, group: Group) -> bool:
        return self.exact_generic(group) if callable(self.exact_generic) else self.exact_generic

    def group_step_size(self, optimizer: Optimizer, group: Group) -> Scalar | None:
        """What its decoupled decay multiplies ``wd`` by for ``group``, or ``None`` where that is not known."""
        if self.step_size is None:
            return None
        return group["lr"] if self.step_size == "lr" else self.step_size(optimizer, group)

    def own_lr_max(self, optimizer: Optimizer, group: Group) -> float | None:
        return self.reference_lr(optimizer, group) if self.reference_lr is not None else None

    def form(self, optimizer: Optimizer, group: Group) -> Equilibrium | None:
        return self.equilibrium(optimizer, group) if self.equilibrium is not None else None


#: the rule assumed for a class nobody registered: its ``weight_decay`` only adds a decay, its step size is ``lr``
UNKNOWN = OptimizerRule(own=None, description="unknown")

_BY_PATH: dict[str, OptimizerRule] = {}
_BY_CLASS: dict[type, OptimizerRule] = {}
_UNRESOLVED: set[str] = set()


def register_optimizer(cls: type | str, rule: OptimizerRule) -> None:
    """Declare how ``cls`` (a class, or its import path such as ``"pytorch_optimizer.Lion"``) applies its decay.

    A later registration of the same class replaces the earlier one, so a user can correct an entry.

    Raises:
        TypeError: if ``cls`` is neither a class nor an import path, or ``rule`` is not an :class:`OptimizerRule`.
    """
    if not isinstance(rule, OptimizerRule):
        raise TypeError(f"`rule` must be an OptimizerRule, got {rule!r}.")
    if isinstance(cls, str):
        module, _, name = cls.rpartition(".")
        if not module or not name or not all(part.isidentifier() for part in cls.split(".")):
            raise TypeError(f"`cls` must be a class or its import path 'package.module.Name', got {cls!r}.")
        _BY_PATH[cls] = rule
        _UNRESOLVED.add(cls)
    elif isinstance(cls, type):
        _BY_CLASS[cls] = rule
    else:
        raise TypeError(f"`cls` must be a class or its import path 'package.module.Name', got {cls!r}.")


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
        if isinstance(obj, type):
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


def formula_for(optimizer: Optimizer | type) -> tuple[type, Formula] | None:
    """The effective-lr :class:`~lightning_wd.rates.Formula` of ``optimizer``'s class (or of the nearest
    registered base class), with that class; ``None`` where none is known.

    Example::

        >>> import torch
        >>> cls, formula = formula_for(torch.optim.AdamW([torch.zeros(1)]))
        >>> cls.__name__, formula.spec.__name__
        ('AdamW', 'adam_rate')
    """
    rule, cls = rule_for(optimizer)
    return None if cls is None or rule.effective_lr is None else (cls, rule.effective_lr)
