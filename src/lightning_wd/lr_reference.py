"""The reference lr ``lr_max`` of the lr-scaled modes (``"independent"``, ``"corrected"``), found in one order.

``lr_max`` is the peak of the learning-rate schedule. Where nobody passed one, it is taken, in this order, from:

1. the scheduler's recorded peak: ``OneCycleLR`` writes ``max_lr`` into each group; ``CyclicLR`` starts at its
   lowest lr and keeps its peaks in ``max_lrs`` (only a Trainer knows the scheduler: :func:`scheduler_peaks`);
2. the optimizer's own reference lr, where its own decay rule measures against one (optimi's ``max_lr`` with
   ``decouple_lr=True``; its registry entry's ``reference_lr``), so that its own kernel can apply the mode;
3. the lr the schedule started from (``initial_lr``, written by every torch LR scheduler);
4. the group's lr when first seen.

Example::

    >>> group_peak_lr({"lr": 0.004, "initial_lr": 0.004, "max_lr": 0.1})
    0.1
    >>> group_peak_lr({"lr": 0.01})
    0.01
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

__all__ = ["group_peak_lr", "host_float", "scheduler_peaks"]


def host_float(x: Any) -> float:
    """A number's value, read once when a group is adopted (a tensor lr on a GPU costs one sync there, never in a
    step)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def group_peak_lr(group: Mapping[str, Any], own_reference: float | None = None) -> float | None:
    """The reference lr of ``group`` (see the module docstring for the order), ``own_reference`` being the
    optimizer's own; a tensor lr's value, not the tensor (which a scheduler goes on changing). ``None`` for an lr
    of ``None`` (a relative step size)."""
    if group.get("max_lr") is not None:
        return host_float(group["max_lr"])
    if own_reference is not None:
        return float(own_reference)
    for key in ("initial_lr", "lr"):
        if group.get(key) is not None:
            return host_float(group[key])
    return None


def scheduler_peaks(schedulers: Any, optimizer: Optimizer) -> list[float] | None:
    """The per-group peaks of a cyclic schedule of ``optimizer`` (``CyclicLR.max_lrs``), among ``schedulers``
    (torch schedulers, or Lightning's scheduler configs, which hold one in ``.scheduler``); ``None`` if none."""
    for entry in schedulers:
        scheduler = getattr(entry, "scheduler", entry)
        peaks = getattr(scheduler, "max_lrs", None)
        if getattr(scheduler, "optimizer", None) is optimizer and peaks is not None:
            return [float(p) for p in peaks]
    return None
