"""Learning-rate-free optimizers: lion-pytorch's Lion, Prodigy (prodigyopt) and D-Adaptation (dadaptation).

Prodigy and D-Adaptation run at lr=1 and scale their step, and their decoupled decay, by an estimate ``d`` kept in
each group (``group["d"]``): their step size is ``d * lr`` (times a bias correction where asked), not ``lr``.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from lightning_wd.effective_lr import SIGN_UPDATE, Formula, prodigy_rate
from lightning_wd.optimizers.directions import lion_direction
from lightning_wd.optimizers.registry import Group, OptimizerRule, Scalar, register_optimizer, switch


def _lion_pytorch_rule(optimizer: Optimizer, group: Group) -> str:
    # decoupled_weight_decay=True divides wd by the constructor lr: `p *= 1 - (lr/init_lr)*wd`
    return "independent" if getattr(optimizer, "decoupled_wd", False) else "decoupled"


register_optimizer("lion_pytorch.lion_pytorch.Lion", OptimizerRule(
    own=_lion_pytorch_rule,
    reference_lr=lambda optimizer, group: getattr(optimizer, "_init_lr", None),
    update_direction=lion_direction,
    effective_lr=SIGN_UPDATE,
    description="`p *= 1 - lr*wd` before the update (`decoupled_weight_decay=True`: `p *= 1 - (lr/init_lr)*wd`)",
))


def _d_lr(bias_correction_key: str):
    """``d * lr * bias_correction`` with ``d`` before its update and the coming step ``k + 1``."""

    def step_size(optimizer: Optimizer, group: Group) -> Scalar:
        factor = 1.0
        if group.get(bias_correction_key, False):
            beta1, beta2 = group["betas"]
            k = group["k"] + 1
            factor = math.sqrt(1 - beta2**k) / (1 - beta1**k)
        return group["d"] * group["lr"] * factor

    return step_size


register_optimizer("prodigyopt.prodigy.Prodigy", OptimizerRule(
    own=switch("decouple", "decoupled", "coupled", True),
    switches={"decoupled": {"decouple": True}, "coupled": {"decouple": False}},
    step_size=_d_lr("use_bias_correction"),
    exact_generic=lambda g: not g.get("decouple", True),  # its d update reads p before its own decay
    effective_lr=Formula(prodigy_rate),
    description="`p -= d*lr*wd*p` after its d update, before the update (`decouple=False`: L2 in place)",
))
register_optimizer("dadaptation.dadapt_adam.DAdaptAdam", OptimizerRule(
    own=switch("decouple", "decoupled", "coupled"),
    switches={"decoupled": {"decouple": True}, "coupled": {"decouple": False}},
    step_size=_d_lr("use_bias_correction"),
    description="L2 in place (`decouple=True`: `p -= d*lr*wd*p` before the update)",
))
register_optimizer("dadaptation.dadapt_lion.DAdaptLion", OptimizerRule(
    own="decoupled", step_size=lambda o, g: g["d"] * g["lr"],
    description="`p *= 1 - d*lr*wd` before the update (its docstring says L2; the code is decoupled)",
))
_DUAL_AVERAGING = ("{} sets the weights from their initial value and its gradient sum (dual averaging), so a decay of"
                   " the weights before its step is undone")
register_optimizer("dadaptation.dadapt_sgd.DAdaptSGD", OptimizerRule(
    own="coupled", step_size=None, exact_generic=False,
    generic_refusal=lambda o, g, rule: None if rule == "coupled" else _DUAL_AVERAGING.format("DAdaptSGD"),
    description="L2 in place, with the weight_decay of the first group for every group, not at its first step",
))
register_optimizer("dadaptation.dadapt_adagrad.DAdaptAdaGrad", OptimizerRule(
    own="coupled", step_size=None,
    generic_refusal=lambda o, g, rule: None if rule == "coupled" else _DUAL_AVERAGING.format("DAdaptAdaGrad"),
    description="L2 in place (dense gradients only)",
))
