"""schedulefree (1.4): schedule-free optimizers keep two sequences, the weights ``y`` (in ``p`` while training) and
``z``; their own decay ``wd*y`` enters the normalized gradient and moves both. A decay of ``p`` before the step
would not reach ``z``, so only their own decay (``mode="decoupled"``) and L2 (``mode="coupled"``) are offered."""

from __future__ import annotations

from lightning_wd.effective_lr import Formula, schedulefree_adamw_rate
from lightning_wd.optimizers.registry import OptimizerRule, register_optimizer

_Z = ("a schedule-free optimizer follows a second sequence z that a decay of the weights (y) before its step does"
      " not reach; use mode='decoupled' (its own decay) without exclusions, or mode='coupled'")


def _refuse_decay_of_y(optimizer, group, rule: str) -> str | None:
    return None if rule == "coupled" else _Z


for _path in ("adamw_schedulefree.AdamWScheduleFree", "radam_schedulefree.RAdamScheduleFree",
              "adamw_schedulefree_closure.AdamWScheduleFreeClosure",
              "radam_schedulefree_closure.RAdamScheduleFreeClosure"):
    register_optimizer(f"schedulefree.{_path}", OptimizerRule(
        own="decoupled", exact_generic=False, generic_refusal=_refuse_decay_of_y,
        effective_lr=Formula(schedulefree_adamw_rate) if _path.startswith("adamw_schedulefree.") else None,
        description="`wd*y` added to the normalized gradient, moving both y and z (ramped by its warm-up)"))
register_optimizer("schedulefree.adamw_schedulefree_reference.AdamWScheduleFreeReference", OptimizerRule(
    own="decoupled", exact_generic=False, generic_refusal=_refuse_decay_of_y,
    description="`z -= lr*wd*y` before its z step"))
for _path in ("sgd_schedulefree.SGDScheduleFree", "sgd_schedulefree_closure.SGDScheduleFreeClosure",
              "sgd_schedulefree_reference.SGDScheduleFreeReference"):
    register_optimizer(f"schedulefree.{_path}", OptimizerRule(
        own="coupled", generic_refusal=_refuse_decay_of_y, description="L2 at y (`g += wd*y`)"))
