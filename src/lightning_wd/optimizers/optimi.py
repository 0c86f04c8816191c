"""torch-optimi (0.3): its optimizers decay as the group's switches say: L2 in place on ``p.grad``,
``decouple_wd=True`` ``p *= 1 - lr*wd`` before the update, ``decouple_lr=True`` ``p *= 1 - (lr/max_lr)*wd`` (fully
decoupled: ``mode="independent"`` with ``lr_max = max_lr``, which optimi sets to the constructor lr by default).

``gradient_release=True`` steps each parameter from its own backward hook (``step(param=p)``): a decay taken over per
step would be applied once per parameter, so it is refused."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.optimizers.directions import lion_direction
from lightning_wd.optimizers.registry import Equilibrium, Group, OptimizerRule, non_default, register_optimizer
from lightning_wd.rates import PLAIN_LR, SIGN_UPDATE, Formula, RateSpec, root_rate

DECOUPLE_WD = {"decoupled": {"decouple_wd": True, "decouple_lr": False},
               "coupled": {"decouple_wd": False, "decouple_lr": False}}
ALWAYS_DECOUPLED = {"decoupled": {"decouple_lr": False}}
OWN = "L2 in place (`decouple_wd`: `p *= 1 - lr*wd`; `decouple_lr`: `p *= 1 - (lr/max_lr)*wd`), before the update"


def debiased_adam_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``lr / (sqrt(v) + eps)``: torch-optimi's Adam and AdamW, whose debiased betas keep ``exp_avg`` and
    ``exp_avg_sq`` unbiased already; the factor of ``exp_avg`` in their update."""
    if "exp_avg_sq" not in state:
        return None
    return root_rate(state["exp_avg_sq"], group["lr"], group["eps"])


def _max_lr(optimizer: Optimizer, group: Group) -> float | None:
    return group.get("max_lr") if group.get("decouple_lr", False) else None


def _rule(optimizer: Optimizer, group: Group) -> str:
    if group.get("decouple_lr", False):
        return "independent"
    return "decoupled" if group.get("decouple_wd", False) else "coupled"


def _decoupled_only(optimizer: Optimizer, group: Group) -> str:
    return "independent" if group.get("decouple_lr", False) else "decoupled"


def _gradient_release(optimizer: Optimizer, group: Group, rule: str) -> str | None:
    if group.get("gradient_release", False):
        return ("with gradient_release=True optimi steps each parameter from its backward hook, so a decay taken over"
                " per step would be applied once per parameter; use its own weight_decay without WeightDecay")
    return None


def _register(path: str, **kw: Any) -> None:
    register_optimizer(f"optimi.{path}", OptimizerRule(reference_lr=_max_lr, refuse=_gradient_release, **kw))


ADAM = lambda optimizer, group: Equilibrium("adam")  # noqa: E731
for _path, _formula in (("adam.Adam", Formula(debiased_adam_rate)), ("sgd.SGD", PLAIN_LR), ("radam.RAdam", None)):
    _register(_path, own=_rule, switches=DECOUPLE_WD, description=OWN, effective_lr=_formula,
              chosen_switch=non_default(decouple_wd=False, decouple_lr=False))
_register("ranger.Ranger", own=_rule, switches=DECOUPLE_WD,
          chosen_switch=non_default(decouple_wd=True, decouple_lr=False),
          exact_generic=lambda g: not (g.get("decouple_wd", True) or g.get("decouple_lr", False)),  # Lookahead copy
          description=f"{OWN}; its Lookahead copy is taken inside its first step, after the decay")
_register("adamw.AdamW", own=_decoupled_only, switches=ALWAYS_DECOUPLED, chosen_switch=non_default(decouple_lr=False),
          effective_lr=Formula(debiased_adam_rate), equilibrium=ADAM,
          description="`p *= 1 - lr*wd` before the update (`decouple_lr`: `p *= 1 - (lr/max_lr)*wd`)")
_register("lion.Lion", own=_decoupled_only, switches=ALWAYS_DECOUPLED, chosen_switch=non_default(decouple_lr=False),
          update_direction=lion_direction, effective_lr=SIGN_UPDATE,
          equilibrium=lambda o, g: Equilibrium("lion"),
          description="`p *= 1 - lr*wd` before the update (`decouple_lr`: `p *= 1 - (lr/max_lr)*wd`)")
# its decay is scaled by 1 / RMS of its update, known only inside its step: no step size outside it, and its
# `decouple_lr` rule is none of ours (the ratio lr/max_lr times that factor)
_register("stableadamw.StableAdamW", own=lambda o, g: None if g.get("decouple_lr", False) else "decoupled",
          switches=ALWAYS_DECOUPLED, chosen_switch=non_default(decouple_lr=False), step_size=None,
          exact_generic=False,
          description="`p *= 1 - (lr/max(1, RMS))*wd` with its update RMS, before the update")
_register("adan.Adan", own=_decoupled_only, exact_generic=False,
          description="proximal `p /= 1 + lr*wd` after the update (its `adam_wd=True` is ignored by its step)")
