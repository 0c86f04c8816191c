"""timm.optim (1.0): how each optimizer applies its own ``weight_decay``, read from its sources.

timm's group switch ``corrected_weight_decay=True`` scales the decoupled decay by ``lr**2 / max_lr`` (the constructor
lr, kept as ``max_lr_snapshot``): that is ``mode="corrected"`` with ``lr_max = max_lr_snapshot``. Entries name the
defining modules (``timm.optim.lion.Lion``), so nothing here imports timm.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.optimizers.directions import lion_direction
from lightning_wd.optimizers.registry import Equilibrium, Group, OptimizerRule, always, non_default, register_optimizer
from lightning_wd.optimizers.torch_rates import adam_rate
from lightning_wd.rates import SIGN_UPDATE, Formula, RateSpec

PACKAGE = "timm.optim"
CORRECTED = "corrected_weight_decay"


def _max_lr(flag: str | None = None):
    """Its reference lr ``max_lr_snapshot``, where its own rule measures against it: with
    ``corrected_weight_decay`` (and ``flag``, for the optimizers whose decoupled decay is switched on by one)."""

    def reference(optimizer: Optimizer, group: Group) -> float | None:
        on = group.get(CORRECTED, False) and (flag is None or group.get(flag, False))
        return group.get("max_lr_snapshot") if on else None

    return reference


def unclipped_adam_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """:func:`~lightning_wd.optimizers.torch_rates.adam_rate`, except with ``clipping_threshold``, which rescales each
    step's denominator by the RMS of that step's update (a factor the state does not keep): then none."""
    return None if group.get("clipping_threshold") is not None else adam_rate(state, group, param)


def _decoupled(flag: str | None = None, coupled: str | None = "coupled"):
    """Its own rule: with ``flag`` (or always, without one) decoupled or corrected; otherwise ``coupled``."""

    def own(optimizer: Optimizer, group: Group) -> str | None:
        if flag is not None and not group.get(flag, False):
            return coupled
        return "corrected" if group.get(CORRECTED, False) else "decoupled"

    return own


def _switches(flag: str | None = None, coupled: bool = True) -> dict[str, dict[str, bool]]:
    on = {flag: True} if flag else {}
    out = {"decoupled": {**on, CORRECTED: False}, "corrected": {**on, CORRECTED: True}}
    if flag and coupled:
        out["coupled"] = {flag: False}
    return out


def _register(module_and_name: str, flag: str | None = None, **kw: Any) -> None:
    """An entry with the reference lr and chosen switches of timm's ``corrected_weight_decay`` (and ``flag``)."""
    chosen = {CORRECTED: False, **({flag: False} if flag else {})}
    kw.setdefault("chosen_switch", non_default(**chosen))
    register_optimizer(f"{PACKAGE}.{module_and_name}", OptimizerRule(reference_lr=_max_lr(flag), **kw))


DECOUPLED = "`p *= 1 - lr*wd` before the update (`corrected_weight_decay`: `lr**2/max_lr`)"
for _path in ("lion.Lion", "nadamw.NAdamW", "adamw.AdamWLegacy"):
    _register(_path, own=_decoupled(), switches=_switches(), description=DECOUPLED,
              update_direction=lion_direction if _path == "lion.Lion" else None,
              effective_lr=SIGN_UPDATE if _path == "lion.Lion" else Formula(unclipped_adam_rate),
              equilibrium=(lambda o, g: Equilibrium("lion")) if _path == "lion.Lion" else None)
_register("rmsprop_tf.RMSpropTF", "decoupled_decay", own=_decoupled("decoupled_decay"),
          switches=_switches("decoupled_decay"), description=f"L2 (`decoupled_decay=True`: {DECOUPLED})")
_register(
    "lamb.Lamb",
    "decoupled_decay",
    own=_decoupled("decoupled_decay", coupled=None),
    switches=_switches("decoupled_decay", coupled=False),
    generic_refusal=lambda o, g, rule: None if g.get("always_adapt", False) else (
        "timm's Lamb applies its trust ratio only while weight_decay != 0, so setting it to 0 for the step would turn"
        " LAMB into Adam; pass `always_adapt=True` to keep the trust ratio"),
    description="`wd*p` added to the Adam ratio inside its trust ratio (`decoupled_decay=True`: `p -= lr*wd*p`"
                " before it); the trust ratio only while weight_decay != 0",
)
_register("lars.Lars", own=None,
          generic_refusal=always("timm's Lars puts weight_decay into its trust ratio (`||g|| + wd*||p||`) and applies"
                                 " the ratio only while weight_decay != 0; use its own weight_decay without"
                                 " WeightDecay"),
          effective_lr=Formula(None, "SGD scaled by a trust ratio per layer: no per-element rate"),
          description="`wd*p` added to the gradient inside its trust ratio, applied only while weight_decay != 0")
# AdamP decays by lr*wd*wd_ratio (wd_ratio 0.1 by default) the weights its projection fires on: its own rule is ours
# only with wd_ratio=1, which the decoupled mode sets for the step (wd_ratio scales nothing else)
_register("adamp.AdamP", own=lambda o, g: "decoupled" if g.get("wd_ratio", 0.1) == 1 else None,
          switches={"decoupled": {"wd_ratio": 1.0}}, chosen_switch=None, exact_generic=False,
          effective_lr=Formula(adam_rate),
          description="`p *= 1 - lr*wd*wd_ratio` (wd_ratio=0.1 where its projection fires) before the update")
_register("adan.Adan", own="decoupled", exact_generic=lambda g: g.get("no_prox", False),
          description="proximal `p /= 1 + lr*wd` after the update (`no_prox=True`: `p *= 1 - lr*wd` before)")
_register("adafactor.Adafactor", own="decoupled",
          # with lr=None it writes its relative step into group["lr"] at each step: no lr to measure against
          refuse=lambda o, g, rule: "its lr is None (a relative step size, which it writes into the group's lr)"
          if g.get("relative_step", False) and rule in ("independent", "corrected") else None,
          step_size=lambda o, g: None if g.get("relative_step", False) else g["lr"],
          exact_generic=lambda g: not g.get("relative_step", False),
          description="`p -= lr_t*wd*p` before the update; lr_t relative (RMS(p)*min(1e-2, 1/sqrt(t))) with lr=None")


def _big_vision(optimizer: Optimizer, group: Group) -> str | None:
    if group.get("unscaled_wd", False):  # 1 - wd (no lr: none of ours), or 1 - (lr/max_lr)*wd
        return "independent" if group.get(CORRECTED, False) else None
    return "corrected" if group.get(CORRECTED, False) else "decoupled"


_register("adafactor_bv.AdafactorBigVision", own=_big_vision,
          switches={"decoupled": {"unscaled_wd": False, CORRECTED: False},
                    "corrected": {"unscaled_wd": False, CORRECTED: True},
                    "independent": {"unscaled_wd": True, CORRECTED: True}},
          description="`p *= 1 - lr*wd` before the update (`unscaled_wd`: `1 - wd`; corrected: lr**2/max_lr,"
                      " lr/max_lr)")
def _kron(optimizer: Optimizer, group: Group) -> str | None:
    # stochastic_weight_decay multiplies the decay by 2U, U uniform: ours only on average
    if group.get("stochastic_weight_decay", False):
        return None
    return _decoupled("decoupled_decay", None)(optimizer, group)


_register("kron.Kron", "decoupled_decay", own=_kron,
          switches=_switches("decoupled_decay", coupled=False),
          generic_refusal=lambda o, g, rule: None if not g.get("stochastic_weight_decay", False) else (
              "with stochastic_weight_decay Kron draws from its random generator only while weight_decay != 0, which"
              " would shift its preconditioner updates"),
          description="`wd*p` added to the preconditioned gradient (`decoupled_decay=True`: `p *= 1 - lr*wd`)")
_register("mars.Mars", own="decoupled",
          # its 1-D parameters take the AdamW branch, at lr * lr_1d_factor, unless optimize_1d
          param_step_factor=lambda o, g, p: 1.0 if g.get("optimize_1d", False) or p.ndim >= 2 else g["lr_1d_factor"],
          description="`p -= lr*(wd*p + update)`, fused with the update (1-D parameters: lr*lr_1d_factor)")
_register("laprop.LaProp", own=_decoupled(), switches=_switches(), exact_generic=False,
          description="`p -= lr*wd*p` after the update (`corrected_weight_decay`: lr**2/max_lr)")
_register("adopt.Adopt", "decoupled", own=_decoupled("decoupled"), switches=_switches("decoupled"),
          exact_generic=lambda g: not g.get("decoupled", False),
          description="L2, also at its first step (`decoupled=True`: `p -= lr*wd*p` before the update, from step 2)")
register_optimizer(f"{PACKAGE}.lookahead.Lookahead", OptimizerRule(
    inner=lambda o: o._base_optimizer, description="a wrapper: steps the optimizer in `_base_optimizer`"))
