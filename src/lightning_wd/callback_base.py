"""What lightning_wd's callbacks share: the steps at which they log, the names they log under, which parameters a
monitor reports and how it aggregates them, the step hooks they arm, and one device-to-host transfer before the
loggers.

A monitor arms its step listener (:class:`lightning_wd.stepping.StepHooks`) only for the batches that log, so the
other steps pay nothing but a Python call per batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import _MockOptimizer
from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.attach import unwrap_optimizer
from lightning_wd.config import check_bool, check_positive_int
from lightning_wd.exclusion import check_patterns, matches
from lightning_wd.naming import group_names, is_logging_step, module_name, optimizer_names, parameter_name
from lightning_wd.stepping import StepHooks

__all__ = ["Reported", "StepCallback", "check_selection", "to_host"]


def check_selection(per_parameter: Any, per_module: Any, per_group: Any) -> tuple[bool | list[str], int | None, bool]:
    """The checked selection arguments of a monitor: ``per_parameter`` a bool or a list of name patterns,
    ``per_module`` a depth (int >= 1) or None, ``per_group`` a bool; at least one of them selects something."""
    if isinstance(per_parameter, bool):
        parameters: bool | list[str] = per_parameter
    elif isinstance(per_parameter, str):  # "False" from a config is not False: refused, not read as one pattern
        raise TypeError(f"`per_parameter` must be True, False or a list of name patterns, got the string"
                        f" {per_parameter!r}.")
    else:
        parameters = check_patterns(per_parameter, "per_parameter")
    module = check_positive_int("per_module", per_module)
    group = check_bool("per_group", per_group)
    if not (parameters or module or group):
        raise ValueError("Nothing to log: `per_parameter`, `per_module` and `per_group` select nothing.")
    return parameters, module, bool(group)


@dataclass(frozen=True)
class Reported:
    """How a monitor reports one parameter: its key ``name``, whether it has keys of its own, its module aggregate."""

    name: str
    own: bool
    module: str | None


def to_host(tensors: Sequence[Tensor]) -> list[list[float]]:
    """The values of ``tensors`` (1-D), in one device-to-host transfer per device (each a sync of that device)."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_device[t.device].append(i)
    out: list[list[float]] = [[] for _ in tensors]
    for index in by_device.values():
        flat = [tensors[i].reshape(-1).float() for i in index]
        # one tensor (a monitor's usual case): read as is, without a `cat` that would copy it first
        values = (flat[0] if len(flat) == 1 else torch.cat(flat)).tolist()
        start = 0
        for i in index:
            n = tensors[i].numel()
            out[i] = values[start : start + n]
            start += n
    return out


class StepCallback(Callback):
    """The base of the callbacks: set up at fit start, torn down at fit end or on an exception.

    Args:
        log_every_n_steps: log every this many optimizer steps; ``None`` follows ``Trainer(log_every_n_steps=...)``.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        self.log_every_n_steps = check_positive_int("log_every_n_steps", log_every_n_steps)
        self._trainer: pl.Trainer | None = None
        self._optimizers: list[Optimizer] = []
        self._optimizer_names: dict[int, str] = {}
        self._armed: list[tuple[StepHooks, Any]] = []

    # --- set-up and teardown -------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._teardown()
        self._trainer = trainer
        optimizers = [o for o in trainer.optimizers if not isinstance(o, _MockOptimizer)]
        names = optimizer_names(optimizers, trainer.lr_scheduler_configs)
        self._optimizers = [unwrap_optimizer(o) for o in optimizers]
        self._optimizer_names = {id(o): n for o, n in zip(self._optimizers, names)}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._teardown()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._teardown()

    def _teardown(self) -> None:
        self._disarm()

    # --- logging steps, listeners and loggers --------------------------------------------------------------------
    def _logging_batch(self) -> bool:
        return self._trainer is not None and is_logging_step(self._trainer, self.log_every_n_steps)

    def _arm(self, optimizer: Optimizer, listener: Any) -> None:
        hooks = StepHooks.of(optimizer)
        hooks.add(listener)
        self._armed.append((hooks, listener))

    def _disarm(self) -> None:
        for hooks, listener in self._armed:
            hooks.remove(listener)
        self._armed = []

    def _group_key(self, optimizer: Optimizer, index: int) -> str:
        """``{optimizer}/{group}`` of param group ``index`` (see :mod:`lightning_wd.naming`)."""
        return f"{self._optimizer_names.get(id(optimizer), type(optimizer).__name__)}/{group_names(optimizer)[index]}"

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Log ``metrics`` through every logger, from rank 0, at the step Lightning's own logs use."""
        if metrics and trainer.is_global_zero:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)


def reported_parameters(pl_module: pl.LightningModule, per_parameter: bool | list[str],
                        per_module: int | None) -> dict[int, Reported]:
    """How a monitor reports each parameter of ``pl_module`` (by ``id``): keys of its own where ``per_parameter`` is
    True or one of its patterns matches the name (with or without ``_orig_mod.``), and its module aggregate at depth
    ``per_module``. A tensor shared by several modules (tied weights) is reported once, under its first name."""
    out: dict[int, Reported] = {}
    for name, p in pl_module.named_parameters():
        if id(p) in out:
            continue
        own = per_parameter if isinstance(per_parameter, bool) else any(matches(name, pat) for pat in per_parameter)
        module = module_name(name, per_module) if per_module else None
        out[id(p)] = Reported(parameter_name(name), own, module)
    return out
