"""pytorch-optimizer (4.1): how each optimizer applies its own ``weight_decay``, read from its sources.

Most share ``apply_weight_decay``: with the group's ``weight_decouple=True`` (the usual default) ``p *= 1 - lr*wd``
before the update, with ``False`` L2 in place on ``p.grad``, with ``fixed_decay=True`` ``p *= 1 - wd`` (no lr: none
of lightning_wd's rules). Its ``adam_debias=True`` steps by ``lr`` instead of ``lr / (1 - beta1^t)``, which the
effective-lr formulas follow. Its wrappers (Lookahead, OrthoGrad, the SAM family, ...) step an inner optimizer,
which the decay and the monitors attach to.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.optimizers.directions import lion_direction
from lightning_wd.optimizers.registry import (
    Equilibrium,
    Group,
    OptimizerRule,
    Scalar,
    always,
    non_default,
    register_optimizer,
)
from lightning_wd.rates import (
    ORTHOGONALIZED,
    PLAIN_LR,
    SIGN_UPDATE,
    Formula,
    RateSpec,
    bias_correction,
    root_rate,
)

PACKAGE = "pytorch_optimizer.optimizer"
SWITCHES = {"decoupled": {"weight_decouple": True, "fixed_decay": False}, "coupled": {"weight_decouple": False}}
# groups of these have no `fixed_decay` key
PLAIN_SWITCHES = {"decoupled": {"weight_decouple": True}, "coupled": {"weight_decouple": False}}
OWN = "`p *= 1 - lr*wd` before the update (`weight_decouple=False`: L2; `fixed_decay`: `p *= 1 - wd`)"
CHOSEN = non_default(weight_decouple=True, fixed_decay=False)


def _decoupled_or_coupled(optimizer: Optimizer, group: Group) -> str | None:
    if not group.get("weight_decouple", True):
        return "coupled"
    return None if group.get("fixed_decay", False) else "decoupled"


def _decoupled_or_nothing(optimizer: Optimizer, group: Group) -> str | None:
    # AdamP, Lamb, Prodigy and Ranger21 with weight_decouple=False apply no decay of ours (too late, or inside a
    # trust ratio); fixed_decay is `p *= 1 - wd`
    if not group.get("weight_decouple", True) or group.get("fixed_decay", False):
        return None
    return "decoupled"


def _register(name: str, module: str, **kw: Any) -> None:
    register_optimizer(f"{PACKAGE}.{module}.{name}", OptimizerRule(**kw))


def _first_group_d_lr(optimizer: Optimizer, group: Group) -> Scalar | None:
    """Prodigy's and DAdaptAdam's step size ``d * lr`` with ``d`` before its update and the *first* group's lr, which
    their step uses for every group (``None`` with their bias correction, which depends on the coming step)."""
    return None if group.get("bias_correction", False) else group["d"] * optimizer.param_groups[0]["lr"]


# --- effective-lr formulas ----------------------------------------------------------------------------------------
def _debias(group: dict[str, Any], scale: Scalar) -> Scalar:
    """``adam_debias=True`` steps by ``lr``, not ``lr / (1 - beta1^t)``: the rate of ``m_hat`` is then ``bc1`` times
    smaller."""
    return scale * bias_correction(group["betas"][0], group["step"]) if group.get("adam_debias", False) else scale


def adabelief_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``lr / (sqrt(s / (1 - beta2^t)) + eps)``: AdaBelief (not rectified), the factor of ``m_hat`` in its update,
    with ``s = exp_avg_var`` (its ``eps`` already added inside), ``max_exp_avg_var`` under ``ams_bound``, and
    ``t = group["step"]``."""
    key = "max_exp_avg_var" if group.get("ams_bound", False) else "exp_avg_var"
    if key not in state or group.get("rectify", False):
        return None
    root_bc2 = bias_correction(group["betas"][1], group["step"]) ** 0.5
    return root_rate(state[key], _debias(group, group["lr"] * root_bc2), group["eps"] * root_bc2)


def adamp_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``lr * sqrt(1 - beta2^t) / (sqrt(v) + eps)``: AdamP, the factor of ``m_hat`` before its projection (which then
    removes the update's radial part where it fires), ``t = group["step"]``."""
    if "exp_avg_sq" not in state:
        return None
    root_bc2 = bias_correction(group["betas"][1], group["step"]) ** 0.5
    return root_rate(state["exp_avg_sq"], _debias(group, group["lr"] * root_bc2), group["eps"])


def lamb_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``lr * trust_ratio / (sqrt(v) + eps)``: LAMB (not rectified), the factor of ``m_hat`` in its update, with the
    layer's trust ratio of this step (``state["trust_ratio"]``; 1 with ``adam=True``) and no bias correction of
    ``v``. With ``grad_averaging=False`` its first moment is ``beta1 * m + g``, ``1 / (1 - beta1)`` times an average:
    the rate is that of the average, as for the other optimizers."""
    if "exp_avg_sq" not in state or group.get("rectify", False):
        return None
    trust = 1.0 if group.get("adam", False) else state.get("trust_ratio", 1.0)
    scale = _debias(group, group["lr"] * trust)
    if not group.get("grad_averaging", True):
        scale = scale / (1 - group["betas"][0])
    return root_rate(state["exp_avg_sq"], scale, group["eps"])


def muon_adam_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """Muon's ``use_muon=False`` groups are AdamW (``lr / (sqrt(v / (1 - beta2^t)) + eps)``, ``t = group["step"]``);
    its orthogonalized groups have no per-element rate (``None``)."""
    if group.get("use_muon", True) or "exp_avg_sq" not in state:
        return None
    root_bc2 = bias_correction(group["betas"][1], group["step"]) ** 0.5
    return root_rate(state["exp_avg_sq"], group["lr"] * root_bc2, group["eps"] * root_bc2)


# --- the entries ---------------------------------------------------------------------------------------------------
def _lion_equilibrium(optimizer: Optimizer, group: Group) -> Equilibrium:
    return Equilibrium("lion")


_register("Lion", "lion", own=_decoupled_or_coupled, switches=SWITCHES, chosen_switch=CHOSEN, description=OWN,
          update_direction=lion_direction, effective_lr=SIGN_UPDATE, equilibrium=_lion_equilibrium)
_register("AdaBelief", "adabelief", own=_decoupled_or_coupled, switches=SWITCHES, chosen_switch=CHOSEN,
          description=OWN, effective_lr=Formula(adabelief_rate))
_register("SGDW", "sgd", own=_decoupled_or_coupled, switches=PLAIN_SWITCHES, chosen_switch=CHOSEN, description=OWN,
          effective_lr=PLAIN_LR)
_register("Muon", "muon.muon", own=_decoupled_or_coupled, switches=PLAIN_SWITCHES, chosen_switch=CHOSEN,
          description=OWN, effective_lr=Formula(muon_adam_rate, ORTHOGONALIZED.note))
_register("AdamMini", "adam_mini", own="decoupled", description="`p *= 1 - lr*wd` before the update, always")
_register("Lamb", "lamb", own=_decoupled_or_nothing, effective_lr=Formula(lamb_rate),
          switches={"decoupled": SWITCHES["decoupled"]}, chosen_switch=CHOSEN,
          description="`p *= 1 - lr*wd` before the update (`weight_decouple=False`: `wd*p` added to the Adam ratio,"
                      " inside the trust ratio; `fixed_decay`: `p *= 1 - wd`)")
_register("LARS", "lars", own=None,
          generic_refusal=always("LARS's `weight_decay` enters its trust ratio (`||g|| + wd*||p||`), for parameters"
                                 " of more than one dimension only; use its own weight_decay without WeightDecay"),
          effective_lr=Formula(None, "SGD scaled by a trust ratio per layer: no per-element rate"),
          description="`wd*p` added to the gradient inside its trust ratio (2-D+ parameters only)")
# AdamP decays by lr*wd*wd_ratio (wd_ratio 0.1 by default) the weights its projection fires on: its own rule is ours
# only with wd_ratio=1, which the decoupled mode sets for the step (wd_ratio scales nothing else)
_register("AdamP", "adamp",
          own=lambda o, g: _decoupled_or_nothing(o, g) if g.get("wd_ratio", 0.1) == 1 else None,
          switches={"decoupled": {**SWITCHES["decoupled"], "wd_ratio": 1.0}},
          chosen_switch=non_default(weight_decouple=True, fixed_decay=False),
          effective_lr=Formula(adamp_rate),
          description="`p *= 1 - lr*wd*wd_ratio` (wd_ratio=0.1 where its projection fires) before the update"
                      " (`weight_decouple=False`: no decay at all)")
_register("Adan", "adan", own="decoupled", exact_generic=lambda g: g.get("weight_decouple", False),
          description="proximal `p /= 1 + lr*wd` after the update (`weight_decouple=True`: `p *= 1 - lr*wd` before)")
_register("MADGRAD", "madgrad", own=lambda o, g: "decoupled" if g.get("weight_decouple", False) else "coupled",
          switches={"decoupled": {"weight_decouple": True}, "coupled": {"weight_decouple": False}},
          chosen_switch=non_default(weight_decouple=False),
          step_size=lambda o, g: g["lr"] + g["eps"] if g["lr"] else 0.0,  # `(lr + eps) * wd * p_old`
          exact_generic=lambda g: not g.get("weight_decouple", False),
          generic_refusal=lambda o, g, rule: None if rule == "coupled" else (
              "MADGRAD's dual averaging recomputes the weights from their initial value and the gradient sum, so a"
              " decay of the weights before its step is mostly undone"),
          description="L2 in place (`weight_decouple=True`: `p -= (lr+eps)*wd*p_old` after the update)")
_register("SophiaH", "sophia", own=_decoupled_or_coupled, switches=SWITCHES, chosen_switch=CHOSEN,
          generic_refusal=lambda o, g, rule: None if rule == "coupled" else (
              "a decay of the weights before SophiaH's step breaks the Hessian-vector product it computes from the"
              " backward graph (an in-place change of a saved tensor)"),
          description="`p *= 1 - lr*wd` after its Hessian-vector product, before the update (False: L2)")
_register("Ranger", "ranger", own=_decoupled_or_coupled, switches=SWITCHES, chosen_switch=CHOSEN, exact_generic=False,
          description="`p *= 1 - lr*wd` after its gradient centralization and Lookahead set-up (False: L2 there)")
_register("Ranger21", "ranger21", own=_decoupled_or_nothing, switches={"decoupled": SWITCHES["decoupled"]},
          chosen_switch=CHOSEN, step_size=None, exact_generic=False,
          description="`p *= 1 - lr_t*wd/variance_norm` with its own warm-up/warm-down lr_t (False: no decay)")
_register("Prodigy", "prodigy", own=_decoupled_or_nothing, switches={"decoupled": SWITCHES["decoupled"]},
          chosen_switch=CHOSEN, step_size=_first_group_d_lr, exact_generic=False,
          description="`p *= 1 - d*lr*wd` after its d update reads p (`weight_decouple=False`: no decay at all)")
_register("DAdaptAdam", "dadapt", own=_decoupled_or_coupled, switches=SWITCHES,
          chosen_switch=non_default(weight_decouple=False, fixed_decay=False), step_size=_first_group_d_lr,
          description="L2 in place (`weight_decouple=True`: `p *= 1 - d*lr*wd` before the update)")
_register("AdaFactor", "adafactor", own=_decoupled_or_coupled, switches=SWITCHES, chosen_switch=CHOSEN,
          step_size=lambda o, g: None if g.get("relative_step", True) or g.get("scale_parameter", True) else g["lr"],
          exact_generic=lambda g: not (g.get("relative_step", True) or g.get("scale_parameter", True)),
          description="`p *= 1 - lr_t*wd` with its relative step lr_t = RMS(p)*min(1e-2, 1/sqrt(t)) by default")
_register("ScheduleFreeAdamW", "schedulefree", own="decoupled", exact_generic=False,
          # its decay follows the lr ramped by its own warm-up
          step_size=lambda o, g: g["lr"] * min(1.0, (g.get("step", 0) + 1) / g["warmup_steps"])
          if g.get("warmup_steps") else g["lr"],
          generic_refusal=lambda o, g, rule: None if rule == "coupled" else (
              "a schedule-free optimizer follows a second sequence z that a decay of the weights (y) before its step"
              " does not reach"),
          description="`wd*y` added to the normalized gradient, moving both y and z")
# its decay is scaled by 1 / RMS of its update, known only inside its step: no step size outside it
_register("StableAdamW", "adamw", own=_decoupled_or_coupled, switches=PLAIN_SWITCHES, chosen_switch=CHOSEN,
          step_size=None, exact_generic=lambda g: not g.get("weight_decouple", True),
          description="`p *= 1 - (lr/RMS)*wd` with its update RMS, before the update (False: L2)")

# wrappers: the decay and the monitors go to the optimizer they step, whose own decay is what they configure
for _name, _module, _attr in (("Lookahead", "lookahead", "optimizer"), ("OrthoGrad", "orthograd", "optimizer"),
                              ("ScheduleFreeWrapper", "schedulefree", "optimizer"), ("TRAC", "trac", "optimizer"),
                              ("Magma", "magma", "optimizer"), ("PCGrad", "pcgrad", "optimizer"),
                              *((n, "sam", "base_optimizer") for n in ("SAM", "WSAM", "BSAM", "LookSAM", "FriendlySAM",
                                                                      "GSAM"))):
    _register(_name, _module, inner=lambda o, attr=_attr: getattr(o, attr),
              description=f"a wrapper: steps the optimizer in `{_attr}`")
