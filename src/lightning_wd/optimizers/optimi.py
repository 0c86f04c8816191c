"""torch-optimi (0.3): its optimizers decay as the group's switches say: L2 in place on ``p.grad``,
``decouple_wd=True`` ``p *= 1 - lr*wd`` before the update, ``decouple_lr=True`` ``p *= 1 - (lr/max_lr)*wd`` (fully
decoupled: ``mode="independent"`` with ``lr_max = max_lr``, which optimi sets to the constructor lr by default)."""

from __future__ import annotations

from torch.optim import Optimizer

from lightning_wd.effective_lr import PLAIN_LR, SIGN_UPDATE, Formula, debiased_adam_rate
from lightning_wd.optimizers.directions import lion_direction
from lightning_wd.optimizers.registry import Group, OptimizerRule, register_optimizer

DECOUPLE_WD = {"decoupled": {"decouple_wd": True, "decouple_lr": False},
               "coupled": {"decouple_wd": False, "decouple_lr": False}}
ALWAYS_DECOUPLED = {"decoupled": {"decouple_lr": False}}
OWN = "L2 in place (`decouple_wd`: `p *= 1 - lr*wd`; `decouple_lr`: `p *= 1 - (lr/max_lr)*wd`), before the update"


def _max_lr(optimizer: Optimizer, group: Group) -> float | None:
    return group.get("max_lr") if group.get("decouple_lr", False) else None


def _rule(optimizer: Optimizer, group: Group) -> str:
    if group.get("decouple_lr", False):
        return "independent"
    return "decoupled" if group.get("decouple_wd", False) else "coupled"


def _decoupled_only(optimizer: Optimizer, group: Group) -> str:
    return "independent" if group.get("decouple_lr", False) else "decoupled"


_FORMULAS = {"adam.Adam": Formula(debiased_adam_rate),
             "sgd.SGD": PLAIN_LR}
for _path in ("adam.Adam", "sgd.SGD", "radam.RAdam"):
    register_optimizer(f"optimi.{_path}", OptimizerRule(own=_rule, switches=DECOUPLE_WD, reference_lr=_max_lr,
                                                        description=OWN, effective_lr=_FORMULAS.get(_path)))
register_optimizer("optimi.ranger.Ranger", OptimizerRule(
    own=_rule, switches=DECOUPLE_WD, reference_lr=_max_lr,
    exact_generic=lambda g: not (g.get("decouple_wd", True) or g.get("decouple_lr", False)),  # its Lookahead copy
    description=f"{OWN}; its Lookahead copy is taken inside its first step, after the decay"))
for _path in ("adamw.AdamW", "lion.Lion"):
    register_optimizer(f"optimi.{_path}", OptimizerRule(
        own=_decoupled_only, switches=ALWAYS_DECOUPLED, reference_lr=_max_lr,
        update_direction=lion_direction if _path == "lion.Lion" else None,
        effective_lr=SIGN_UPDATE if _path == "lion.Lion" else Formula(debiased_adam_rate),
        description="`p *= 1 - lr*wd` before the update (`decouple_lr`: `p *= 1 - (lr/max_lr)*wd`)"))
register_optimizer("optimi.stableadamw.StableAdamW", OptimizerRule(
    own=_decoupled_only, switches=ALWAYS_DECOUPLED, reference_lr=_max_lr, exact_generic=False,
    description="`p *= 1 - (lr/max(1, RMS))*wd` with its update RMS, before the update"))
register_optimizer("optimi.adan.Adan", OptimizerRule(
    own=_decoupled_only, reference_lr=_max_lr, exact_generic=False,
    description="proximal `p /= 1 + lr*wd` after the update (its `adam_wd=True` is ignored by its step)"))
