"""The ``WeightDecay`` callback: Lightning glue around :mod:`lightning_wd.attach`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_wd.attach import WD_KEY, AttachedWeightDecay, calls_closure_repeatedly
from lightning_wd.exclusion import excluded_parameters, format_exclusions
from lightning_wd.modes import Mode, check_lr_max, check_mode, check_weight_decay
from lightning_wd.naming import optimizer_names


class WeightDecay(Callback):
    r"""Apply each param group's weight decay yourself, decoupled (AdamW) or coupled (L2), on every optimizer step.

    At fit start the callback takes each param group's ``weight_decay`` (or the ``weight_decay`` argument, which
    overrides every group), stores it in the group under ``"lightning_wd"``, sets the optimizer's own
    ``weight_decay`` to 0, and from then on applies the decay once per real optimizer step, after backward and
    gradient clipping, before the update:

    - ``mode="decoupled"``: :math:`p \leftarrow p - \eta_t \lambda p`; Adam then trains exactly as AdamW.
    - ``mode="coupled"``: :math:`g \leftarrow g + \lambda p`; AdamW then trains exactly as ``Adam(weight_decay=λ)``.
    - ``mode="independent"``: :math:`p \leftarrow p - (\eta_t / \eta_{max}) \lambda p` (fully decoupled: follows the
      lr schedule, not the lr's size); ``λ_independent = η_max · λ_pytorch`` gives the same run as ``"decoupled"``.

    Steps that AMP's grad scaler skips are not decayed; gradient accumulation decays once per real step; LR
    schedulers act through the group's current ``lr``; param groups added during training (``BackboneFinetuning``)
    are taken over at their first step; the decay is saved in the optimizer's state, so a resume continues exactly.

    Args:
        mode: ``"decoupled"`` (default), ``"coupled"`` or ``"independent"``.
        weight_decay: one decay for every param group; ``None`` (default) keeps each group's own ``weight_decay``.
        exclude: ``fnmatch`` patterns on ``named_parameters()`` names that get no decay, e.g. ``["*.bias"]``.
        exclude_bias_and_norm: exclude every ``bias`` and every parameter of a normalization layer (found by
            module type: BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm).
        lr_max: reference lr of ``mode="independent"``; ``None`` takes each group's initial lr.
        native: let ``torch.optim.Adam``/``AdamW`` apply the decay inside their own foreach/fused kernel (same
            result, no extra pass over the weights). Other optimizers always use a separate foreach pass.
        stochastic_rounding: decay bf16/fp16 weights (``precision="bf16-true"``) with stochastic rounding, so that a
            per-step decay ``lr * wd`` below the format's resolution (bf16: ``2**-8``) is not rounded away. Without
            it, such a lost decay is reported with a warning at fit start and whenever the lr makes it so.
        log_weight_decay: log the decay applied, as ``weight_decay/{optimizer}/pg{i}``, at every logging step.
            ``None`` (default) does so when a ``LearningRateMonitor(log_weight_decay=True)`` is present, since that
            monitor reads the optimizer's own ``weight_decay``, which this callback has set to 0.

    Raises:
        ValueError: if ``mode`` is not one of the accepted values, or ``weight_decay < 0``, or ``lr_max <= 0``.
        MisconfigurationException: at fit start, for an optimizer that evaluates its closure several times per step
            (LBFGS), and for DeepSpeed, whose engine owns the optimizer step.

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
    ) -> None:
        self.mode = check_mode(mode)
        self.weight_decay = check_weight_decay(weight_decay)
        if isinstance(exclude, str):
            raise ValueError(f"`exclude` must be a list of glob patterns, got the string {exclude!r}.")
        self.exclude = list(exclude)
        self.exclude_bias_and_norm = bool(exclude_bias_and_norm)
        self.lr_max = check_lr_max(lr_max)
        self.native = bool(native)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.log_weight_decay = log_weight_decay
        self._attached: list[AttachedWeightDecay] = []
        self._log = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_strategy(trainer)
        for opt in trainer.optimizers:
            if calls_closure_repeatedly(opt):
                raise MisconfigurationException(
                    f"WeightDecay does not support {type(opt).__name__}: it evaluates its closure several times per"
                    " step, and the decay would be applied once per evaluation instead of once per step."
                )
        excluded = excluded_parameters(pl_module, self.exclude, self.exclude_bias_and_norm)
        if self.exclude or self.exclude_bias_and_norm:
            rank_zero_info(format_exclusions(pl_module, self.exclude, self.exclude_bias_and_norm))
        self._detach()
        self._attached = [
            AttachedWeightDecay(
                opt, self.mode, self.weight_decay, excluded.values(), self.lr_max, self.native, self.stochastic_rounding
            )
            for opt in trainer.optimizers
        ]
        for attached in self._attached:
            attached.check_precision()
        if all(g[WD_KEY] == 0 for a in self._attached for g in a.optimizer.param_groups):
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

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Lightning's own logging steps, as LearningRateMonitor(logging_interval="step"), so the two read side by side
        if not self._log or not trainer._logger_connector.should_update_logs or not trainer.loggers:
            return
        metrics = {}
        for name, attached in zip(optimizer_names([a.optimizer for a in self._attached]), self._attached):
            # groups added since the last step (BackboneFinetuning) or restored from a checkpoint saved after fit
            # are otherwise only taken over at the next step's pre-hook
            attached.take_over()
            for i, group in enumerate(attached.optimizer.param_groups):
                metrics[f"weight_decay/{name}/pg{i}"] = group[WD_KEY]
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    def _detach(self) -> None:
        for attached in self._attached:
            attached.detach()
        self._attached = []
