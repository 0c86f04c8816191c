"""Parameters sharded across processes, for the monitors: a statistic of a sharded parameter is a statistic of the
whole parameter, which every rank takes part in reducing.

FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) hands the optimizer ``DTensor`` parameters whose
placements say over which process groups they are sharded: the monitors reduce over those. Lightning's
``strategy="fsdp"`` (FSDP1) hands it plain views of each rank's part of a flat shard, which carry no such record: the
monitors refuse it by name (:func:`check_no_fsdp1`) rather than report rank 0's part as if it were the whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["check_no_fsdp1", "is_fsdp1", "shard_groups", "sum_over_shards_"]


def shard_groups(p: Tensor) -> tuple[Any, ...]:
    """The process groups over which the ``DTensor`` ``p`` is sharded; ``()`` for a whole tensor."""
    placements = getattr(p, "placements", None)
    if placements is None or not dist.is_available() or not dist.is_initialized():
        return ()
    mesh = p.device_mesh
    return tuple(mesh.get_group(d) for d, placement in enumerate(placements) if placement.is_shard())


def sum_over_shards_(squares: Tensor, params: Sequence[Tensor]) -> None:
    """Sum the entries of ``squares`` that belong to sharded parameters (FSDP2 ``DTensor``) over the shards, in place.

    ``squares[i]`` is a squared norm of the local shard of ``params[i]`` (a parameter may be listed more than once,
    for its weights and its gradient). Entries of whole (unsharded or replicated) parameters are left alone: summing
    them across ranks would count them once per rank. Every rank holds the same parameters in the same order, so
    every rank makes the same collectives, one ``all_reduce`` per process group, also where its shard is empty. The
    rows are picked by integer indexing, not with an index tensor made from host data (a host-to-device copy, which
    synchronizes on CUDA).
    """
    if not dist.is_available() or not dist.is_initialized():
        return  # one process: nothing is sharded (what `shard_groups` finds for each parameter, without the loop)
    by_groups: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(params):
        groups = shard_groups(p)
        if groups:
            by_groups.setdefault(groups, []).append(i)
    for groups, rows in by_groups.items():
        whole = len(rows) == squares.numel()  # the usual FSDP2 case: every entry is sharded alike
        sub = squares if whole else torch.stack([squares[i] for i in rows])
        for pg in groups:  # sharded over several mesh dimensions: summed over each in turn
            dist.all_reduce(sub, op=dist.ReduceOp.SUM, group=pg)
        if not whole:
            for k, i in enumerate(rows):
                squares[i] = sub[k]


def is_fsdp1(strategy: Any, module: nn.Module) -> bool:
    """Whether the run is sharded by FSDP1: Lightning's ``FSDPStrategy``, or a ``FullyShardedDataParallel`` module
    (FSDP1's own wrapper) in the model."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        return True
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def check_no_fsdp1(who: str, strategy: Any, module: nn.Module) -> None:
    """Refuse FSDP1, naming it and what to use instead (see the module docstring)."""
    if is_fsdp1(strategy, module):
        from lightning.pytorch.utilities.exceptions import MisconfigurationException

        raise MisconfigurationException(
            f"{who} does not support Lightning's strategy='fsdp' (FSDP1): the optimizer holds views of each rank's"
            " part of a flat shard, with no record of how a parameter is split, so its statistics would be those of"
            " rank 0's part, not of the parameter. Use ModelParallelStrategy with `fully_shard` (FSDP2), whose"
            f" sharded parameters {who} reduces over the ranks, or DDP."
        )
