"""Low-bit optimizers: bitsandbytes (0.50) and torchao (0.18), read from their sources.

bitsandbytes' ``Adam8bit`` and ``AdamW8bit`` run the same kernel: both decay decoupled (``p *= 1 - lr*wd`` before
the update), whatever the name says; its SGD is L2. torchao's ``AdamW*`` decay ``p - lr*wd*p`` before the update, its
``Adam*`` add L2 (the choice is the optimizer's ``is_adamw``); its lr is a 0-dim tensor.
"""

from __future__ import annotations

from torch.optim import Optimizer

from lightning_wd.optimizers.registry import Equilibrium, Group, OptimizerRule, register_optimizer


def _overridden(optimizer: Optimizer, group: Group, rule: str) -> str | None:
    """bitsandbytes lets a parameter override its group's lr or weight_decay (``GlobalOptimManager.override_config``):
    the separate pass, which sets the group's decay to 0 for the step, would decay such a parameter twice."""
    mng = getattr(optimizer, "mng", None)
    configs = list(getattr(mng, "pid2config", {}).values()) + list(getattr(mng, "index2config", {}).values())
    if any("weight_decay" in c or "lr" in c for c in configs):
        return ("bitsandbytes' override_config gives some parameters an lr or weight_decay of their own, which the"
                " separate pass cannot follow; leave the decay to the optimizer (native=True, no exclusions)")
    return None


DECOUPLED = "`p *= 1 - lr*wd` before the update"
for _path in ("adam.Adam", "adam.Adam8bit", "adam.Adam32bit", "adam.PagedAdam", "adam.PagedAdam8bit",
              "adam.PagedAdam32bit", "adamw.AdamW", "adamw.AdamW8bit", "adamw.AdamW32bit", "adamw.PagedAdamW",
              "adamw.PagedAdamW8bit", "adamw.PagedAdamW32bit"):
    register_optimizer(f"bitsandbytes.optim.{_path}", OptimizerRule(
        own="decoupled", generic_refusal=_overridden,
        description=f"{DECOUPLED} (Adam* too: the same kernel as AdamW*)"))
for _path in ("lion.Lion", "lion.Lion8bit", "lion.Lion32bit", "lion.PagedLion", "lion.PagedLion8bit",
              "lion.PagedLion32bit"):
    register_optimizer(f"bitsandbytes.optim.{_path}", OptimizerRule(
        own="decoupled", generic_refusal=_overridden, equilibrium=lambda o, g: Equilibrium("lion"),
        description=DECOUPLED))
for _path in ("sgd.SGD", "sgd.SGD8bit", "sgd.SGD32bit"):
    register_optimizer(f"bitsandbytes.optim.{_path}", OptimizerRule(own="coupled", generic_refusal=_overridden,
                                                                    description="L2"))

for _name in ("_AdamW", "AdamW8bit", "AdamW4bit", "AdamWFp8", "Adam8bit", "Adam4bit", "AdamFp8"):
    register_optimizer(f"torchao.optim.adam.{_name}", OptimizerRule(
        own=lambda optimizer, group: "decoupled" if getattr(optimizer, "is_adamw", True) else "coupled",
        description="`p - lr*wd*p` before the update (Adam*: L2); compiled per weight_decay value"))
