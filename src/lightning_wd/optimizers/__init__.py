"""The per-optimizer registry: one entry per optimizer class, in one module per family of optimizers."""

from lightning_wd.optimizers import torch_optim  # noqa: F401  (registers torch.optim's optimizers)
from lightning_wd.optimizers.registry import (
    RULES,
    UNKNOWN,
    OptimizerRule,
    always,
    group_lr,
    register_optimizer,
    registered,
    rule_for,
)

__all__ = ["RULES", "UNKNOWN", "OptimizerRule", "always", "group_lr", "register_optimizer", "registered", "rule_for"]
