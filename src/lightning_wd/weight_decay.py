"""The ``WeightDecay`` callback: Lightning glue around :mod:`lightning_wd.attach`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.core.optimizer import _MockOptimizer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from lightning_wd.attach import AttachedWeightDecay
from lightning_wd.exclusion import (
    COMPILED_SEGMENT,
    check_patterns,
    excluded_parameters,
    format_exclusions,
    unmatched_patterns,
)
from lightning_wd.modes import Mode, check_lr_max, check_mode, check_timescale, check_weight_decay
from lightning_wd.naming import optimizer_names
from lightning_wd.schedules import check_schedule

TIMESCALE_UNITS: tuple[str, ...] = ("run", "epochs")


class WeightDecay(Callback):
    r"""Apply each param group's weight decay yourself, decoupled (AdamW) or coupled (L2), on every optimizer step.

    Between steps the optimizer stays as you configured it: each param group keeps its ``weight_decay`` (which a
    weight-decay schedule may rewrite before any step) and its switches. For the duration of each real optimizer
    step, after backward and gradient clipping and before the update, the callback reads each group's current
    ``weight_decay`` and applies it in the chosen mode:

    - ``mode="decoupled"``: :math:`p \leftarrow p - \eta_t \lambda p`; Adam then trains exactly as AdamW.
    - ``mode="coupled"``: :math:`g \leftarrow g + \lambda p`; AdamW then trains exactly as ``Adam(weight_decay=λ)``.
    - ``mode="independent"``: :math:`p \leftarrow p - (\eta_t / \eta_{max}) \lambda p` (fully decoupled: follows
      the lr schedule, not the lr's size); ``λ_independent = η_max · λ_pytorch`` gives the same run as
      ``"decoupled"``.

    Where the optimizer implements the mode itself (AdamW in decoupled mode; Adam through its
    ``decoupled_weight_decay`` switch) it gets the decay for the step and applies it in its own kernel; otherwise the
    callback sets the group's ``weight_decay`` to 0 for the step and applies the decay in one batched pass. Steps
    that AMP's grad scaler skips are not decayed; gradient accumulation decays once per real step; LR schedulers act
    through the group's current ``lr``; param groups added during training (``BackboneFinetuning``) are taken over at
    their first step. Each group records the mode (``"lightning_wd_mode"``), so a resume in another mode warns.

    Args:
        mode: ``"decoupled"`` (default), ``"coupled"`` or ``"independent"``.
        weight_decay: one decay for every param group, written into the groups at fit start and again after a
            checkpoint is restored; ``None`` (default) keeps each group's own ``weight_decay``.
        exclude: ``fnmatch`` patterns on ``named_parameters()`` names that get no decay, e.g. ``["*.bias"]``; under
            ``torch.compile`` they also match the names without the ``_orig_mod.`` it adds.
        exclude_bias_and_norm: exclude every bias (``bias``, ``in_proj_bias``, ...) and every parameter of a
            normalization layer (found by module type: BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm).
        lr_max: reference lr of ``mode="independent"``; ``None`` takes each group's peak where its scheduler
            records one (``OneCycleLR``, ``CyclicLR``), else its initial lr.
        native: let optimizers that implement the mode themselves apply the decay in their own kernel (same result,
            no extra pass over the weights); ``False`` applies it in the separate pass for every optimizer.
        stochastic_rounding: decay bf16/fp16 weights (``precision="bf16-true"``) with stochastic rounding, so that a
            per-step decay ``lr * wd`` below the format's resolution (bf16: ``2**-8``) is not rounded away. Without
            it, such a lost decay is reported with a warning at fit start and whenever the lr makes it so.
        log_weight_decay: log the decay applied, as ``weight_decay/{optimizer}/pg{i}``, at every logging step.
            ``None`` (default) does so when a ``LearningRateMonitor(log_weight_decay=True)`` is present, so that the
            decay applied reads beside the monitor's columns.

    Raises:
        ValueError: if ``mode`` is not one of the accepted values, ``weight_decay`` is negative or not finite, or
            ``lr_max`` is not a finite number above 0.
        TypeError: if ``exclude`` holds anything but glob patterns (strings).
        MisconfigurationException: at fit start, for two ``WeightDecay`` callbacks in one Trainer; for an optimizer
            or param group whose decay cannot be given in ``mode`` (LBFGS, which evaluates its closure several
            times per step; SparseAdam in coupled mode; ...: the message says why and what to use instead); for a
            per-step decay of 1 or more; and for DeepSpeed, whose engine owns the optimizer step.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_wd import WeightDecay
        >>> # configure_optimizers returns torch.optim.Adam(..., weight_decay=0.05): it now trains as AdamW
        >>> trainer = Trainer(callbacks=[WeightDecay(mode="decoupled")])
    """

    def __init__(
        self,
        mode: Mode = "decoupled",
        weight_decay: float | None = None,
        exclude: Sequence[str] = (),
        exclude_bias_and_norm: bool = False,
        lr_max: float | None = None,
        native: bool = True,
        stochastic_rounding: bool = False,
        log_weight_decay: bool | None = None,
        schedule: Literal["cosine", "linear"] | None = None,
        weight_decay_end: float | None = None,
        uncorrected: Sequence[str] = (),
        cautious: bool = False,
        timescale: float | None = None,
        timescale_unit: Literal["run", "epochs"] = "run",
    ) -> None:
        self.mode = check_mode(mode)
        self.weight_decay = check_weight_decay(weight_decay)
        self.schedule = check_schedule(schedule, weight_decay_end)
        self.weight_decay_end = check_weight_decay(weight_decay_end)
        self.uncorrected = check_patterns(uncorrected, "uncorrected")
        if self.uncorrected and self.mode != "corrected":
            raise ValueError("`uncorrected` lists the parameters that mode='corrected' leaves uncorrected; it needs"
                             f" mode='corrected', got mode={mode!r}.")
        self.cautious = bool(cautious)
        self.timescale = check_timescale(timescale, self.mode, self.weight_decay)
        if timescale_unit not in TIMESCALE_UNITS:
            raise ValueError(f"`timescale_unit` must be one of {', '.join(map(repr, TIMESCALE_UNITS))}, got"
                             f" {timescale_unit!r}.")
        self.timescale_unit = timescale_unit
        self.exclude = check_patterns(exclude)
        self.exclude_bias_and_norm = bool(exclude_bias_and_norm)
        self.lr_max = check_lr_max(lr_max)
        self.native = bool(native)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.log_weight_decay = log_weight_decay
        self._attached: list[AttachedWeightDecay] = []
        self._log = False

    @property
    def attached(self) -> tuple[AttachedWeightDecay, ...]:
        """The attachments to the Trainer's optimizers during fit (empty before and after it)."""
        return tuple(self._attached)

    @property
    def logs_decay(self) -> bool:
        """Whether this fit logs the decay applied and its timescale (``log_weight_decay``, or a
        ``LearningRateMonitor(log_weight_decay=True)``)."""
        return self._log

    def __repr__(self) -> str:
        defaults = {"weight_decay": None, "exclude": [], "exclude_bias_and_norm": False, "lr_max": None,
                    "native": True, "stochastic_rounding": False, "log_weight_decay": None, "schedule": None,
                    "weight_decay_end": None, "uncorrected": [], "cautious": False, "timescale": None}
        args = [f"mode={self.mode!r}"] + [
            f"{k}={getattr(self, k)!r}" for k, default in defaults.items() if getattr(self, k) != default
        ]
        return f"WeightDecay({', '.join(args)})"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_strategy(trainer)
        self._check_alone(trainer)
        self._detach()
        optimizers = [opt for opt in trainer.optimizers if not isinstance(opt, _MockOptimizer)]
        if not optimizers:
            return  # `configure_optimizers` returned None: Lightning's placeholder, which never steps
        compiled = any(COMPILED_SEGMENT in name for name, _ in pl_module.named_parameters())
        for arg, patterns in (("exclude", self.exclude), ("uncorrected", self.uncorrected)):
            for pattern in unmatched_patterns(pl_module, patterns):
                rank_zero_warn(
                    f"WeightDecay: the `{arg}` pattern {pattern!r} matches no parameter name, so it selects nothing."
                    " Patterns match the names of `named_parameters()` (e.g. 'net.0.bias', '*.bias')"
                    + (", with or without the '_orig_mod.' that torch.compile adds." if compiled else ".")
                )
        excluded = excluded_parameters(pl_module, self.exclude, self.exclude_bias_and_norm)
        if self.exclude or self.exclude_bias_and_norm:
            rank_zero_info(format_exclusions(pl_module, self.exclude, self.exclude_bias_and_norm))
        uncorrected = excluded_parameters(pl_module, self.uncorrected).values()
        total = trainer.estimated_stepping_batches if self.schedule is not None or self.timescale is not None else None
        try:
            for opt in optimizers:
                attached = AttachedWeightDecay(
                    opt,
                    self.mode,
                    self.weight_decay,
                    excluded.values(),
                    self._lr_max_of(trainer, opt),
                    self.native,
                    self.stochastic_rounding,
                    schedule=self.schedule,
                    weight_decay_end=self.weight_decay_end,
                    total_steps=_steps(total) if self.schedule is not None else None,
                    uncorrected=uncorrected,
                    cautious=self.cautious,
                    timescale_steps=self._timescale_steps(trainer, total),
                )
                self._attached.append(attached)
                attached.check_decay()
        except ValueError as err:  # a refusal: nothing has stepped, and nothing stays attached
            self._detach()
            raise MisconfigurationException(f"WeightDecay({self.mode!r}) cannot train this run: {err}") from err
        nothing = self.weight_decay is None and self.timescale is None
        if nothing and all(g.get("weight_decay", 0) == 0 for o in optimizers for g in o.param_groups):
            rank_zero_warn(
                "WeightDecay found no decay to apply: every param group has `weight_decay=0` and the `weight_decay`"
                " argument is None. Set `weight_decay` in the optimizer or pass `WeightDecay(weight_decay=...)`."
            )
        monitor_wants_wd = any(
            isinstance(cb, LearningRateMonitor) and cb.log_weight_decay for cb in trainer.callbacks
        )
        self._log = self.log_weight_decay if self.log_weight_decay is not None else monitor_wants_wd

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        if "deepspeed" in type(trainer.strategy).__name__.lower():
            raise MisconfigurationException(
                "WeightDecay does not support DeepSpeed: its engine wraps the optimizer and runs the step itself, so"
                " the decay cannot be taken over. Use DeepSpeed's own optimizer `weight_decay` instead, or the"
                " 'ddp' / 'fsdp' / ModelParallelStrategy strategies."
            )

    def _check_alone(self, trainer: pl.Trainer) -> None:
        mine = [cb for cb in trainer.callbacks if isinstance(cb, WeightDecay)]
        if len(mine) > 1:
            raise MisconfigurationException(
                f"The Trainer has {len(mine)} WeightDecay callbacks: {', '.join(map(repr, mine))}. Each optimizer step"
                " can take one decay: keep one of them."
            )

    def _lr_max_of(self, trainer: pl.Trainer, optimizer: Optimizer) -> float | list[float] | None:
        """The explicit ``lr_max``, else the per-group peaks of a cyclic schedule (``CyclicLR`` starts from its
        lowest lr, which schedulers record as ``initial_lr``, and keeps its peaks in ``max_lrs``)."""
        if self.lr_max is not None or self.mode != "independent":
            return self.lr_max
        for config in trainer.lr_scheduler_configs:
            peaks = getattr(config.scheduler, "max_lrs", None)
            if getattr(config.scheduler, "optimizer", None) is optimizer and peaks is not None:
                return [float(p) for p in peaks]
        return None

    def _timescale_steps(self, trainer: pl.Trainer, total: float | None) -> float | None:
        """The ``timescale`` argument in optimizer steps: a fraction of the run's steps, or epochs of steps."""
        if self.timescale is None:
            return None
        if self.timescale_unit == "run":
            return self.timescale * _steps(total)  # a run without an end is refused here, not with epochs
        if trainer.train_dataloader is None:  # as `estimated_stepping_batches` does, to know the epoch's length
            trainer.fit_loop.setup_data()
        if not math.isfinite(trainer.num_training_batches):
            raise MisconfigurationException(
                "WeightDecay(timescale_unit='epochs') needs the length of an epoch; the train dataloader has none."
            )
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        return self.timescale * per_epoch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Lightning's own logging steps, as LearningRateMonitor(logging_interval="step"), so the two read side by side
        if not self._log or not trainer._logger_connector.should_update_logs or not trainer.loggers:
            return
        metrics = {}
        total = trainer.estimated_stepping_batches
        for name, attached in zip(optimizer_names([a.optimizer for a in self._attached]), self._attached):
            for i, group in enumerate(attached.optimizer.param_groups):
                wd = attached.current_weight_decay(group)
                metrics[f"weight_decay/{name}/pg{i}"] = wd
                x = attached.per_step_decay(group, wd)
                if isinstance(x, (int, float)) and x > 0:  # the timescale 1 / x of the decay, in steps and of the run
                    metrics[f"timescale/{name}/pg{i}"] = 1 / x
                    if math.isfinite(total):
                        metrics[f"timescale_fraction/{name}/pg{i}"] = 1 / (x * total)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()  # puts the user's values back into every group, whatever step the exception stopped

    def _detach(self) -> None:
        for attached in self._attached:
            attached.detach()
        self._attached = []


def _steps(total: float | None) -> int | None:
    """``trainer.estimated_stepping_batches`` as a step count; a run without an end (``inf``) cannot be scheduled."""
    if total is None:
        return None
    if not math.isfinite(total):
        raise MisconfigurationException(
            "WeightDecay's `schedule` and `timescale` need the length of the run: set `max_steps` or `max_epochs`."
        )
    return int(total)
