"""The ``WeightNormMonitor`` callback: Lightning glue around :mod:`lightning_wd.weight_norm`."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import _MockOptimizer
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from lightning_wd.attach import AttachedWeightDecay, _closure_of
from lightning_wd.effective_lr_monitor import _shard_groups
from lightning_wd.modes import per_step_decay
from lightning_wd.naming import is_logging_step, optimizer_names
from lightning_wd.optimizers import rule_for
from lightning_wd.weight_decay import WeightDecay
from lightning_wd.weight_norm import (
    adam_l2_norm,
    equilibrium_kind,
    normalized_update_norm,
    sgdm_norm,
    squared_norms,
)

#: a decay as the monitor reads it: ``("shrink", x)`` for ``p *= 1 - x``, ``("l2", wd)`` for ``g += wd * p``
Decay = tuple[str, Any]


def sum_over_shards_(squares: Tensor, params: Sequence[Tensor]) -> None:
    """Sum the entries of ``squares`` that belong to sharded parameters (FSDP2 ``DTensor``) over the shards, in place.

    ``squares[i]`` is a squared norm of the local shard of ``params[i]`` (a parameter may be listed more than once,
    for its weights and its gradient). Entries of whole (unsharded or replicated) parameters are left alone: summing
    them across ranks would count them once per rank. Every rank holds the same parameters in the same order, so
    every rank makes the same collectives, one ``all_reduce`` per process group, also where its shard is empty. The
    rows are picked by integer indexing, not with an index tensor made from host data (a host-to-device copy, which
    synchronizes on CUDA).
    """
    by_groups: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(params):
        groups = _shard_groups(p)
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


class _Scalars:
    """Numbers read in a step hook: host floats as they are; tensors (a tensor lr) kept, on their own device, for the
    transfer at the end of the batch (moving a CPU tensor to the GPU would be a synchronizing copy)."""

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []

    def keep(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            self.tensors.append(value.detach().reshape(()).float())
            return _Deferred(len(self.tensors) - 1)
        return value

    def parts(self) -> list[Tensor]:
        """The kept tensors as one stacked tensor per device, in the order of :meth:`order`."""
        by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
        for t in self.tensors:
            by_device[t.device].append(t)
        return [torch.stack(ts) for ts in by_device.values()]

    def order(self) -> list[int]:
        """The index of each kept tensor, in the order that the parts of :meth:`parts` hold them."""
        by_device: dict[torch.device, list[int]] = defaultdict(list)
        for i, t in enumerate(self.tensors):
            by_device[t.device].append(i)
        return [i for index in by_device.values() for i in index]


@dataclass(frozen=True)
class _Deferred:
    index: int


@dataclass
class _GroupPlan:
    """What the metrics of one param group need from the host side, read before the step."""

    index: int
    params: list[Tensor]
    lr: Any
    kind: str | None  # the update rule whose equilibrium is known (weight_norm.equilibrium_kind)
    momentum: float
    dampening: float
    decay: Decay | None  # the group's decay (for its timescale)
    param_decay: list[Decay | None]  # each parameter's decay (None: excluded)


@dataclass
class _StepRecord:
    """One logging optimizer step: the plan, then the squared norms measured before and after it."""

    opt_name: str
    groups: list[_GroupPlan]
    scalars: _Scalars
    with_grad: list[Tensor] = field(default_factory=list)
    before: Tensor | None = None  # squared norms: weights with a gradient, then their gradients
    parts: list[Tensor] = field(default_factory=list)  # for the transfer: [before, after (all weights)], scalars


class WeightNormMonitor(Callback):
    r"""Log whether weight decay is doing its job: weight norms, gradient-to-weight ratios, the decay's timescale and
    the equilibrium norm that theory predicts for the optimizer, lr and decay.

    Every ``log_every_n_steps`` optimizer steps (the Trainer's ``log_every_n_steps`` by default), through
    ``trainer.loggers`` on rank 0:

    - ``weight_norm/{param_name}``: the L2 norm of each parameter after the step;
    - ``grad_to_weight/{param_name}``: :math:`\|g\| / \|w\|`, the gradient the step used (after AMP unscaling and
      gradient clipping, without the L2 term a coupled decay adds) over the weights it was computed at (before the
      step). For weights followed by a normalization layer this is the rate at which they rotate;
    - ``timescale/{optimizer}/pg{i}``: the decay's timescale in optimizer steps, :math:`1 / x` for the per-step
      shrink :math:`p \leftarrow (1 - x) p` (:math:`1 / (\eta_t \lambda_t)` in decoupled mode), and
      ``timescale_fraction/{optimizer}/pg{i}``, the same over ``trainer.estimated_stepping_batches``;
    - ``equilibrium_norm/{param_name}``: the norm that the rotational equilibrium of Kosson, Messmer & Jaggi
      (arXiv 2305.17212) predicts for this weight matrix under the current lr and decay (see
      :mod:`lightning_wd.weight_norm` for the formulas and their assumptions): for AdamW and Lion
      :math:`\eta\sqrt{n / (2x)}` (:math:`\sqrt{\eta C / (2\lambda)}` per neuron of ``C`` inputs, times the square
      root of the number of rows), for Adam with L2 decay and for SGD with momentum the paper's forms with the
      gradient measured at this step. Only for weights of 2 or more dimensions (rows are the output neurons; biases
      and other 1-D parameters are skipped), for optimizers the paper covers (``torch.optim.Adam``/``AdamW``
      without AMSGrad, ``torch.optim.SGD``, classes named ``Lion``), and for weights that are decayed.

    The decay is what each step really applies: read from a :class:`~lightning_wd.WeightDecay` callback when one is
    in the Trainer (its mode, schedule and exclusions), else from the optimizer's own ``weight_decay`` as its entry
    in :mod:`lightning_wd.optimizers` says (a decoupled rule: ``x = step_size * wd``). A coupled (L2) decay has no
    per-step shrink factor: it logs no timescale (the equilibrium norms of Adam + L2 and SGD still follow). When a
    ``WeightDecay`` logs the ``timescale/…`` keys itself (``log_weight_decay``), this monitor does not log them a
    second time (at its own steps, possibly other steps than this monitor's): one writer per key.

    Any optimizer works: the norms need no optimizer state. Nothing is computed on other steps. On a logging step
    the callback reads the gradient and the weights after the step's closure (Lightning runs forward, backward and
    clipping inside it) or, without a closure, in a step pre-hook; that is one batched ``torch._foreach_norm`` over
    the weights and gradients, and one over the weights after the step; everything reaches the host in one transfer
    at the end of the batch. Under FSDP2 the norms are of the *whole* parameters: the squared norms of the shards are
    summed over the processes, every rank taking part, also with an empty shard. A step that AMP's grad scaler
    skips logs nothing (``step()`` is not called), except for fused optimizers, which skip inside their kernel: their
    ``grad_to_weight`` then shows the infinite gradient. With an optimizer that evaluates its closure several times
    (LBFGS), the gradient is the first evaluation's.

    Args:
        log_every_n_steps: log every this many optimizer steps; ``None`` follows ``Trainer(log_every_n_steps=...)``.

    Raises:
        ValueError: if ``log_every_n_steps`` is not a positive int or None.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_wd import WeightDecay, WeightNormMonitor
        >>> trainer = Trainer(callbacks=[WeightDecay(mode="corrected"), WeightNormMonitor(log_every_n_steps=10)])
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(f"`log_every_n_steps` must be a positive int or None, got {log_every_n_steps!r}.")
        self.log_every_n_steps = log_every_n_steps
        self._trainer: pl.Trainer | None = None
        self._names: dict[int, str] = {}
        self._watched: dict[int, str] = {}  # id(optimizer) -> its name in the metric keys
        self._depth: dict[int, int] = defaultdict(int)  # nested step() calls (a subclass calling super().step())
        self._open: dict[int, _StepRecord] = {}  # the logging step in progress, per optimizer
        self._pending: list[_StepRecord] = []
        self._handles: list[RemovableHandle] = []

    # --- set-up -------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._trainer = trainer
        self._names = {id(p): name for name, p in pl_module.named_parameters()}
        optimizers = [o for o in trainer.optimizers if not isinstance(o, _MockOptimizer)]
        self._watched = {id(o): name for name, o in zip(optimizer_names(optimizers), optimizers)}
        # Global hooks run before every optimizer's own, so the gradient and weights are read before a WeightDecay
        # attached to the same optimizer adds its L2 term or decays the weights, whichever was set up first.
        self._handles = [register_optimizer_step_pre_hook(self._pre_step),
                         register_optimizer_step_post_hook(self._post_step)]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._watched = {}
        self._reset()

    def _reset(self) -> None:
        self._depth.clear()
        self._open.clear()
        self._pending.clear()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # what a step outside the batches left (e.g. the lr-0 step of an FSDP2 checkpoint load) is not logged
        self._reset()

    # --- on each optimizer step ---------------------------------------------------------------------------------
    def _pre_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        key = id(optimizer)
        if key not in self._watched:
            return None
        self._depth[key] += 1
        if self._depth[key] > 1 or self._trainer is None or not is_logging_step(self._trainer, self.log_every_n_steps):
            return None
        record = self._plan(optimizer)
        self._open[key] = record
        closure, positional = _closure_of(args, kwargs)
        if closure is None:
            self._measure_before(optimizer, record)
            return None

        def closure_then_measure() -> Any:
            out = closure()
            if record.before is None:  # LBFGS evaluates it again: the step starts from the first evaluation
                self._measure_before(optimizer, record)
            return out

        if positional:
            return (args[0], closure_then_measure, *args[2:]), kwargs
        return args, {**kwargs, "closure": closure_then_measure}

    def _post_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        key = id(optimizer)
        if key not in self._watched:
            return
        self._depth[key] = max(0, self._depth[key] - 1)
        if self._depth[key] or key not in self._open:
            return
        record = self._open.pop(key)
        with torch.no_grad():
            params = [p for g in record.groups for p in g.params]
            after = squared_norms(params)
            squares = torch.cat([record.before, after]) if record.before is not None else after
            # one collective for the whole step; the kept scalars are the same on every rank and are not summed
            sum_over_shards_(squares, [*record.with_grad, *record.with_grad, *params])
            record.parts = [squares, *record.scalars.parts()]
        self._pending.append(record)

    @torch.no_grad()
    def _measure_before(self, optimizer: Optimizer, record: _StepRecord) -> None:
        """Squared norms of the weights that have a gradient, then of their gradients, in one batched pass."""
        with_grad = [p for g in record.groups for p in g.params if p.grad is not None]
        squares = squared_norms([*with_grad, *(p.grad for p in with_grad)])
        scale = getattr(optimizer, "grad_scale", None)
        if scale is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # fused optimizers under 16-mixed get the gradients still scaled, and the scale beside them
            scale = scale.to(squares.device).float() if isinstance(scale, Tensor) else float(scale)
            squares[len(with_grad):] /= scale**2
        record.with_grad, record.before = with_grad, squares

    # --- the decay each group gets ------------------------------------------------------------------------------
    def _plan(self, optimizer: Optimizer) -> _StepRecord:
        scalars = _Scalars()
        attached = self._attached(optimizer)
        groups = []
        for gi, group in enumerate(optimizer.param_groups):
            decay, special = _attached_decay(attached, group) if attached else (_own_decay(optimizer, group), None)
            param_decay = [special(p, decay) if special else decay for p in group["params"]]
            groups.append(_GroupPlan(
                index=gi,
                params=list(group["params"]),
                lr=scalars.keep(group["lr"]),
                kind=equilibrium_kind(optimizer, group),
                momentum=float(group.get("momentum", 0.0)),
                dampening=float(group.get("dampening", 0.0)),
                decay=_keep_decay(scalars, decay),
                param_decay=[_keep_decay(scalars, d) for d in param_decay],
            ))
        return _StepRecord(self._watched[id(optimizer)], groups, scalars)

    def _attached(self, optimizer: Optimizer) -> AttachedWeightDecay | None:
        """The attachment of a WeightDecay callback to ``optimizer`` (looked up at each logging step: the callback
        attaches in its own ``on_fit_start``, which may run after this one's)."""
        for cb in self._trainer.callbacks if self._trainer else ():
            if isinstance(cb, WeightDecay):
                for attached in cb.attached:
                    if attached.optimizer is optimizer:
                        return attached
        return None

    def _timescale_logged_elsewhere(self) -> bool:
        return any(isinstance(cb, WeightDecay) and cb.logs_decay for cb in self._trainer.callbacks)

    # --- after the batch: one transfer, then the loggers ---------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._pending:
            return
        by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
        for record in self._pending:
            for part in record.parts:
                by_device[part.device].append(part)
        host: dict[int, list[float]] = {}  # id(part) -> its values
        for parts in by_device.values():
            values = torch.cat(parts).tolist()  # the one device-to-host transfer (per device)
            start = 0
            for part in parts:
                host[id(part)] = values[start:start + part.numel()]
                start += part.numel()
        total = trainer.estimated_stepping_batches
        with_timescale = not self._timescale_logged_elsewhere()
        metrics: dict[str, float] = {}
        for record in self._pending:
            squares, *scalar_parts = (host[id(part)] for part in record.parts)
            scalars = [0.0] * len(record.scalars.tensors)
            for i, v in zip(record.scalars.order(), (v for part in scalar_parts for v in part)):
                scalars[i] = v
            metrics.update(self._metrics(record, squares, scalars, total, with_timescale))
        self._pending.clear()
        if trainer.is_global_zero:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _metrics(self, record: _StepRecord, squares: list[float], scalars: list[float], total: float,
                 with_timescale: bool) -> dict[str, float]:
        n_grad = len(record.with_grad)
        w_before, g_sq = squares[:n_grad], squares[n_grad:2 * n_grad]
        params = [p for g in record.groups for p in g.params]
        after = dict(zip(map(id, params), squares[2 * n_grad:]))
        before = {id(p): (w, g) for p, w, g in zip(record.with_grad, w_before, g_sq)}

        def value(x: Any) -> Any:
            return scalars[x.index] if isinstance(x, _Deferred) else x

        out: dict[str, float] = {}
        name = record.opt_name
        for plan in record.groups:
            lr = value(plan.lr)
            decay = _resolved(plan.decay, value)
            if with_timescale and decay is not None and decay[0] == "shrink":
                out[f"timescale/{name}/pg{plan.index}"] = 1 / decay[1]
                if math.isfinite(total):
                    out[f"timescale_fraction/{name}/pg{plan.index}"] = 1 / (decay[1] * total)
            for i, (p, d) in enumerate(zip(plan.params, plan.param_decay)):
                pname = self._names.get(id(p), f"{name}/pg{plan.index}/param{i}")
                out[f"weight_norm/{pname}"] = math.sqrt(after[id(p)])
                w_sq, g2 = before.get(id(p), (None, None))
                if w_sq is not None:
                    out[f"grad_to_weight/{pname}"] = math.sqrt(g2 / w_sq) if w_sq > 0 else math.inf
                predicted = _equilibrium(plan, p, lr, _resolved(d, value), w_sq, g2)
                if predicted is not None:
                    out[f"equilibrium_norm/{pname}"] = predicted
        return out


# --- the decay as WeightDecay or the optimizer applies it ------------------------------------------------------------
def _own_decay(optimizer: Optimizer, group: dict[str, Any]) -> Decay | None:
    """The optimizer's own decay of ``group``, as its registry entry describes it; ``None``: none, or not known."""
    wd = group.get("weight_decay", 0.0)
    rule, _ = rule_for(optimizer)
    own = rule.own_rule(optimizer, group)
    if own == "coupled":
        return ("l2", wd)
    step = rule.step_size(optimizer, group) if rule.step_size is not None else None
    if own == "decoupled" and step is not None:
        return ("shrink", per_step_decay("decoupled", group["lr"], wd, None, step))
    return None  # another rule, or a step size known only inside the step (a relative one): no decay we can read


def _attached_decay(attached: AttachedWeightDecay, group: dict[str, Any]
                    ) -> tuple[Decay | None, Callable[[Tensor, Decay | None], Decay | None]]:
    """The decay WeightDecay gives ``group`` in the coming step, and a function giving each parameter's: none for
    excluded parameters, plain decoupled decay for the ``uncorrected`` ones of ``mode="corrected"``."""
    wd = attached.current_weight_decay(group)
    shrink = attached.per_step_decay(group, wd)
    decay: Decay | None = ("l2", wd) if attached.mode == "coupled" else None if shrink is None else ("shrink", shrink)

    def of(p: Tensor, group_decay: Decay | None) -> Decay | None:
        if attached.is_excluded(p):
            return None
        if attached.is_uncorrected(p):
            step = attached.step_size(group)
            return None if step is None else ("shrink", per_step_decay("decoupled", group["lr"], wd, None, step))
        return group_decay

    return decay, of


def _keep_decay(scalars: _Scalars, decay: Decay | None) -> Decay | None:
    return None if decay is None else (decay[0], scalars.keep(decay[1]))


def _resolved(decay: Decay | None, value: Callable[[Any], Any]) -> Decay | None:
    """The decay with its number read; ``None`` where it decays nothing (0, or no shrink factor at all)."""
    if decay is None or decay[1] is None:
        return None
    x = float(value(decay[1]))
    return (decay[0], x) if x > 0 else None


def _equilibrium(plan: _GroupPlan, p: Tensor, lr: float, decay: Decay | None, w_sq: float | None,
                 g_sq: float | None) -> float | None:
    """The predicted norm of weight matrix ``p`` (see :mod:`lightning_wd.weight_norm`), or ``None`` where the paper
    has no prediction: 1-D parameters, no decay, an update rule it does not cover."""
    if p.dim() < 2 or decay is None or plan.kind is None:
        return None
    kind, x = decay
    scale_free = math.sqrt(w_sq * g_sq) if w_sq is not None else None  # |g~| = |g| |w| of the whole matrix
    if plan.kind in ("adam", "lion") and kind == "shrink":
        return normalized_update_norm(lr, x, p.numel())
    if plan.kind == "adam" and kind == "l2" and scale_free is not None:
        return adam_l2_norm(lr, x, p.numel(), scale_free)
    if plan.kind == "sgdm" and scale_free is not None:
        decay_arg = {"weight_decay": x} if kind == "l2" else {"shrink": x}
        return sgdm_norm(lr, scale_free, plan.momentum, plan.dampening, **decay_arg)
    return None
