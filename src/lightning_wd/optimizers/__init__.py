"""The per-optimizer registry: one entry per optimizer class, in one module per family of optimizers.

The family modules only register import paths (no optimizer package is imported); :func:`rule_for` finds the entry
of an optimizer's class. See :mod:`lightning_wd.optimizers.registry` for what an entry says.
"""

from lightning_wd.optimizers import (  # noqa: F401  (each registers its family's optimizers)
    adaptive_lr,
    heavyball,
    low_bit,
    optimi,
    pytorch_optimizer,
    schedulefree,
    timm,
    torch_optim,
    transformers,
)
from lightning_wd.optimizers.registry import (
    UNKNOWN,
    Equilibrium,
    OptimizerRule,
    always,
    formula_for,
    group_lr,
    non_default,
    register_optimizer,
    rule_for,
    switch,
)

__all__ = [
    "UNKNOWN",
    "Equilibrium",
    "OptimizerRule",
    "always",
    "formula_for",
    "group_lr",
    "non_default",
    "register_optimizer",
    "rule_for",
    "switch",
]
