"""The ``WeightDecay`` callback: Lightning glue around :mod:`lightning_wd.attach`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.attach import AttachedWeightDecay
from lightning_wd.callback_base import StepCallback
from lightning_wd.config import DecayConfig, check_bool, check_choice, check_number, check_timescale_mode
from lightning_wd.exclusion import (
    COMPILED_SEGMENT,
    check_patterns,
    excluded_parameters,
    format_exclusions,
    unmatched_patterns,
)
from lightning_wd.lr_reference import scheduler_peaks
from lightning_wd.modes import Mode

TIMESCALE_UNITS: tuple[str, ...] = ("run", "epochs")


class WeightDecay(StepCallback):
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
    - ``mode="corrected"``: :math:`p \leftarrow p - (\eta_t^2 / \eta_{max}) \lambda p` (AdamC, Defazio 2025).

    Where the optimizer implements the mode itself (AdamW in decoupled mode; Adam through its
    ``decoupled_weight_decay`` switch) it gets the decay for the step and applies it in its own kernel; otherwise the
    callback sets the group's ``weight_decay`` to 0 for the step and applies the decay in one batched pass. Steps
    that AMP's grad scaler skips are not decayed; gradient accumulation decays once per real step; LR schedulers act
    through the group's current ``lr``; param groups added during training (``BackboneFinetuning``) are taken over at
    their first step. Each group records the mode (``"lightning_wd_mode"``), so a resume in another mode warns.

    Args:
        mode: ``"decoupled"`` (default), ``"coupled"``, ``"independent"`` or ``"corrected"`` (see above).
        weight_decay: one decay for every param group, written into the groups at fit start and again after a
            checkpoint is restored; ``None`` (default) keeps each group's own ``weight_decay``. A group configured
            with no decay keeps none: groups at 0 beside groups with decay (the Hugging Face no-decay group), or
            when the optimizer's default decay is not 0. Only an optimizer built without any decay gets it in every
            group.
        exclude: ``fnmatch`` patterns on ``named_parameters()`` names that get no decay, e.g. ``["*.bias"]``; under
            ``torch.compile`` they also match the names without the ``_orig_mod.`` it adds.
        exclude_bias_and_norm: exclude every bias (``bias``, ``in_proj_bias``, ...) and every parameter of a
            normalization layer (found by module type: BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm).
        lr_max: the reference (peak) lr of ``mode="independent"`` and ``"corrected"``; ``None`` takes each group's
            peak where its scheduler records one (``OneCycleLR``, ``CyclicLR``), else the optimizer's own reference
            lr, else its initial lr.
        native: let optimizers that implement the mode themselves apply the decay in their own kernel (same result,
            no extra pass over the weights); ``False`` applies it in the separate pass for every optimizer.
        stochastic_rounding: decay bf16/fp16 weights (``precision="bf16-true"``) with stochastic rounding, so that a
            per-step decay ``lr * wd`` below the format's resolution (bf16: ``2**-8``) is not rounded away; its random
            stream is its own (the same on every rank, and after a resume). Without it, such a lost decay is reported
            with a warning at fit start and whenever the lr makes it so.
        log_weight_decay: log the decay's timescale (``timescale/{optimizer}/{group}``, ``timescale_fraction/...``)
            and the decay applied (``weight_decay/{optimizer}/{group}``) at Lightning's logging steps. ``None``
            (default) does so when a ``LearningRateMonitor(log_weight_decay=True)`` is present; the decay applied is
            then logged only under a ``schedule``, where it differs from the group's ``weight_decay`` that
            LearningRateMonitor logs.
        schedule: ``"cosine"`` or ``"linear"``: each group's decay goes from its ``weight_decay`` to
            ``weight_decay_end`` over the run (``trainer.estimated_stepping_batches``); the steps taken are saved in
            the optimizer's state, so a resumed run goes on. ``None`` (default): no schedule.
        weight_decay_end: the decay a ``schedule`` reaches at the end of the run (a group at 0 stays at 0).
        uncorrected: under ``mode="corrected"``, ``fnmatch`` patterns of parameters that get the plain decoupled
            decay instead (e.g. an output layer that is not followed by a normalization).
        cautious: decay only the elements whose update has the weight's sign (cautious weight decay, Chen et al.
            2025), read from the optimizer's state and gradient before the step.
        timescale: set each group's ``weight_decay`` from the timescale ``1 / (per-step decay)`` at the peak lr,
            instead of ``weight_decay``: as a fraction of the run (``timescale_unit="run"``) or in epochs.
        timescale_unit: ``"run"`` (default: ``timescale`` is a fraction of the run's optimizer steps) or
            ``"epochs"``.

    Raises:
        ValueError: if an argument has a value outside those accepted (the message names the argument and them):
            ``mode`` not one of the modes, ``weight_decay`` negative or not finite, ``lr_max`` not above 0, a
            ``schedule`` without ``weight_decay_end``, ``uncorrected`` without ``mode="corrected"``, ...
        TypeError: if an argument has the wrong type (``exclude`` holding anything but glob patterns,
            ``native="False"``).
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
        super().__init__()
        self.config = DecayConfig(mode=mode, weight_decay=weight_decay, lr_max=lr_max, native=native,
                                  stochastic_rounding=stochastic_rounding, schedule=schedule,
                                  weight_decay_end=weight_decay_end, cautious=cautious)
        self.exclude = check_patterns(exclude)
        self.uncorrected = check_patterns(uncorrected, "uncorrected")
        if self.uncorrected and mode != "corrected":
            raise ValueError("`uncorrected` lists the parameters that mode='corrected' leaves uncorrected; it needs"
                             f" mode='corrected', got mode={mode!r}.")
        self.exclude_bias_and_norm = check_bool("exclude_bias_and_norm", exclude_bias_and_norm)
        self.log_weight_decay = check_bool("log_weight_decay", log_weight_decay, optional=True)
        self.timescale = check_number("timescale", timescale, 0.0, False, "a float > 0 or None")
        if self.timescale is not None:
            check_timescale_mode("timescale", mode, self.config.weight_decay)
        self.timescale_unit = check_choice("timescale_unit", timescale_unit, TIMESCALE_UNITS)
        self._attached: list[AttachedWeightDecay] = []
        self._log_decay = self._log_timescale = False

    def __getattr__(self, name: str) -> Any:
        # the decay's settings read as attributes (`callback.mode`), from the one validated configuration
        config = self.__dict__.get("config")
        if config is not None and name in DecayConfig.__dataclass_fields__:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def attached(self) -> tuple[AttachedWeightDecay, ...]:
        """The attachments to the Trainer's optimizers during fit (empty before and after it)."""
        return tuple(self._attached)

    @property
    def logs_decay(self) -> bool:
        """Whether this fit logs the decay's timescale (``log_weight_decay``, or a
        ``LearningRateMonitor(log_weight_decay=True)``)."""
        return self._log_timescale

    def __repr__(self) -> str:
        c = self.config
        args = [f"mode={c.mode!r}"] + [
            f"{f.name}={getattr(c, f.name)!r}" for f in dataclasses.fields(c)
            if f.name not in ("mode", "total_steps", "timescale_steps") and getattr(c, f.name) != f.default
        ]
        own = {"exclude": [], "exclude_bias_and_norm": False, "log_weight_decay": None, "uncorrected": [],
               "timescale": None}
        args += [f"{k}={getattr(self, k)!r}" for k, default in own.items() if getattr(self, k) != default]
        return f"WeightDecay({', '.join(args)})"

    # --- fit start: one attachment per optimizer -------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_trainer(trainer)
        super().on_fit_start(trainer, pl_module)
        if not self._optimizers:
            return  # `configure_optimizers` returned None: Lightning's placeholder, which never steps
        self._warn_unmatched(pl_module)
        excluded = excluded_parameters(pl_module, self.exclude, self.exclude_bias_and_norm).values()
        if self.exclude or self.exclude_bias_and_norm:
            rank_zero_info(format_exclusions(pl_module, self.exclude, self.exclude_bias_and_norm))
        uncorrected = excluded_parameters(pl_module, self.uncorrected).values()
        try:
            for opt in self._optimizers:
                attached = AttachedWeightDecay(opt, _config_for(self, trainer, opt), excluded, uncorrected)
                self._attached.append(attached)
                attached.check_decay()
        except ValueError as err:  # a refusal: nothing has stepped, and nothing stays attached
            self._teardown()
            raise MisconfigurationException(f"WeightDecay({self.mode!r}) cannot train this run: {err}") from err
        self._warn_if_nothing_to_do()
        lr_monitor_logs_wd = any(isinstance(cb, LearningRateMonitor) and cb.log_weight_decay
                                 for cb in trainer.callbacks)
        self._log_timescale = self.log_weight_decay if self.log_weight_decay is not None else lr_monitor_logs_wd
        self._log_decay = bool(self.log_weight_decay) or (self._log_timescale and self.schedule is not None)

    def _check_trainer(self, trainer: pl.Trainer) -> None:
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise MisconfigurationException(
                "WeightDecay does not support DeepSpeed: its engine wraps the optimizer and runs the step itself, so"
                " the decay cannot be taken over. Use DeepSpeed's own optimizer `weight_decay` instead, or the"
                " 'ddp' / 'fsdp' / ModelParallelStrategy strategies."
            )
        mine = [cb for cb in trainer.callbacks if isinstance(cb, WeightDecay)]
        if len(mine) > 1:
            raise MisconfigurationException(
                f"The Trainer has {len(mine)} WeightDecay callbacks: {', '.join(map(repr, mine))}. Each optimizer step"
                " can take one decay: keep one of them."
            )

    def _warn_unmatched(self, pl_module: pl.LightningModule) -> None:
        compiled = any(COMPILED_SEGMENT in name for name, _ in pl_module.named_parameters())
        for arg, patterns in (("exclude", self.exclude), ("uncorrected", self.uncorrected)):
            for pattern in unmatched_patterns(pl_module, patterns):
                rank_zero_warn(
                    f"WeightDecay: the `{arg}` pattern {pattern!r} matches no parameter name, so it selects nothing."
                    " Patterns match the names of `named_parameters()` (e.g. 'net.0.bias', '*.bias')"
                    + (", with or without the '_orig_mod.' that torch.compile adds." if compiled else ".")
                )

    def _warn_if_nothing_to_do(self) -> None:
        nothing = self.weight_decay is None and self.timescale is None
        if nothing and all(g.get("weight_decay", 0) == 0 for o in self._optimizers for g in o.param_groups):
            rank_zero_warn(
                "WeightDecay found no decay to apply: every param group has `weight_decay=0` and the `weight_decay`"
                " argument is None. Set `weight_decay` in the optimizer or pass `WeightDecay(weight_decay=...)`."
            )

    # --- logging ---------------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Lightning's own logging steps, as LearningRateMonitor(logging_interval="step"), so the two read side by side
        if not self._log_timescale or not self._logging_batch():
            return
        metrics: dict[str, float] = {}
        total = trainer.estimated_stepping_batches
        for attached in self._attached:
            for i, group in enumerate(attached.optimizer.param_groups):
                key = self._group_key(attached.optimizer, i)
                wd = attached.current_weight_decay(group)
                if self._log_decay:
                    metrics[f"weight_decay/{key}"] = wd
                x = attached.per_step_decay(group, wd)
                if isinstance(x, (int, float)) and x > 0:  # the timescale 1 / x of the decay, in steps and of the run
                    metrics[f"timescale/{key}"] = 1 / x
                    if math.isfinite(total):
                        metrics[f"timescale_fraction/{key}"] = 1 / (x * total)
        self._log(trainer, {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)})

    def _teardown(self) -> None:
        super()._teardown()
        for attached in self._attached:
            attached.detach()  # puts the user's values back into every group, whatever step an exception stopped
        self._attached = []


def _steps(total: float) -> int:
    """``trainer.estimated_stepping_batches`` as a step count; a run without an end (``inf``) cannot be scheduled."""
    if not math.isfinite(total):
        raise MisconfigurationException(
            "WeightDecay's `schedule` and `timescale` need the length of the run: set `max_steps` or `max_epochs`."
        )
    return int(total)


def _config_for(callback: WeightDecay, trainer: pl.Trainer, optimizer: Optimizer) -> DecayConfig:
    """The callback's configuration with what the Trainer knows: the schedule's length, the timescale in steps, and
    the per-group peaks of a cyclic LR schedule (``CyclicLR`` starts from its lowest lr, which schedulers record as
    ``initial_lr``, and keeps its peaks in ``max_lrs``)."""
    needs_total = callback.schedule is not None or (callback.timescale is not None
                                                     and callback.timescale_unit == "run")
    total = _steps(trainer.estimated_stepping_batches) if needs_total else None
    lr_max = callback.lr_max
    if lr_max is None and callback.mode in ("independent", "corrected"):
        peaks = scheduler_peaks(trainer.lr_scheduler_configs, optimizer)
        lr_max = tuple(peaks) if peaks is not None else None
    return dataclasses.replace(
        callback.config, lr_max=lr_max, total_steps=total if callback.schedule is not None else None,
        timescale_steps=_timescale_steps(callback, trainer, total),
    )


def _timescale_steps(callback: WeightDecay, trainer: pl.Trainer, total: int | None) -> float | None:
    """The ``timescale`` argument in optimizer steps: a fraction of the run's steps, or epochs of steps."""
    if callback.timescale is None:
        return None
    if callback.timescale_unit == "run":
        assert total is not None
        return callback.timescale * total
    if trainer.train_dataloader is None:  # as `estimated_stepping_batches` does, to know the epoch's length
        trainer.fit_loop.setup_data()
    if not math.isfinite(trainer.num_training_batches):
        raise MisconfigurationException(
            "WeightDecay(timescale_unit='epochs') needs the length of an epoch; the train dataloader has none."
        )
    per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
    return callback.timescale * per_epoch
