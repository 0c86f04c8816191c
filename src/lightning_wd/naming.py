"""Names under which the callbacks log, and the steps at which the monitors log, shared so that all follow one
documented scheme."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.optim import Optimizer


def optimizer_names(optimizers: Sequence[Optimizer]) -> list[str]:
    """``["Adam", "SGD", "Adam-1"]``: the class name, with ``-k`` on its k-th repeat (as LearningRateMonitor does)."""
    seen: dict[str, int] = {}
    names = []
    for opt in optimizers:
        cls = type(opt).__name__
        k = seen.get(cls, 0)
        seen[cls] = k + 1
        names.append(cls if k == 0 else f"{cls}-{k}")
    return names


def is_logging_step(trainer: Any, every: int | None) -> bool:
    """Whether the optimizer step in progress is a monitor's logging step: every ``every`` steps, else every
    ``trainer.log_every_n_steps``, and only with loggers; the same on every rank, so that no rank skips a
    collective, and the same for every monitor, so that their numbers come from the same steps."""
    if not trainer.loggers:
        return False
    every = every or trainer.log_every_n_steps
    # `+ 1`: the step counter moves on after this batch, as in Lightning's own `should_update_logs`
    return bool(every) and (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0
