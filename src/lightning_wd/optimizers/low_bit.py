"""Low-bit optimizers: bitsandbytes (0.50) and torchao (0.18), read from their sources.

bitsandbytes' ``Adam8bit`` and ``AdamW8bit`` run the same kernel: both decay decoupled (``p *= 1 - lr*wd`` before
the update), whatever the name says; its SGD is L2. torchao's ``AdamW*`` decay ``p - lr*wd*p`` before the update, its
``Adam*`` add L2 (the choice is the optimizer's ``is_adamw``); its lr is a 0-dim tensor.
"""

from __future__ import annotations

from lightning_wd.optimizers.registry import OptimizerRule, register_optimizer

DECOUPLED = "`p *= 1 - lr*wd` before the update"
for _path in ("adam.Adam", "adam.Adam8bit", "adam.Adam32bit", "adam.PagedAdam", "adam.PagedAdam8bit",
              "adam.PagedAdam32bit", "adamw.AdamW", "adamw.AdamW8bit", "adamw.AdamW32bit", "adamw.PagedAdamW",
              "adamw.PagedAdamW8bit", "adamw.PagedAdamW32bit"):
    register_optimizer(f"bitsandbytes.optim.{_path}", OptimizerRule(
        own="decoupled", description=f"{DECOUPLED} (Adam* too: the same kernel as AdamW*)"))
for _path in ("lion.Lion", "lion.Lion8bit", "lion.Lion32bit", "lion.PagedLion", "lion.PagedLion8bit",
              "lion.PagedLion32bit"):
    register_optimizer(f"bitsandbytes.optim.{_path}", OptimizerRule(own="decoupled", description=DECOUPLED))
for _path in ("sgd.SGD", "sgd.SGD8bit", "sgd.SGD32bit"):
    register_optimizer(f"bitsandbytes.optim.{_path}", OptimizerRule(own="coupled", description="L2"))

for _name in ("_AdamW", "AdamW8bit", "AdamW4bit", "AdamWFp8", "Adam8bit", "Adam4bit", "AdamFp8"):
    register_optimizer(f"torchao.optim.adam.{_name}", OptimizerRule(
        own=lambda optimizer, group: "decoupled" if getattr(optimizer, "is_adamw", True) else "coupled",
        description="`p - lr*wd*p` before the update (Adam*: L2); compiled per weight_decay value"))
