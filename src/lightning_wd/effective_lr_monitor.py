"""The ``EffectiveLRMonitor`` callback: Lightning glue around :mod:`lightning_wd.effective_lr`."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_wd.decay import local_tensor
from lightning_wd.effective_lr import (
    STATS,
    Formula,
    Partials,
    RateSpec,
    effective_lr,
    fused_kernel_available,
    rate_statistics,
)
from lightning_wd.naming import is_logging_step, optimizer_names
from lightning_wd.optimizers import formula_for


def _shard_groups(p: Tensor) -> tuple[Any, ...]:
    """The process groups over which the ``DTensor`` ``p`` is sharded; ``()`` for a whole tensor."""
    placements = getattr(p, "placements", None)
    if placements is None or not dist.is_available() or not dist.is_initialized():
        return ()
    mesh = p.device_mesh
    return tuple(mesh.get_group(d) for d, pl_ in enumerate(placements) if pl_.is_shard())


def _all_reduce(partials: Partials, groups: tuple[Any, ...]) -> None:
    """The partials of whole parameters from those of every rank's shards: min and max by one ``MAX`` (of
    ``[-min, max]``), the sums, counts and histograms by one ``SUM``, per process group of the sharding."""
    ext, sums = partials
    ext[:, 0].neg_()
    for pg in groups:
        dist.all_reduce(ext, op=dist.ReduceOp.MAX, group=pg)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=pg)
    ext[:, 0].neg_()


class EffectiveLRMonitor(Callback):
    r"""Log the learning rate that adaptive optimizers really apply to each element, per parameter and per param
    group.

    Adam's update is :math:`p \leftarrow p - \eta\, \hat m / (\sqrt{\hat v} + \epsilon)`; the effective learning
    rate of each element is :math:`\eta / (\sqrt{\hat v} + \epsilon)` (with ``max_exp_avg_sq`` as :math:`v` under
    AMSGrad), the factor of :math:`\hat m` in the update. Every torch optimizer with such a per-element rate is
    covered: Adam, AdamW, AMSGrad, NAdam, RAdam, Adamax, RMSprop, Adagrad, Adafactor and SparseAdam, each with its own
    formula (its entry in :mod:`lightning_wd.optimizers`). On each logging step the callback summarizes the rate,
    right after the optimizer step, with the lr that step used, and logs through ``trainer.loggers``:

    - ``effective_lr/{param_name}/{min,max,mean,median}`` for every parameter (``named_parameters()`` names);
    - ``effective_lr/{optimizer}/pg{i}/{min,max,mean,median}`` over all elements of param group ``i``;
    - with ``log_histogram=True``, a TensorBoard histogram ``effective_lr/{param_name}/log10``.

    ``{optimizer}`` is the class name, with ``-k`` for its k-th repeat (``Adam``, ``Adam-1``). Nothing is computed
    on other steps; on a logging step the statistics are computed on the device and reach the host in one transfer.
    On a CPU each state is read once by a fused C kernel (:func:`lightning_wd.effective_lr.fused_kernel_available`);
    otherwise each parameter is worked through in chunks of :func:`lightning_wd.effective_lr.chunk_elements`
    elements in one scratch buffer. Either way it is reduced to its four numbers a block of parameters at a time, so
    the extra memory grows neither with the largest parameter nor with the number of parameters (but for the 16 bytes
    per parameter of the logged numbers). ``min``, ``max`` and ``mean`` are exact; ``median`` is the lower median
    read from a histogram of the rate (128 bins per power of two, read off the fp32 bits), within a relative error of
    :func:`lightning_wd.effective_lr.histogram_median_rel_error` (0.39%): an exact median costs a sort or a
    selection per parameter, several times the rest of the work. For parameters sharded across processes (FSDP2
    ``DTensor``) the statistics are over the whole parameter: every rank takes part in the reduction of the
    partial statistics of its shards. Only rank 0's loggers write.

    An element that has never had a gradient (``v = 0``) has the effective lr ``lr / eps``; such elements show up in
    ``max`` and pull up ``mean``, so ``median`` is usually the statistic to watch. Optimizers without a per-element
    rate (SGD, ASGD, Rprop, Adadelta, Muon, LBFGS) and optimizers the library has no formula for get one warning
    naming them and are skipped.

    Args:
        log_every_n_steps: log every this many optimizer steps; ``None`` follows ``Trainer(log_every_n_steps=...)``.
        per_parameter: log the statistics of each parameter.
        per_group: log the statistics of each param group.
        log_histogram: also log a histogram of ``log10(effective lr)`` per parameter to TensorBoard loggers (this
            makes a parameter-sized tensor per parameter and moves it to the host).

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
        skipped: dict[str, str] = {}  # what is skipped -> why
        for name, opt in zip(optimizer_names(trainer.optimizers), trainer.optimizers):
            if not opt.param_groups:  # Lightning's stand-in when `configure_optimizers` returns None
                continue
            found = formula_for(opt)
            cls = type(opt).__name__
            if found is None:
                skipped[cls] = "no effective-lr formula is known for it (lightning_wd.optimizers' registry)"
            elif found[1].spec is None:
                skipped[cls] = found[1].note
            else:
                formula = found[1]
                if not formula.sharded and any(_shard_groups(p) for g in opt.param_groups for p in g["params"]):
                    skipped[f"{cls}'s sharded (FSDP2) parameters"] = "its rate needs the whole parameter"
                self._handles.append(opt.register_step_post_hook(self._make_hook(name, formula)))
        if skipped:
            what = "; ".join(f"{cls} ({why})" for cls, why in sorted(skipped.items()))
            rank_zero_warn(f"EffectiveLRMonitor skips {what}.")
        if self._handles and not fused_kernel_available() and pl_module.device.type == "cpu":
            # pip shows the optional extension's failed build only with -v: say once what it costs
            rank_zero_info(
                "EffectiveLRMonitor: the fused CPU kernel (the optional C extension lightning_wd._rate_kernel) was not"
                " built, so a logging step computes its statistics with torch ops, about twice the time. Reinstall"
                " lightning-wd with a C compiler available to build it."
            )

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
        return self._trainer is not None and is_logging_step(self._trainer, self.log_every_n_steps)

    def _make_hook(self, opt_name: str, formula: Formula) -> Any:
        def hook(optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
            if self._should_log():
                with torch.no_grad():
                    self._collect(opt_name, optimizer, formula)

        return hook

    def _collect(self, opt_name: str, optimizer: Optimizer, formula: Formula) -> None:
        assert formula.spec is not None
        for gi, group in enumerate(optimizer.param_groups):
            specs: list[RateSpec] = []
            names: list[str] = []
            shards: list[tuple[Any, ...] | None] = []
            for i, p in enumerate(group["params"]):
                state = optimizer.state.get(p)
                groups = _shard_groups(p)
                if not state or (groups and not formula.sharded):
                    continue
                local = {k: local_tensor(v) if isinstance(v, Tensor) else v for k, v in state.items()}
                spec = formula.spec(local, group, local_tensor(p))
                if spec is None:
                    continue
                specs.append(spec)
                names.append(self._names.get(id(p), f"{opt_name}/pg{gi}/param{i}"))
                # whole (replicated) parameters are left out of the reduction: summed across ranks they would
                # count once per rank
                shards.append(groups or None)
            if not specs:
                continue
            values = rate_statistics(specs, self.per_parameter, self.per_group, shards, _all_reduce)
            keys = [f"effective_lr/{n}/{s}" for n in names for s in STATS] if self.per_parameter else []
            if self.per_group:
                keys += [f"effective_lr/{opt_name}/pg{gi}/{s}" for s in STATS]
            self._pending.append((keys, values.flatten()))
            if self.log_histogram:
                self._histograms.extend(
                    (f"effective_lr/{n}/log10", effective_lr(spec))
                    for n, spec, sharded in zip(names, specs, shards) if sharded is None
                )

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
