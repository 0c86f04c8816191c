"""The ``EffectiveLRMonitor`` callback: Lightning glue around :mod:`lightning_wd.effective_lr`."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import _MockOptimizer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_wd.decay import local_tensor
from lightning_wd.effective_lr import (
    STATS,
    adam_partial_stats,
    combine_partials,
    effective_lr_from_state,
    make_scratch,
    stats_from_partials,
)
from lightning_wd.naming import optimizer_names

SUPPORTED = (torch.optim.Adam, torch.optim.AdamW)


def _shard_groups(p: Tensor) -> tuple[Any, ...]:
    """The process groups over which the ``DTensor`` ``p`` is sharded; ``()`` for a whole tensor."""
    placements = getattr(p, "placements", None)
    if placements is None or not dist.is_available() or not dist.is_initialized():
        return ()
    mesh = p.device_mesh
    return tuple(mesh.get_group(d) for d, pl_ in enumerate(placements) if pl_.is_shard())


class EffectiveLRMonitor(Callback):
    r"""Log the learning rate that Adam and AdamW (AMSGrad too) really apply, per parameter and per param group.

    Adam's update is :math:`p \leftarrow p - \eta\, \hat m / (\sqrt{\hat v} + \epsilon)`; the effective learning
    rate of each element is :math:`\eta / (\sqrt{\hat v} + \epsilon)` (with ``max_exp_avg_sq`` as :math:`v` under
    AMSGrad). On each logging step the callback summarizes it, right after the optimizer step, with the lr that
    step used, and logs through ``trainer.loggers``:

    - ``effective_lr/{param_name}/{min,max,mean,median}`` for every parameter (``named_parameters()`` names);
    - ``effective_lr/{optimizer}/pg{i}/{min,max,mean,median}`` over all elements of param group ``i``;
    - with ``log_histogram=True``, a TensorBoard histogram ``effective_lr/{param_name}/log10``.

    ``{optimizer}`` is the class name, with ``-k`` for its k-th repeat (``Adam``, ``Adam-1``). Nothing is computed
    on other steps; on a logging step the statistics are computed on the device and reach the host in one transfer,
    and each parameter is worked through in chunks of :func:`lightning_wd.effective_lr.chunk_elements` elements in two
    scratch buffers reused for all parameters, so the extra memory does not grow with the largest parameter.
    ``min``, ``max`` and ``mean`` are exact; ``median`` is the lower median read from a histogram of ``v_hat`` (64
    bins per power of two, read off the fp32 bits), within a relative error of
    :func:`lightning_wd.effective_lr.histogram_median_rel_error` (0.39%): an exact median costs a sort or a
    selection per parameter, several times the rest of the work. For parameters sharded across processes (FSDP2
    ``DTensor``) the statistics are over the whole parameter: every rank takes part in the reduction of the
    partial statistics of its shards. Only rank 0's loggers write.

    An element that has never had a gradient (``v = 0``) has the effective lr ``lr / eps``; such elements show up in
    ``max`` and pull up ``mean``, so ``median`` is usually the statistic to watch. Optimizers other than
    ``torch.optim.Adam``/``AdamW`` get one warning naming them and are skipped.

    Args:
        log_every_n_steps: log every this many optimizer steps; ``None`` follows ``Trainer(log_every_n_steps=...)``.
        per_parameter: log the statistics of each parameter.
        per_group: log the statistics of each param group.
        log_histogram: also log a histogram of ``log10(effective lr)`` per parameter to TensorBoard loggers.

    Raises:
        ValueError: if ``log_every_n_steps`` is not a positive int or None, or nothing is selected to log.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_wd import EffectiveLRMonitor
        >>> trainer = Trainer(callbacks=[EffectiveLRMonitor(log_every_n_steps=10)])
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        per_parameter: bool = True,
        per_group: bool = True,
        log_histogram: bool = False,
    ) -> None:
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(f"`log_every_n_steps` must be a positive int or None, got {log_every_n_steps!r}.")
        if not (per_parameter or per_group):
            raise ValueError("At least one of `per_parameter` and `per_group` must be True.")
        self.log_every_n_steps = log_every_n_steps
        self.per_parameter = per_parameter
        self.per_group = per_group
        self.log_histogram = log_histogram
        self._names: dict[int, str] = {}
        self._handles: list[RemovableHandle] = []
        self._pending: list[tuple[list[str], Tensor]] = []
        self._histograms: list[tuple[str, Tensor]] = []
        self._trainer: pl.Trainer | None = None

    # --- set-up -------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._trainer = trainer
        self._names = {id(p): name for name, p in pl_module.named_parameters()}
        optimizers = [o for o in trainer.optimizers if not isinstance(o, _MockOptimizer)]  # no optimizer configured
        unsupported = sorted({type(o).__name__ for o in optimizers if not isinstance(o, SUPPORTED)})
        if unsupported:
            rank_zero_warn(
                f"EffectiveLRMonitor skips {', '.join(unsupported)}: it reads the state of torch.optim.Adam and"
                " AdamW (amsgrad on or off) only. For SGD the effective lr is the lr itself: use LearningRateMonitor."
            )
        for name, opt in zip(optimizer_names(optimizers), optimizers):
            if isinstance(opt, SUPPORTED):
                self._handles.append(opt.register_step_post_hook(self._make_hook(name)))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pending.clear()
        self._histograms.clear()

    # --- on each optimizer step ---------------------------------------------------------------------------------
    def _should_log(self) -> bool:
        trainer = self._trainer
        if trainer is None or not trainer.loggers:  # the same on every rank, so no rank skips a collective
            return False
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if not every:
            return False
        # `+ 1`: the step counter moves on after this batch, as in Lightning's own `should_update_logs`
        return (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0

    def _make_hook(self, opt_name: str) -> Any:
        def hook(optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
            if self._should_log():
                with torch.no_grad():
                    self._collect(opt_name, optimizer)

        return hook

    def _collect(self, opt_name: str, optimizer: Optimizer) -> None:
        for gi, group in enumerate(optimizer.param_groups):
            params = [p for p in group["params"] if "exp_avg_sq" in optimizer.state.get(p, {})]
            if not params:
                continue
            states = [{k: local_tensor(v) if isinstance(v, Tensor) else v for k, v in optimizer.state[p].items()}
                      for p in params]
            # one row of reducible partials (min and max of v_hat, sum of the rate, count, v_hat histogram) per
            # parameter, all computed in the same chunk-sized scratch buffers
            largest: dict[torch.device, int] = defaultdict(int)
            for s in states:
                v = s["exp_avg_sq"]
                largest[v.device] = max(largest[v.device], v.numel())
            scratch = {d: make_scratch(n, d) for d, n in largest.items()}
            device = next(iter(largest))  # `.to(device)`: a no-op unless the group spans devices
            partials = torch.stack([adam_partial_stats(s, group, scratch[s["exp_avg_sq"].device]).to(device)
                                    for s in states])
            effs = [effective_lr_from_state(s, group) for s in states] if self.log_histogram else []
            self._reduce_shards(params, partials)
            lr, eps = group["lr"], group["eps"]
            prefix = f"effective_lr/{opt_name}/pg{gi}"
            names = [self._names.get(id(p), f"{opt_name}/pg{gi}/param{i}") for i, p in enumerate(params)]
            # the rows of the parameters and of the whole group, summarized by one call
            rows, keys = [], []
            if self.per_parameter:
                rows.append(partials)
                keys += [f"effective_lr/{n}/{s}" for n in names for s in STATS]
            if self.per_group:
                rows.append(combine_partials(partials).unsqueeze(0))
                keys += [f"{prefix}/{s}" for s in STATS]
            self._pending.append((keys, stats_from_partials(torch.cat(rows), lr, eps).flatten()))
            if self.log_histogram:
                self._histograms.extend(
                    (f"effective_lr/{n}/log10", e) for n, p, e in zip(names, params, effs) if not _shard_groups(p)
                )

    @staticmethod
    def _reduce_shards(params: list[Tensor], partials: Tensor) -> None:
        """Turn the rows of sharded parameters (FSDP2 ``DTensor``) into the partials of the whole parameter.

        Every rank holds the same parameters in the same order, so every rank makes the same collectives, also
        when its shard is empty (its partials are then the identities). Whole (replicated) parameters are left out:
        summing them across ranks would count them once per rank.
        """
        groups = [_shard_groups(p) for p in params]
        rows = [i for i, g in enumerate(groups) if g]
        if not rows:
            return
        index = torch.tensor(rows, device=partials.device)
        sub = partials.index_select(0, index)
        mins, maxs, sums = sub[:, :1].contiguous(), sub[:, 1:2].contiguous(), sub[:, 2:].contiguous()
        for pg in groups[rows[0]]:  # the parameters of one model share one mesh
            dist.all_reduce(mins, op=dist.ReduceOp.MIN, group=pg)
            dist.all_reduce(maxs, op=dist.ReduceOp.MAX, group=pg)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=pg)
        partials.index_copy_(0, index, torch.cat([mins, maxs, sums], dim=1))

    # --- after the batch: one transfer, then the loggers ---------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._pending and not self._histograms:
            return
        by_device: dict[torch.device, list[tuple[list[str], Tensor]]] = defaultdict(list)
        for keys, values in self._pending:
            by_device[values.device].append((keys, values))
        metrics: dict[str, float] = {}
        for entries in by_device.values():
            values = torch.cat([v for _, v in entries]).tolist()  # the one device-to-host transfer
            keys = [k for ks, _ in entries for k in ks]
            metrics.update(zip(keys, values))
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
                if isinstance(logger, TensorBoardLogger):
                    for tag, e in self._histograms:
                        logger.experiment.add_histogram(tag, torch.log10(e.float()), global_step=step)
        self._pending.clear()
        self._histograms.clear()
