"""pytorch-optimizer (4.1): how each optimizer applies its own ``weight_decay``, read from its sources.

Most share ``apply_weight_decay``: with the group's ``weight_decouple=True`` (the usual default) ``p *= 1 - lr*wd``
before the update, with ``False`` L2 in place on ``p.grad``, with ``fixed_decay=True`` ``p *= 1 - wd`` (no lr: none
of lightning_wd's rules).
"""

from __future__ import annotations

from torch.optim import Optimizer

from lightning_wd.effective_lr import (
    ORTHOGONALIZED,
    PLAIN_LR,
    SIGN_UPDATE,
    Formula,
    adabelief_rate,
    adamp_rate,
    lamb_rate,
)
from lightning_wd.optimizers.directions import lion_direction
from lightning_wd.optimizers.registry import Group, OptimizerRule, Scalar, always, register_optimizer, switch

PACKAGE = "pytorch_optimizer.optimizer"
SWITCHES = {"decoupled": {"weight_decouple": True, "fixed_decay": False}, "coupled": {"weight_decouple": False}}
OWN = "`p *= 1 - lr*wd` before the update (`weight_decouple=False`: L2; `fixed_decay`: `p *= 1 - wd`)"


def _decoupled_or_coupled(optimizer: Optimizer, group: Group) -> str | None:
    if not group.get("weight_decouple", True):
        return "coupled"
    return None if group.get("fixed_decay", False) else "decoupled"


def _decoupled_or_nothing(optimizer: Optimizer, group: Group) -> str | None:
    # AdamP, Prodigy and Ranger21 with weight_decouple=False apply no decay at all (the L2 term comes too late)
    if not group.get("weight_decouple", True) or group.get("fixed_decay", False):
        return None
    return "decoupled"


def _register(name: str, module: str, **kw) -> None:
    register_optimizer(f"{PACKAGE}.{module}.{name}", OptimizerRule(**kw))


def _d_lr(optimizer: Optimizer, group: Group) -> Scalar | None:
    """D-Adaptation's and Prodigy's step size ``d * lr`` with ``d`` before its update (``None`` with their bias
    correction, which depends on the coming step's count)."""
    return None if group.get("bias_correction", False) else group["d"] * group["lr"]


_NO_RATE = {
    "Lion": SIGN_UPDATE,
    "SGDW": PLAIN_LR,
    "Muon": ORTHOGONALIZED,
}
for _name, _module in (("Lion", "lion"), ("AdaBelief", "adabelief"), ("SGDW", "sgd"), ("Muon", "muon.muon")):
    _register(_name, _module, own=_decoupled_or_coupled, switches=SWITCHES, description=OWN,
              update_direction=lion_direction if _name == "Lion" else None,
              effective_lr=_NO_RATE.get(_name, Formula(adabelief_rate)))
_register("AdamMini", "adam_mini", own="decoupled", description="`p *= 1 - lr*wd` before the update, always")
_register("Lamb", "lamb", own=switch("weight_decouple", "decoupled", None, True), effective_lr=Formula(lamb_rate),
          switches={"decoupled": SWITCHES["decoupled"]},
          description="`p *= 1 - lr*wd` before the update (`weight_decouple=False`: `wd*p` added to the Adam ratio,"
                      " inside the trust ratio)")
_register("LARS", "lars", own=None,
          generic_refusal=always("LARS's `weight_decay` enters its trust ratio (`||g|| + wd*||p||`), for parameters"
                                 " of more than one dimension only; use its own weight_decay without WeightDecay"),
          effective_lr=Formula(None, "SGD scaled by a trust ratio per layer: no per-element rate"),
          description="`wd*p` added to the gradient inside its trust ratio (2-D+ parameters only)")
_register("AdamP", "adamp", own=_decoupled_or_nothing, switches={"decoupled": SWITCHES["decoupled"]},
          exact_generic=False, effective_lr=Formula(adamp_rate),
          description="`p *= 1 - lr*wd*wd_ratio` after its projection (`weight_decouple=False`: no decay at all)")
_register("Adan", "adan", own="decoupled", exact_generic=lambda g: g.get("weight_decouple", False),
          description="proximal `p /= 1 + lr*wd` after the update (`weight_decouple=True`: `p *= 1 - lr*wd` before)")
_register("MADGRAD", "madgrad", own=switch("weight_decouple", "decoupled", "coupled"),
          switches={"decoupled": {"weight_decouple": True}, "coupled": {"weight_decouple": False}},
          exact_generic=lambda g: not g.get("weight_decouple", False),
          generic_refusal=lambda o, g, rule: None if rule == "coupled" else (
              "MADGRAD's dual averaging recomputes the weights from their initial value and the gradient sum, so a"
              " decay of the weights before its step is mostly undone"),
          description="L2 in place (`weight_decouple=True`: `p -= (lr+eps)*wd*p_old` after the update)")
_register("SophiaH", "sophia", own=_decoupled_or_coupled, switches=SWITCHES,
          generic_refusal=lambda o, g, rule: None if rule == "coupled" else (
              "a decay of the weights before SophiaH's step breaks the Hessian-vector product it computes from the"
              " backward graph (an in-place change of a saved tensor)"),
          description="`p *= 1 - lr*wd` after its Hessian-vector product, before the update (False: L2)")
_register("Ranger", "ranger", own=_decoupled_or_coupled, switches=SWITCHES, exact_generic=False,
          description="`p *= 1 - lr*wd` after its gradient centralization and Lookahead set-up (False: L2 there)")
_register("Ranger21", "ranger21", own=_decoupled_or_nothing, switches={"decoupled": SWITCHES["decoupled"]},
          step_size=None, exact_generic=False,
          description="`p *= 1 - lr_t*wd/variance_norm` with its own warm-up/warm-down lr_t (False: no decay)")
_register("Prodigy", "prodigy", own=_decoupled_or_nothing, switches={"decoupled": SWITCHES["decoupled"]},
          step_size=_d_lr, exact_generic=False,
          description="`p *= 1 - d*lr*wd` after its d update reads p (`weight_decouple=False`: no decay at all)")
_register("DAdaptAdam", "dadapt", own=_decoupled_or_coupled, switches=SWITCHES, step_size=_d_lr,
          description="L2 in place (`weight_decouple=True`: `p *= 1 - d*lr*wd` before the update)")
_register("AdaFactor", "adafactor", own=_decoupled_or_coupled, switches=SWITCHES,
          step_size=lambda o, g: None if g.get("relative_step", True) or g.get("scale_parameter", True) else g["lr"],
          exact_generic=lambda g: not (g.get("relative_step", True) or g.get("scale_parameter", True)),
          description="`p *= 1 - lr_t*wd` with its relative step lr_t = RMS(p)*min(1e-2, 1/sqrt(t)) by default")
_register("ScheduleFreeAdamW", "schedulefree", own="decoupled", exact_generic=False,
          generic_refusal=lambda o, g, rule: None if rule == "coupled" else (
              "a schedule-free optimizer follows a second sequence z that a decay of the weights (y) before its step"
              " does not reach"),
          description="`wd*y` added to the normalized gradient, moving both y and z")
_register("StableAdamW", "adamw", own=_decoupled_or_coupled, switches=SWITCHES,
          exact_generic=lambda g: not g.get("weight_decouple", True),
          description="`p *= 1 - (lr/RMS)*wd` with its update RMS, before the update (False: L2)")
