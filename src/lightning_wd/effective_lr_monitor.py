"""The ``EffectiveLRMonitor`` callback: Lightning glue around :mod:`lightning_wd.effective_lr`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.callback_base import Reported, StepCallback, check_selection, reported_parameters, to_host
from lightning_wd.config import check_bool
from lightning_wd.decay import local_tensor
from lightning_wd.effective_lr import (
    STATS,
    Partials,
    effective_lr,
    fused_kernel_available,
    fused_kernel_enabled,
    fused_kernel_takes,
    rate_statistics,
)
from lightning_wd.optimizers import formula_for
from lightning_wd.rates import Formula, RateSpec
from lightning_wd.sharding import check_no_fsdp1, shard_groups

__all__ = ["EffectiveLRMonitor"]


def _all_reduce(partials: Partials, groups: tuple[Any, ...]) -> None:
    """The partials of whole parameters from those of every rank's shards: min and max by one ``MAX`` (of
    ``[-min, max]``), the sums, counts and histograms by one ``SUM``, per process group of the sharding."""
    ext, sums = partials
    ext[:, 0].neg_()
    for pg in groups:
        dist.all_reduce(ext, op=dist.ReduceOp.MAX, group=pg)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=pg)
    ext[:, 0].neg_()


class _Listener:
    """Collects one optimizer's statistics right after its step (:class:`lightning_wd.stepping.StepHooks`)."""

    priority = 0

    def __init__(self, monitor: EffectiveLRMonitor, formula: Formula) -> None:
        self.monitor, self.formula = monitor, formula

    @torch.no_grad()
    def on_end(self, optimizer: Optimizer) -> None:
        self.monitor._collect(optimizer, self.formula)


class EffectiveLRMonitor(StepCallback):
    r"""Log the learning rate that adaptive optimizers really apply to each element: per param group, per module
    aggregate, per parameter.

    Adam's update is :math:`p \leftarrow p - \eta\, \hat m / (\sqrt{\hat v} + \epsilon)`; the effective learning
    rate of each element is :math:`\eta / (\sqrt{\hat v} + \epsilon)` (with ``max_exp_avg_sq`` as :math:`v` under
    AMSGrad), the factor of :math:`\hat m` in the update. Every torch optimizer with such a per-element rate is
    covered (Adam, AdamW, AMSGrad, NAdam, RAdam, Adamax, RMSprop, Adagrad, Adafactor, SparseAdam) and the Adam
    variants of the registry (:mod:`lightning_wd.optimizers`), each with its own formula. On each logging step the
    callback summarizes the rate right after the optimizer step, with the lr that step used, and logs through
    ``trainer.loggers`` (rank 0), under the names of :mod:`lightning_wd.naming`:

    ===========================================  =====================================================================
    key                                          meaning
    ===========================================  =====================================================================
    ``effective_lr/{optimizer}/{group}/{stat}``  over all elements of the param group (``per_group``, the default)
    ``effective_lr/{module}/{stat}``             over the parameters of a module aggregate (``per_module``)
    ``effective_lr/{param}/{stat}``              over the elements of one parameter (``per_parameter``)
    ``effective_lr/{param}/log10``               a TensorBoard histogram of ``log10`` of the rate (``log_histogram``)
    ===========================================  =====================================================================

    ``{stat}`` is ``min``, ``max``, ``mean`` and ``median``: ``min``, ``max`` and ``mean`` exact, ``median`` the lower
    median read from a histogram of the rate (128 bins per power of two), within a relative error of
    :func:`lightning_wd.effective_lr.histogram_median_rel_error` (0.39%). An element that has never had a gradient
    (``v = 0``) has the rate ``lr / eps``: such elements show up in ``max`` and pull up ``mean``, so ``median`` is
    usually the statistic to watch. Complex parameters count their real and imaginary parts as the elements they
    are to the optimizer.

    Nothing is computed on other steps (the step listener is armed for logging batches only). On a logging step the
    statistics are computed on the device (on a CUDA GPU by a Triton kernel, :func:`~lightning_wd.effective_lr.
    fused_kernel_available`; elsewhere by torch ops, chunk by chunk in one scratch buffer) and reach the host in one
    transfer; the extra memory grows neither with the largest parameter nor with the number of parameters. Under
    FSDP2 the statistics are over the whole parameter: every rank takes part in reducing its shards'.
    Optimizers without a per-element rate (SGD, Lion, Muon, LBFGS, ...) and optimizers the library has no formula for
    get one warning naming them and are skipped.

    Args:
        log_every_n_steps: log every this many optimizer steps; ``None`` follows ``Trainer(log_every_n_steps=...)``.
        per_parameter: ``False`` (default): no keys per parameter; ``True``: for every parameter; a list of
            ``fnmatch`` patterns: for the parameters whose names match (as ``WeightDecay``'s ``exclude``).
        per_group: keys per param group (default ``True``).
        log_histogram: also log a histogram of ``log10(effective lr)`` of each parameter reported on its own to
            TensorBoard loggers (this makes a parameter-sized tensor per parameter and moves it to the host).
        per_module: aggregate the parameters by module, at this depth of their names (``2``: ``blocks.0``,
            ``blocks.1``, ...); ``None`` (default): no module keys.

    Raises:
        ValueError: if ``log_every_n_steps`` or ``per_module`` is not a positive int or None, or nothing is selected.
        TypeError: if ``per_parameter`` is neither a bool nor a list of patterns, or a flag is not a bool.
        MisconfigurationException: at fit start, under Lightning's ``strategy="fsdp"`` (FSDP1), whose shards carry
            no record of the parameter they belong to.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_wd import EffectiveLRMonitor
        >>> trainer = Trainer(callbacks=[EffectiveLRMonitor(per_parameter=["*.attn.*"], log_every_n_steps=10)])
    """

    def __init__(self, log_every_n_steps: int | None = None, per_parameter: bool | Sequence[str] = False,
                 per_group: bool = True, log_histogram: bool = False, per_module: int | None = None) -> None:
        super().__init__(log_every_n_steps)
        self.per_parameter, self.per_module, self.per_group = check_selection(per_parameter, per_module, per_group)
        self.log_histogram = check_bool("log_histogram", log_histogram)
        self._reported: dict[int, Reported] = {}
        self._listeners: list[tuple[Optimizer, _Listener]] = []
        self._pending: list[tuple[list[str | None], Tensor]] = []
        self._histograms: list[tuple[str, Tensor]] = []
        self._checked_pass: set[str] = set()  # the groups whose pass was looked at this fit (once each)

    # --- set-up -------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_no_fsdp1("EffectiveLRMonitor", trainer.strategy, pl_module)
        super().on_fit_start(trainer, pl_module)
        self._reported = reported_parameters(pl_module, self.per_parameter, self.per_module)
        self._listeners = []
        self._checked_pass = set()
        skipped: dict[str, str] = {}  # what is skipped -> why
        for opt in self._optimizers:
            found, cls = formula_for(opt), type(opt).__name__
            if found is None:
                skipped[cls] = "no effective-lr formula is known for it (lightning_wd.optimizers' registry)"
            elif found[1].spec is None:
                skipped[cls] = found[1].note
            else:
                if not found[1].sharded and any(shard_groups(p) for g in opt.param_groups for p in g["params"]):
                    skipped[f"{cls}'s sharded (FSDP2) parameters"] = "its rate needs the whole parameter"
                self._listeners.append((opt, _Listener(self, found[1])))
        if skipped:
            what = "; ".join(f"{c} ({why})" for c, why in sorted(skipped.items()))
            rank_zero_warn(f"EffectiveLRMonitor skips {what}.")
        if self._listeners and pl_module.device.type == "cuda" and not fused_kernel_available(pl_module.device):
            rank_zero_info(  # said once: the eager pass costs a multiple of an optimizer step there
                "EffectiveLRMonitor: " + ("the fused Triton kernel is switched off (fused_kernel_disabled()), so"
                                          if not fused_kernel_enabled() else "Triton is not installed, so")
                + " a logging step computes its statistics with torch ops, many times slower on a GPU."
            )

    def _teardown(self) -> None:
        super()._teardown()
        self._pending.clear()
        self._histograms.clear()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._disarm()
        if self._logging_batch():
            for opt, listener in self._listeners:
                self._arm(opt, listener)

    # --- right after a logging step ------------------------------------------------------------------------------
    def _collect(self, optimizer: Optimizer, formula: Formula) -> None:
        assert formula.spec is not None
        for gi, group in enumerate(optimizer.param_groups):
            specs, shards, reported = self._specs(optimizer, formula, gi, group)
            if not specs:
                continue
            modules = sorted({r.module for r in reported if r.module is not None})
            buckets = [modules.index(r.module) if r.module is not None else None for r in reported]
            own = [r.own for r in reported]
            self._say_if_eager(optimizer, gi, specs)
            values = rate_statistics(specs, any(own), self.per_group, shards, _all_reduce, buckets, len(modules))
            # every row goes to the host (16 bytes each); those not selected are dropped there: picking rows on the
            # device would need an index tensor made from host data, a synchronizing copy on a GPU
            names = [r.name if o else None for r, o in zip(reported, own)] if any(own) else []
            names += modules + [self._group_key(optimizer, gi)] * self.per_group
            self._pending.append(([None if n is None else f"effective_lr/{n}/{s}" for n in names for s in STATS],
                                  values.flatten()))
            if self.log_histogram:
                self._histograms.extend((f"effective_lr/{r.name}/log10", effective_lr(spec))
                                        for r, spec, sharded in zip(reported, specs, shards) if r.own and not sharded)

    def _say_if_eager(self, optimizer: Optimizer, gi: int, specs: list[RateSpec]) -> None:
        """Once per group and fit, at its first logging step: where the fused pass runs but cannot take some of the
        group's rates, say that the group takes the eager pass, and what that costs there."""
        key = self._group_key(optimizer, gi)
        if key in self._checked_pass:
            return
        self._checked_pass.add(key)
        if not fused_kernel_available(specs[0].device):
            return  # no fused pass there at all: said at fit start on a GPU
        devices = {s.device for s in specs}
        untaken = sum(not fused_kernel_takes(s) for s in specs)
        if len(devices) > 1:  # the kernels work on one device per call (a group spread over devices by hand)
            why = (f"the {len(specs)} parameters of {key} are on {len(devices)} devices and the kernel works on one"
                   " at a time")
        elif untaken:
            why = (f"the fused Triton kernel cannot take the rates of {untaken} of the {len(specs)} parameters of"
                   f" {key} ({type(optimizer).__name__}'s formula gives a scale or eps that is neither a number nor"
                   " a 0-dim float tensor on the state's device)")
        else:
            return
        rank_zero_info(
            f"EffectiveLRMonitor: {why}, so this group's statistics are computed with torch ops, many times slower"
            " on a GPU: a logging step may cost several optimizer steps. Log less often (log_every_n_steps) if that"
            " shows in the fit time."
        )

    def _specs(self, optimizer: Optimizer, formula: Formula, gi: int, group: dict[str, Any]
               ) -> tuple[list[RateSpec], list[Any], list[Reported]]:
        index, states, params, shards = [], [], [], []
        for i, p in enumerate(group["params"]):
            state = optimizer.state.get(p)
            groups = shard_groups(p)
            if not state or (groups and not formula.sharded):
                continue
            index.append(i)
            states.append({k: local_tensor(v) if isinstance(v, Tensor) else v for k, v in state.items()})
            params.append(local_tensor(p))
            # whole (replicated) parameters are left out of the reduction: summed across ranks they would count
            # once per rank
            shards.append(groups or None)
        kept: tuple[list[RateSpec], list[Any], list[Reported]] = ([], [], [])
        for i, spec, sharded in zip(index, formula.specs(states, group, params), shards):
            if spec is None:
                continue
            kept[0].append(spec)
            kept[1].append(sharded)
            reported = self._reported.get(id(group["params"][i]))
            if reported is None:  # a parameter the module does not name
                reported = Reported(f"{self._group_key(optimizer, gi)}/param{i}", bool(self.per_parameter), None)
            kept[2].append(reported)
        return kept

    # --- after the batch: one transfer, then the loggers ---------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._disarm()
        if not self._pending and not self._histograms:
            return
        values = to_host([v for _, v in self._pending])
        metrics = {k: v for (keys, _), vs in zip(self._pending, values) for k, v in zip(keys, vs) if k is not None}
        self._log(trainer, metrics)
        if trainer.is_global_zero and self._histograms:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    for tag, e in self._histograms:
                        logger.experiment.add_histogram(tag, torch.log10(e.float()), global_step=step)
        self._pending.clear()
        self._histograms.clear()
