"""The ``WeightNormMonitor`` callback: Lightning glue around :mod:`lightning_wd.weight_norm`."""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.attach import attached_to
from lightning_wd.callback_base import Reported, StepCallback, check_selection, reported_parameters, to_host
from lightning_wd.optimizers import Equilibrium, rule_for
from lightning_wd.sharding import check_no_fsdp1, sum_over_shards_
from lightning_wd.weight_decay import WeightDecay
from lightning_wd.weight_norm import Decay, decay_of_group, equilibrium_norm, squared_norms

__all__ = ["WeightNormMonitor", "sum_over_shards_"]


@dataclass(frozen=True)
class _Slot:
    """What the metrics need of one parameter that stays the same from one logging step to the next (kept by the
    monitor, so that a logging step does not look it up again)."""

    param: Tensor
    matrix: bool  # 2 or more dimensions: the weights that can have an equilibrium norm
    targets: tuple[str, ...]  # the aggregate keys its squares add to: its group's, its module's
    own: str | None  # its own key, where it is reported on its own


@dataclass
class _GroupPlan:
    """What the metrics of one param group need from the host side, read at the start of the step."""

    index: int
    key: str  # {optimizer}/{group}
    params: list[Tensor]
    slots: list[_Slot]  # one per parameter, in the order of ``params``
    lr: Any
    form: Equilibrium | None
    decay: Decay | None  # the group's decay (for its timescale)
    param_decay: list[Decay | None]  # each parameter's decay (None: excluded)


@dataclass
class _Record:
    """One logging step of one optimizer: the plan, then the squared norms of the weights and their gradients."""

    groups: list[_GroupPlan]
    scalars: list[Tensor] = field(default_factory=list)  # tensor-valued lr and decays, read in the one transfer
    with_grad: list[Tensor] = field(default_factory=list)
    squares: Tensor | None = None  # all weights, then the gradients of those that have one


class _Listener:
    """The monitor's part of one optimizer's logging step (:class:`lightning_wd.stepping.StepHooks`); it reads the
    gradients before a WeightDecay (priority 10) adds its L2 term or decays the weights."""

    priority = 0

    def __init__(self, monitor: WeightNormMonitor) -> None:
        self.monitor = monitor
        self.record: _Record | None = None

    def on_begin(self, optimizer: Optimizer) -> None:
        self.record = self.monitor._plan(optimizer) if self.record is None else self.record

    @torch.no_grad()
    def on_grads_ready(self, optimizer: Optimizer) -> None:
        record = self.record
        if record is None or record.squares is not None:
            return  # not planned, or measured already (one measurement per batch: the first step's)
        params = [p for g in record.groups for p in g.params]
        record.with_grad = [p for p in params if p.grad is not None]
        squares = squared_norms([*params, *(p.grad for p in record.with_grad)])
        scale = getattr(optimizer, "grad_scale", None)
        if scale is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # fused optimizers under 16-mixed get the gradients still scaled, and the scale beside them
            scale = scale.to(squares.device).float() if isinstance(scale, Tensor) else float(scale)
            squares[len(params):] /= scale**2
        # one collective for the whole step; the kept scalars are the same on every rank and are not summed
        sum_over_shards_(squares, [*params, *record.with_grad])
        record.squares = squares

    def on_abort(self, optimizer: Optimizer) -> None:
        self.record = None


class WeightNormMonitor(StepCallback):
    r"""Log whether weight decay is doing its job: weight norms, gradient-to-weight ratios, the decay's timescale and
    the equilibrium norm that theory predicts for the optimizer, lr and decay.

    Every ``log_every_n_steps`` optimizer steps (the Trainer's ``log_every_n_steps`` by default), through
    ``trainer.loggers`` on rank 0, for each param group (``per_group``, the default), each module aggregate
    (``per_module``) and each parameter reported on its own (``per_parameter``), under the names of
    :mod:`lightning_wd.naming` (``{what}`` below):

    ========================================  ==========================================================================
    key                                       meaning
    ========================================  ==========================================================================
    ``weight_norm/{what}``                    L2 norm of the weights (all of them together for a group or module)
    ``grad_to_weight/{what}``                 :math:`\|g\| / \|w\|`: the rate at which weights followed by a
                                              normalization layer rotate
    ``equilibrium_norm/{param}``              the norm rotational equilibrium predicts for this weight matrix
    ``equilibrium_ratio/{what}``              :math:`\|w\|` over the predicted norm, for the matrices that have one: 1
                                              at equilibrium, above 1 while the decay still shrinks them
    ``timescale/{optimizer}/{group}``         the decay's timescale :math:`1 / x` in steps (:math:`p \leftarrow (1-x)p`;
                                              :math:`1 / (\eta_t \lambda_t)` in decoupled mode)
    ``timescale_fraction/{optimizer}/{group}``  the same over ``trainer.estimated_stepping_batches``
    ========================================  ==========================================================================

    All are measured at the step, on the weights the step's gradient was computed at (before the update) and that
    gradient (after AMP unscaling and gradient clipping, without the L2 term a coupled decay adds). The equilibrium
    norms are those of Kosson, Messmer & Jaggi (arXiv 2305.17212; :mod:`lightning_wd.weight_norm` has the formulas
    and their assumptions): for AdamW and Lion :math:`\eta\sqrt{n / (2x)}`, for Adam with L2 decay and for SGD with
    momentum the paper's forms with the gradient measured at this step; only for weights of 2 or more dimensions
    that are decayed, for the optimizers whose registry entry names the form (``torch.optim`` Adam/AdamW without
    AMSGrad and SGD, the Lion implementations).

    The decay is what each step really applies: read from the weight decay attached to the optimizer (a
    :class:`~lightning_wd.WeightDecay` callback, or :func:`~lightning_wd.attach_weight_decay`: its mode, schedule and
    exclusions), else from the optimizer's own ``weight_decay`` as its entry in :mod:`lightning_wd.optimizers` says.
    A coupled (L2) decay has no per-step shrink factor: it logs no timescale (the equilibrium norms of Adam + L2 and
    SGD still follow). When a ``WeightDecay`` logs the ``timescale/…`` keys itself, this monitor does not log them a
    second time.

    Any optimizer works: the norms need no optimizer state. Nothing is computed on other steps (the monitor's step
    listener is armed for logging batches only). On a logging step it is one batched ``torch._foreach_norm`` over the
    weights and gradients, and one transfer to the host at the end of the batch. Under FSDP2 the norms are of the
    *whole* parameters: the squares of the shards are summed over the processes. A step that AMP's grad scaler skips
    logs nothing (``step()`` is not called), except for fused optimizers, which skip inside their kernel.

    Args:
        log_every_n_steps: log every this many optimizer steps; ``None`` follows ``Trainer(log_every_n_steps=...)``.
        per_parameter: ``False`` (default): no keys per parameter; ``True``: for every parameter; a list of
            ``fnmatch`` patterns: for the parameters whose names match (as ``WeightDecay``'s ``exclude``).
        per_module: aggregate the parameters by module, at this depth of their names (``2``: ``blocks.0``,
            ``blocks.1``, ...); ``None`` (default): no module keys.
        per_group: keys per param group (default ``True``).

    Raises:
        ValueError: if ``log_every_n_steps`` or ``per_module`` is not a positive int or None, or nothing is selected.
        TypeError: if ``per_parameter`` is neither a bool nor a list of patterns, or ``per_group`` not a bool.
        MisconfigurationException: at fit start, under Lightning's ``strategy="fsdp"`` (FSDP1), whose shards carry
            no record of the parameter they belong to.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_wd import WeightDecay, WeightNormMonitor
        >>> trainer = Trainer(callbacks=[WeightDecay(mode="corrected"), WeightNormMonitor(per_module=2)])
    """

    def __init__(self, log_every_n_steps: int | None = None, per_parameter: bool | Sequence[str] = False,
                 per_module: int | None = None, per_group: bool = True) -> None:
        super().__init__(log_every_n_steps)
        self.per_parameter, self.per_module, self.per_group = check_selection(per_parameter, per_module, per_group)
        self._reported: dict[int, Reported] = {}
        self._listeners: dict[int, _Listener] = {}
        # per group key: the parameters the slots were made for, and the slots
        self._slots: dict[str, tuple[tuple[Tensor, ...], list[_Slot]]] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_no_fsdp1("WeightNormMonitor", trainer.strategy, pl_module)
        super().on_fit_start(trainer, pl_module)
        self._reported = reported_parameters(pl_module, self.per_parameter, self.per_module)
        self._slots = {}  # made from `_reported`: anew for each fit

    def _teardown(self) -> None:
        super()._teardown()
        self._slots = {}  # holds the parameters: not kept past the fit

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._disarm()
        if self._logging_batch():
            self._listeners = {id(o): _Listener(self) for o in self._optimizers}
            for opt in self._optimizers:
                self._arm(opt, self._listeners[id(opt)])

    # --- the decay each group gets ------------------------------------------------------------------------------
    def _plan(self, optimizer: Optimizer) -> _Record:
        record = _Record([])
        # looked up at each logging step: WeightDecay attaches in its own on_fit_start, which may run after ours
        attached = attached_to(optimizer)

        def keep(value: Any) -> Any:  # a tensor (a tensor lr) is read in the batch's one transfer, not now
            if isinstance(value, Tensor):
                record.scalars.append(value.detach().reshape(()).float())
                return _Deferred(len(record.scalars) - 1)
            return value

        for gi, group in enumerate(optimizer.param_groups):
            decay, param_decay = decay_of_group(optimizer, group, attached)
            key, params = self._group_key(optimizer, gi), list(group["params"])
            record.groups.append(_GroupPlan(
                index=gi, key=key, params=params, slots=self._slots_of(key, params), lr=keep(group["lr"]),
                form=self._form(optimizer, group), decay=_keep(decay, keep),
                param_decay=_each_distinct(param_decay, lambda d: _keep(d, keep)),
            ))
        return record

    def _slots_of(self, key: str, params: list[Tensor]) -> list[_Slot]:
        """The slots of the parameters of group ``key``: those of the last logging step while the group holds the
        same parameters (the usual case), else made anew."""
        made, slots = self._slots.get(key, ((), []))
        if len(made) == len(params) and all(map(operator.is_, made, params)):
            return slots
        slots = [self._slot(key, i, p) for i, p in enumerate(params)]
        self._slots[key] = (tuple(params), slots)
        return slots

    def _slot(self, key: str, index: int, p: Tensor) -> _Slot:
        reported = self._reported.get(id(p))
        if reported is None:  # not a parameter of the module (added to the optimizer by hand): named by position
            reported = Reported(f"{key}/param{index}", bool(self.per_parameter), None)
        targets = (key,) * self.per_group + ((reported.module,) if reported.module else ())
        return _Slot(p, p.dim() >= 2, targets, reported.name if reported.own else None)

    @staticmethod
    def _form(optimizer: Optimizer, group: dict[str, Any]) -> Equilibrium | None:
        return rule_for(optimizer)[0].form(optimizer, group)

    # --- after the batch: one transfer, then the loggers ---------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._listeners:
            return  # not a logging batch: nothing was armed
        records = [lst.record for lst in self._listeners.values() if lst.record is not None]
        records = [r for r in records if r.squares is not None]
        self._disarm()
        self._listeners = {}
        if not records:
            return
        values = to_host([t for r in records for t in (r.squares, *r.scalars)])
        with_timescale = not any(isinstance(cb, WeightDecay) and cb.logs_decay for cb in trainer.callbacks)
        metrics: dict[str, float] = {}
        k = 0
        for record in records:
            squares, scalars = values[k], [v[0] for v in values[k + 1 : k + 1 + len(record.scalars)]]
            k += 1 + len(record.scalars)
            metrics.update(self._metrics(record, squares, scalars, trainer.estimated_stepping_batches, with_timescale))
        self._log(trainer, metrics)

    @staticmethod
    def _metrics(record: _Record, squares: list[float], scalars: list[float], total: float,
                 with_timescale: bool) -> dict[str, float]:
        n = sum(len(g.params) for g in record.groups)
        grad_sq = dict(zip(map(id, record.with_grad), squares[n:]))
        out: dict[str, float] = {}
        buckets: dict[str, _Sums] = defaultdict(_Sums)
        value = lambda x: scalars[x.index] if isinstance(x, _Deferred) else x  # noqa: E731
        start = 0
        for plan in record.groups:
            lr, decay = value(plan.lr), _resolved(plan.decay, value)
            if with_timescale and decay is not None and decay[0] == "shrink":
                out[f"timescale/{plan.key}"] = 1 / decay[1]
                if math.isfinite(total):
                    out[f"timescale_fraction/{plan.key}"] = 1 / (decay[1] * total)
            w_sq, start = squares[start : start + len(plan.params)], start + len(plan.params)
            resolved = _each_distinct(plan.param_decay, lambda d: _resolved(d, value))
            for slot, d, w2 in zip(plan.slots, resolved, w_sq):
                g2 = grad_sq.get(id(slot.param))
                predicted = equilibrium_norm(plan.form, slot.param, lr, d, w2, g2) if slot.matrix else None
                for target in slot.targets:
                    buckets[target].add(w2, g2, predicted)
                if slot.own is not None:
                    _Sums().add(w2, g2, None).write(out, slot.own, predicted)
        for target, sums in buckets.items():
            sums.write(out, target, None)
        return out


@dataclass(frozen=True)
class _Deferred:
    index: int


@dataclass
class _Sums:
    """Sums of squares over the parameters of one key: weights, gradients (of those with one), and the weights and
    predicted norms of the matrices with an equilibrium."""

    w: float = 0.0
    g: float = 0.0
    has_grad: bool = False
    covered_w: float = 0.0
    covered_predicted: float = 0.0

    def add(self, w2: float, g2: float | None, predicted: float | None) -> _Sums:
        self.w += w2
        if g2 is not None:
            self.g, self.has_grad = self.g + g2, True
        if predicted is not None:
            self.covered_w += w2
            self.covered_predicted += predicted**2
        return self

    def write(self, out: dict[str, float], name: str, predicted: float | None) -> None:
        out[f"weight_norm/{name}"] = math.sqrt(self.w)
        if self.has_grad:
            out[f"grad_to_weight/{name}"] = math.sqrt(self.g / self.w) if self.w > 0 else math.inf
        if predicted is not None:
            out[f"equilibrium_norm/{name}"] = predicted
        if self.covered_predicted > 0:
            out[f"equilibrium_ratio/{name}"] = math.sqrt(self.covered_w / self.covered_predicted)


def _keep(decay: Decay | None, keep: Any) -> Decay | None:
    return None if decay is None else (decay[0], keep(decay[1]))


def _each_distinct(decays: list[Decay | None], fn: Any) -> list[Decay | None]:
    """``fn`` of each parameter's decay, once per distinct decay: the parameters of a group share a few (the
    group's, ``None`` where excluded), and a tensor-valued one is then kept, and read, once, not once per
    parameter."""
    done = {id(d): fn(d) for d in {id(d): d for d in decays}.values()}
    return [done[id(d)] for d in decays]


def _resolved(decay: Decay | None, value: Any) -> Decay | None:
    """The decay with its number read; ``None`` where it decays nothing (0, or no shrink factor at all)."""
    if decay is None or decay[1] is None:
        return None
    x = float(value(decay[1]))
    return (decay[0], x) if x > 0 else None
