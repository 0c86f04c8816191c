"""The decay modes and their per-step arithmetic, shared by the engine, the callbacks and the monitors."""

from __future__ import annotations

from typing import Literal

from lightning_wd._types import Scalar

Mode = Literal["decoupled", "coupled", "independent", "corrected"]
MODES: tuple[str, ...] = ("decoupled", "coupled", "independent", "corrected")
#: the modes whose decay is measured against a reference lr ``lr_max``
WITH_LR_MAX: tuple[str, ...] = ("independent", "corrected")


def per_step_decay(
    mode: str, lr: Scalar, weight_decay: Scalar, lr_max: float | None, step_size: Scalar | None = None
) -> Scalar | None:
    """The ``x`` of ``p *= 1 - x`` that ``mode`` applies in one step (``None`` for ``"coupled"``, which multiplies
    nothing: it adds ``weight_decay * p`` to the gradient).

    ``step_size`` is what the optimizer's own decoupled decay multiplies ``weight_decay`` by (``lr`` unless given:
    ``d * lr`` for Prodigy): ``decoupled`` is ``step_size * wd``, ``independent`` ``(lr / lr_max) * wd`` (the schedule,
    not the lr's size) and ``corrected`` ``step_size * (lr / lr_max) * wd`` (AdamC: ``wd * lr**2 / lr_max``).
    """
    step = lr if step_size is None else step_size
    if mode == "decoupled":
        return step * weight_decay
    if mode == "independent":
        return lr / lr_max * weight_decay
    if mode == "corrected":
        return step * (lr / lr_max) * weight_decay
    return None


def describe_mode_change(old: str, new: str, lr: float, old_lr_max: float | None, new_lr_max: float | None) -> str:
    """How the per-step decay changes when a run trained in ``old`` mode goes on in ``new`` mode (at lr ``lr``)."""
    if "coupled" in (old, new):
        return (
            "coupled decay adds wd*p to the gradient (scaled by the optimizer's adaptive denominator) and the other"
            " modes shrink the weights directly, so the decay changes in kind, not by one factor"
        )
    before = per_step_decay(old, lr, 1.0, old_lr_max)
    after = per_step_decay(new, lr, 1.0, new_lr_max)
    return f"the per-step decay changes by a factor {after / before:.4g} at the current lr {lr:.4g}"
