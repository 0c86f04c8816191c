"""Learning-rate-free optimizers: lion-pytorch's Lion, Prodigy (prodigyopt) and D-Adaptation (dadaptation).

Prodigy and D-Adaptation run at lr=1 and scale their step, and their decoupled decay, by an estimate ``d`` kept in
each group (``group["d"]``): their step size is ``d`` times the *largest* lr of the optimizer's groups (``dlr``,
computed once per step from the first group's betas and step count), not ``d`` times the group's own lr.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.optimizers.directions import lion_direction
from lightning_wd.optimizers.registry import (
    Equilibrium,
    Group,
    OptimizerRule,
    Scalar,
    non_default,
    register_optimizer,
    switch,
)
from lightning_wd.rates import SIGN_UPDATE, Formula, RateSpec, root_rate

LION = lambda optimizer, group: Equilibrium("lion")  # noqa: E731


def _lion_pytorch_rule(optimizer: Optimizer, group: Group) -> str:
    # decoupled_weight_decay=True divides wd by the constructor lr: `p *= 1 - (lr/init_lr)*wd`
    return "independent" if getattr(optimizer, "decoupled_wd", False) else "decoupled"


register_optimizer("lion_pytorch.lion_pytorch.Lion", OptimizerRule(
    own=_lion_pytorch_rule,
    # its reference lr is the constructor's, and only its `decoupled_weight_decay=True` rule measures against it
    reference_lr=lambda o, g: getattr(o, "_init_lr", None) if getattr(o, "decoupled_wd", False) else None,
    chosen_switch=lambda o, g: "decoupled_weight_decay=True" if getattr(o, "decoupled_wd", False) else None,
    update_direction=lion_direction,
    effective_lr=SIGN_UPDATE,
    equilibrium=LION,
    description="`p *= 1 - lr*wd` before the update (`decoupled_weight_decay=True`: `p *= 1 - (lr/init_lr)*wd`)",
))


def _d_lr(bias_correction_key: str):
    """``d * max(lr) * bias_correction`` with ``d`` before its update, the first group's betas and the coming step
    ``k + 1``, as their step computes ``dlr`` once for every group."""

    def step_size(optimizer: Optimizer, group: Group) -> Scalar:
        first = optimizer.param_groups[0]
        factor = 1.0
        if first.get(bias_correction_key, False):
            beta1, beta2 = first["betas"]
            k = first["k"] + 1
            factor = math.sqrt(1 - beta2**k) / (1 - beta1**k)
        return group["d"] * max(g["lr"] for g in optimizer.param_groups) * factor

    return step_size


def prodigy_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``d * lr * bc / (sqrt(v) + d * eps)``: prodigyopt's Prodigy, the factor of ``exp_avg`` (an EMA of ``d * g``)
    in its update, with ``bc = sqrt(1 - beta2^k) / (1 - beta1^k)`` under ``use_bias_correction``.

    ``d`` is the group's estimate after the step. The step itself multiplied by the estimate from before its update
    (and added ``d * eps`` with the new one), so while ``d`` still grows the rate logged is the coming step's; once
    ``d`` has settled, the two are the same."""
    if "exp_avg_sq" not in state or group["betas"][0] == 0:
        return None
    d = group["d"]
    bc = 1.0
    if group.get("use_bias_correction", False):
        beta1, beta2 = group["betas"]
        bc = math.sqrt(1 - beta2 ** group["k"]) / (1 - beta1 ** group["k"])
    return root_rate(state["exp_avg_sq"], d * group["lr"] * bc, d * group["eps"])


register_optimizer("prodigyopt.prodigy.Prodigy", OptimizerRule(
    own=switch("decouple", "decoupled", "coupled", True),
    switches={"decoupled": {"decouple": True}, "coupled": {"decouple": False}},
    chosen_switch=non_default(decouple=True),
    step_size=_d_lr("use_bias_correction"),
    exact_generic=lambda g: not g.get("decouple", True),  # its d update reads p before its own decay
    effective_lr=Formula(prodigy_rate),
    description="`p -= d*lr*wd*p` after its d update, before the update (`decouple=False`: L2 in place)",
))
register_optimizer("dadaptation.dadapt_adam.DAdaptAdam", OptimizerRule(
    own=switch("decouple", "decoupled", "coupled"),
    switches={"decoupled": {"decouple": True}, "coupled": {"decouple": False}},
    chosen_switch=non_default(decouple=False),
    step_size=_d_lr("use_bias_correction"),
    description="L2 in place (`decouple=True`: `p -= d*lr*wd*p` before the update)",
))
register_optimizer("dadaptation.dadapt_lion.DAdaptLion", OptimizerRule(
    own="decoupled", step_size=lambda o, g: g["d"] * max(x["lr"] for x in o.param_groups),
    description="`p *= 1 - d*lr*wd` before the update (its docstring says L2; the code is decoupled)",
))
_DUAL_AVERAGING = ("{} sets the weights from their initial value and its gradient sum (dual averaging), so a decay of"
                   " the weights before its step is undone")


def _groups_disagree(optimizer: Optimizer, group: Group, rule: str) -> str | None:
    first = optimizer.param_groups[0].get("weight_decay")
    if any(g.get("weight_decay") != first for g in optimizer.param_groups):
        return ("DAdaptSGD applies the first param group's weight_decay to every group, so groups with other decays"
                " do not get theirs; give every group the same weight_decay")
    return None


register_optimizer("dadaptation.dadapt_sgd.DAdaptSGD", OptimizerRule(
    own="coupled", step_size=None, exact_generic=False, refuse=_groups_disagree,
    generic_refusal=lambda o, g, rule: None if rule == "coupled" else _DUAL_AVERAGING.format("DAdaptSGD"),
    description="L2 in place at every step (its first-gradient norm leaves it out), with the first group's"
                " weight_decay for every group",
))
register_optimizer("dadaptation.dadapt_adagrad.DAdaptAdaGrad", OptimizerRule(
    own="coupled", step_size=None,
    generic_refusal=lambda o, g, rule: None if rule == "coupled" else _DUAL_AVERAGING.format("DAdaptAdaGrad"),
    description="L2 in place (dense gradients only)",
))
