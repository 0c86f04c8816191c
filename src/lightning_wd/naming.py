"""Names under which the callbacks log, shared so that both follow one documented scheme."""

from __future__ import annotations

from collections.abc import Sequence

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
