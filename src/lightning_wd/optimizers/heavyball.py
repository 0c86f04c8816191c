"""heavyball (3.x): ``p = p*(1 - lr*wd) - lr*u``, fused with its update, where the lr ramps up over its own
``warmup_steps`` (only without a warm-up is its step size the group's lr); no L2 of its own."""

from __future__ import annotations

from torch.optim import Optimizer

from lightning_wd.optimizers.registry import Group, OptimizerRule, register_optimizer


def _own(optimizer: Optimizer, group: Group) -> str | None:
    return None if group.get("cautious_weight_decay", False) else "decoupled"


def _step_size(optimizer: Optimizer, group: Group):
    return group["lr"] if not group.get("warmup_steps", 0) else None


for _name in ("AdamW", "SGD"):
    register_optimizer(f"heavyball.{_name}", OptimizerRule(
        own=_own, step_size=_step_size,
        description="`p = p*(1 - lr*wd) - lr*u`, fused with the update (lr ramped by its own warm-up)"))
