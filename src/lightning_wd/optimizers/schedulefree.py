"""schedulefree (1.4): schedule-free optimizers keep two sequences, the weights ``y`` (in ``p`` while training) and
``z``; their own decay ``wd*y`` enters the normalized gradient and moves both, with the lr ramped by their warm-up
(``warmup_steps``). A decay of ``p`` before the step would not reach ``z``, so only their own decay
(``mode="decoupled"``) and L2 (``mode="coupled"``) are offered. Its ``ScheduleFreeWrapper`` (not a torch optimizer)
steps an inner optimizer at ``z``, which the decay and the monitors attach to."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.optimizers.registry import Group, OptimizerRule, non_default, register_optimizer
from lightning_wd.rates import Formula, RateSpec, bias_correction, root_rate

_Z = ("a schedule-free optimizer follows a second sequence z that a decay of the weights (y) before its step does"
      " not reach; use mode='decoupled' (its own decay) without exclusions, or mode='coupled'")


def schedulefree_adamw_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None
                            ) -> RateSpec | None:
    """``lr_t / (sqrt(v / (1 - beta2^k)) + eps)``: AdamWScheduleFree, the factor of the gradient in the step of its
    ``z`` sequence (``lr_t`` = ``group["scheduled_lr"]``, the lr with its warm-up; ``k`` the steps taken). The
    weights the model sees (``y``) and evaluates (``x``) are averages of ``z``: they move by a fraction of it."""
    if "exp_avg_sq" not in state or "scheduled_lr" not in group:
        return None
    root_bc2 = math.sqrt(bias_correction(group["betas"][1], group["k"]))
    return root_rate(state["exp_avg_sq"], group["scheduled_lr"] * root_bc2, group["eps"] * root_bc2)


def _refuse_decay_of_y(optimizer: Optimizer, group: Group, rule: str) -> str | None:
    return None if rule == "coupled" else _Z


def _warmed_up_lr(optimizer: Optimizer, group: Group) -> Any:
    """The lr of the coming step ``k + 1``, ramped by the warm-up: what its decay is scaled by."""
    warmup = group.get("warmup_steps", 0)
    return group["lr"] * min(1.0, (group["k"] + 1) / warmup) if warmup else group["lr"]


for _path in ("adamw_schedulefree.AdamWScheduleFree", "radam_schedulefree.RAdamScheduleFree",
              "adamw_schedulefree_closure.AdamWScheduleFreeClosure",
              "radam_schedulefree_closure.RAdamScheduleFreeClosure"):
    register_optimizer(f"schedulefree.{_path}", OptimizerRule(
        own="decoupled", exact_generic=False, generic_refusal=_refuse_decay_of_y, step_size=_warmed_up_lr,
        effective_lr=Formula(schedulefree_adamw_rate) if _path.startswith("adamw_schedulefree.") else None,
        description="`wd*y` added to the normalized gradient, moving both y and z (ramped by its warm-up)"))
register_optimizer("schedulefree.adamw_schedulefree_reference.AdamWScheduleFreeReference", OptimizerRule(
    own=lambda o, g: None if g.get("decay_at_z", False) else "decoupled",  # decay_at_z: `z -= lr*wd*z`
    chosen_switch=non_default(decay_at_z=False), exact_generic=False, generic_refusal=_refuse_decay_of_y,
    step_size=_warmed_up_lr, description="`z -= lr*wd*y` before its z step"))
for _path in ("sgd_schedulefree.SGDScheduleFree", "sgd_schedulefree_closure.SGDScheduleFreeClosure",
              "sgd_schedulefree_reference.SGDScheduleFreeReference"):
    register_optimizer(f"schedulefree.{_path}", OptimizerRule(
        own="coupled", generic_refusal=_refuse_decay_of_y, description="L2 at y (`g += wd*y`)"))
for _path in ("wrap_schedulefree.ScheduleFreeWrapper", "wrap_schedulefree_reference.ScheduleFreeWrapperReference"):
    register_optimizer(f"schedulefree.{_path}", OptimizerRule(
        inner=lambda o: o.base, description="a wrapper: steps the optimizer in `base` at z"))
