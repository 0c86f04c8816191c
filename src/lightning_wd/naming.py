"""The names under which the callbacks log, and which parameters a monitor reports, in one documented scheme.

Keys read ``{metric}/{what}``, where ``what`` is

- a parameter: its ``named_parameters()`` name without the ``_orig_mod.`` that ``torch.compile`` adds, so that a key
  does not change when compile is toggled (``net.0.weight``);
- a module aggregate: the first ``depth`` parts of the parameter names (``net.0`` at depth 2: ``net.0.weight`` and
  ``net.0.bias`` together);
- a param group: ``{optimizer}/{group}``, named as :class:`~lightning.pytorch.callbacks.LearningRateMonitor` names
  them, so that the two read side by side: ``{optimizer}`` is the scheduler config's ``name`` where one is given,
  else the optimizer's class name with ``-k`` on its k-th repeat (``Adam``, ``Adam-1``); ``{group}`` is the group's
  ``"name"`` key where it has one, else ``pg{i}`` counted from 1 (``pg1``, ``pg2``).

Example::

    >>> import torch
    >>> a = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    >>> b = torch.optim.Adam([{"params": [torch.zeros(1, requires_grad=True)], "name": "head"}])
    >>> optimizer_names([a, b])
    ['Adam', 'Adam-1']
    >>> group_names(b)
    ['head']
    >>> parameter_name("net._orig_mod.0.weight"), module_name("net._orig_mod.0.weight", depth=2)
    ('net.0.weight', 'net.0')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.optim import Optimizer

from lightning_wd.exclusion import COMPILED_SEGMENT

__all__ = ["group_names", "is_logging_step", "module_name", "optimizer_names", "parameter_name"]


def optimizer_names(optimizers: Sequence[Optimizer], scheduler_configs: Sequence[Any] = ()) -> list[str]:
    """The name of each optimizer, as LearningRateMonitor's keys have it without their ``lr-`` prefix: the ``name``
    of its scheduler config where one is given, else its class name with ``-k`` on its k-th repeat, counted as
    LearningRateMonitor counts (optimizers with a scheduler first, in the order of the schedulers)."""
    order: list[tuple[Optimizer, str | None]] = []
    for config in scheduler_configs:
        opt = config.scheduler.optimizer
        if all(opt is not o for o, _ in order):
            order.append((opt, getattr(config, "name", None)))
    order += [(opt, None) for opt in optimizers if all(opt is not o for o, _ in order)]
    seen: dict[type, int] = {}
    by_id: dict[int, str] = {}
    for opt, given in order:
        if given is not None:
            by_id[id(opt)] = given
            continue
        k = seen.get(type(opt), 0)
        seen[type(opt)] = k + 1
        by_id[id(opt)] = type(opt).__name__ if k == 0 else f"{type(opt).__name__}-{k}"
    return [by_id[id(opt)] for opt in optimizers]


def group_names(optimizer: Optimizer) -> list[str]:
    """``{group}`` of each param group: its ``"name"``, else ``pg{i}`` counted from 1, as LearningRateMonitor."""
    return [str(g["name"]) if g.get("name") else f"pg{i + 1}" for i, g in enumerate(optimizer.param_groups)]


def parameter_name(name: str) -> str:
    """A ``named_parameters()`` name without the ``_orig_mod.`` of ``torch.compile``."""
    return name.replace(COMPILED_SEGMENT, "")


def module_name(name: str, depth: int) -> str:
    """The module aggregate of parameter ``name``: its first ``depth`` parts (all but the last, at most), compile's
    ``_orig_mod.`` removed."""
    parts = parameter_name(name).split(".")
    return ".".join(parts[: max(1, min(depth, len(parts) - 1))])


def is_logging_step(trainer: Any, every: int | None) -> bool:
    """Whether the optimizer step in progress is a logging step: every ``every`` steps, else every
    ``trainer.log_every_n_steps``, and only with loggers; the same on every rank, so that no rank skips a
    collective, and the same for every callback, so that their numbers come from the same steps."""
    if not trainer.loggers:
        return False
    every = every or trainer.log_every_n_steps
    # `+ 1`: the step counter moves on after this batch, as in Lightning's own `should_update_logs`
    return bool(every) and (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0
