"""transformers' Adafactor (5.x; transformers ships no AdamW any more): ``p -= wd*lr_t*p`` before the update, with
``lr_t`` its relative step (``relative_step=True``, the default: ``min(1e-2, 1/sqrt(t))``) times ``max(eps2, RMS(p))``
(``scale_parameter=True``, the default): only with both off is its step size the group's lr."""

from __future__ import annotations

from torch.optim import Optimizer

from lightning_wd.optimizers.registry import Group, OptimizerRule, register_optimizer


def _plain_lr(group: Group) -> bool:
    return not group.get("relative_step", True) and not group.get("scale_parameter", True)


def _step_size(optimizer: Optimizer, group: Group):
    return group["lr"] if _plain_lr(group) else None


register_optimizer("transformers.optimization.Adafactor", OptimizerRule(
    own="decoupled", step_size=_step_size, exact_generic=_plain_lr,
    description="`p -= wd*lr_t*p` before the update; lr_t = its relative step times RMS(p) by default",
))
