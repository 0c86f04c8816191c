"""timm.optim (1.0): how each optimizer applies its own ``weight_decay``, read from its sources.

timm's group switch ``corrected_weight_decay=True`` scales the decoupled decay by ``lr**2 / max_lr`` (the constructor
lr, kept as ``max_lr_snapshot``): that is ``mode="corrected"`` with ``lr_max = max_lr_snapshot``. Entries name the
defining modules (``timm.optim.lion.Lion``), so nothing here imports timm.
"""

from __future__ import annotations

from torch.optim import Optimizer

from lightning_wd.effective_lr import SIGN_UPDATE, Formula, adam_rate
from lightning_wd.optimizers.directions import lion_direction
from lightning_wd.optimizers.registry import Group, OptimizerRule, always, register_optimizer

PACKAGE = "timm.optim"
CORRECTED = "corrected_weight_decay"


def _max_lr(optimizer: Optimizer, group: Group) -> float | None:
    return group.get("max_lr_snapshot")


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


def _register(module_and_name: str, **kw) -> None:
    register_optimizer(f"{PACKAGE}.{module_and_name}", OptimizerRule(reference_lr=_max_lr, **kw))


DECOUPLED = "`p *= 1 - lr*wd` before the update (`corrected_weight_decay`: `lr**2/max_lr`)"
for _path in ("lion.Lion", "nadamw.NAdamW", "adamw.AdamWLegacy"):
    _register(_path, own=_decoupled(), switches=_switches(), description=DECOUPLED,
              update_direction=lion_direction if _path == "lion.Lion" else None,
              effective_lr=SIGN_UPDATE if _path == "lion.Lion" else Formula(adam_rate))
_register("rmsprop_tf.RMSpropTF", own=_decoupled("decoupled_decay"), switches=_switches("decoupled_decay"),
          description=f"L2 (`decoupled_decay=True`: {DECOUPLED})")
_register(
    "lamb.Lamb",
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
_register("adamp.AdamP", own="decoupled", exact_generic=False, effective_lr=Formula(adam_rate),
          description="`p *= 1 - lr*wd*wd_ratio` after its projection, before the update")
_register("adan.Adan", own="decoupled", exact_generic=lambda g: g.get("no_prox", False),
          description="proximal `p /= 1 + lr*wd` after the update (`no_prox=True`: `p *= 1 - lr*wd` before)")
_register("adafactor.Adafactor", own="decoupled",
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
_register("kron.Kron", own=_decoupled("decoupled_decay", coupled=None),
          switches=_switches("decoupled_decay", coupled=False),
          generic_refusal=lambda o, g, rule: None if not g.get("stochastic_weight_decay", False) else (
              "with stochastic_weight_decay Kron draws from its random generator only while weight_decay != 0, which"
              " would shift its preconditioner updates"),
          description="`wd*p` added to the preconditioned gradient (`decoupled_decay=True`: `p *= 1 - lr*wd`)")
_register("mars.Mars", own="decoupled", description="`p -= lr*(wd*p + update)`, fused with the update")
_register("laprop.LaProp", own=_decoupled(), switches=_switches(), exact_generic=False,
          description="`p -= lr*wd*p` after the update (`corrected_weight_decay`: lr**2/max_lr)")
_register("adopt.Adopt", own=_decoupled("decoupled"), switches=_switches("decoupled"),
          exact_generic=lambda g: not g.get("decoupled", False),
          description="L2, also at its first step (`decoupled=True`: `p -= lr*wd*p` before the update, from step 2)")
