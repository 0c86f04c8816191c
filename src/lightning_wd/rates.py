"""What an effective-lr formula gives, and the pieces the formulas are built from, as plain torch functions.

An adaptive optimizer moves each element of a parameter by ``rate * m``: ``m`` is the element's bias-corrected first
moment (Adam's ``m_hat``), or its gradient where the optimizer keeps no first moment, and ``rate``, the element's
*effective learning rate*, has the form ``scale / (sqrt(u) + eps)``, with ``u`` a second-moment estimate and
``scale``, ``eps`` scalars. A :class:`RateSpec` describes one parameter's rate without computing it: ``scale``,
``eps``, and a ``fill`` that writes ``sqrt(u)`` for a range of elements into a buffer. A :class:`Formula` is what the
registry (:mod:`lightning_wd.optimizers`, ``OptimizerRule.effective_lr``) knows of an optimizer: how to make the specs
of its parameters from their state and param group, or why it has no per-element rate. The formulas themselves live
beside the optimizers' entries (``torch.optim``'s in :mod:`lightning_wd.optimizers.torch_rates`); the statistics that
summarize the rates are in :mod:`lightning_wd.effective_lr`.

Example::

    >>> import torch
    >>> v = torch.tensor([4.0, 16.0])
    >>> spec = root_rate(v, scale=1e-2, eps=0.0)  # 1e-2 / sqrt(v)
    >>> out = torch.empty(2)
    >>> spec.fill(0, 2, out)  # sqrt(v), what the statistics divide the scale by
    >>> out
    tensor([2., 4.])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_wd._types import Scalar

__all__ = [
    "ORTHOGONALIZED",
    "PLAIN_LR",
    "SIGN_UPDATE",
    "Formula",
    "RateSpec",
    "bias_correction",
    "copy_fill",
    "flat_view",
    "root_fill",
    "root_rate",
    "state_numel",
    "step_count",
    "stepwise",
    "zero_fill",
]


@dataclass(frozen=True)
class RateSpec:
    """The effective learning rate ``scale / (sqrt(u) + eps)`` of each element of one parameter.

    Args:
        scale, eps: Python floats or 0-dim tensors (on the state's device, or CPU); never read on the host.
        numel: the number of elements.
        fill: ``fill(start, stop, out)`` writes ``sqrt(u)`` of the elements ``start:stop`` (in the order of the
            state's memory, which is all the statistics need) into the fp32 tensor ``out`` of ``stop - start``
            elements. It writes the root rather than ``u`` so that for Adam the read of the state and the square
            root are one pass (``torch.sqrt(v, out=...)``), and Adamax's ``exp_inf`` goes in as it is. It writes
            every element of ``out``, and the same roots each time it is asked for the same elements: the Triton
            pass asks twice (once per phase) for a state it cannot read as stored.
        device: where the state lives and the work happens.
        row: ``fill`` is only asked for whole rows of this many elements (Adafactor's factored second moment is
            built row by row), but for the last, which ends at ``numel``; at least 1.

    Example::

        >>> v = torch.tensor([4.0, 16.0])
        >>> spec = RateSpec(1e-2, 0.0, 2, lambda a, b, out: torch.sqrt(v[a:b], out=out), v.device)
        >>> from lightning_wd.effective_lr import effective_lr
        >>> effective_lr(spec)
        tensor([0.0050, 0.0025])
    """

    scale: Scalar
    eps: Scalar
    numel: int
    fill: Callable[[int, int, Tensor], None]
    device: torch.device
    row: int = 1

    def __post_init__(self) -> None:
        if self.row < 1:  # a formula's bug: said where it is made, not as a division by zero in a pass
            raise ValueError(f"RateSpec row must be a whole number of elements >= 1, got {self.row!r}")


# --- the pieces of a formula -----------------------------------------------------------------------------------------


def step_count(state: dict[str, Any]) -> float | Tensor:
    """``state["step"]``, the step count ``t`` after the update: a float when it lives on the host, else the device
    tensor (no sync)."""
    step = state["step"]
    if isinstance(step, Tensor) and step.device.type == "cpu":
        return float(step)  # a CPU scalar, as torch's own optimizers keep it: reading it costs no device sync
    return step


def flat_view(t: Tensor) -> Tensor:
    """All elements of ``t`` as a 1-D view in memory order (a copy only for a tensor that is not dense).

    The statistics do not depend on the order of the elements, so a channels-last state needs no copy; states of
    one parameter share their strides, so their flat views pair up element by element.
    """
    t = t.detach()
    if t.is_complex():  # a complex state holds two numbers per element, each with its own rate, as the optimizer
        t = torch.view_as_real(t.resolve_conj())  # sees them (torch's optimizers step them through view_as_real)
    if t.is_contiguous():
        return t.view(-1)
    t = t.permute(sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True))
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


class _StateFill:
    """``fill`` writing ``sqrt(t)`` (``root=True``) or ``t`` itself (a state that is already the root, as Adamax's
    ``exp_inf``), over ``t``'s elements in memory order. Its ``flat`` state is also what the fused Triton pass reads
    in place of the calls (:func:`lightning_wd.effective_lr.fused_kernel_available`)."""

    def __init__(self, t: Tensor, root: bool) -> None:
        self.flat = flat_view(t)
        self.root = root

    def __call__(self, start: int, stop: int, out: Tensor) -> None:
        part = self.flat[start:stop]
        if not self.root:
            out.copy_(part)
        elif part.dtype == torch.float32:
            torch.sqrt(part, out=out)
        else:  # a low-precision state in fp32 (`torch.sqrt(bf16, out=fp32)` would take the root in bf16)
            out.copy_(part).sqrt_()


def root_fill(t: Tensor) -> _StateFill:
    """``fill`` writing ``sqrt(t)``."""
    return _StateFill(t, root=True)


def copy_fill(t: Tensor) -> _StateFill:
    """``fill`` writing ``t`` itself, for a state that is already the root (Adamax's ``exp_inf``)."""
    return _StateFill(t, root=False)


def state_numel(t: Tensor) -> int:
    """The number of rates of a state ``t``: twice its elements for a complex one (see :func:`flat_view`)."""
    return t.numel() * (2 if t.is_complex() else 1)


def zero_fill(start: int, stop: int, out: Tensor) -> None:
    out.zero_()


def root_rate(v: Tensor, scale: Scalar, eps: Scalar) -> RateSpec:
    """``scale / (sqrt(v) + eps)`` of every element of the second-moment state ``v``: the shape of most formulas
    (the registry's family modules build theirs from it)."""
    return RateSpec(scale, eps, state_numel(v), root_fill(v), v.device)


def bias_correction(beta: float, step: float | Tensor) -> Scalar:
    """``1 - beta**step``: a float for a host step, an fp64 tensor on the step's device for a device step."""
    if isinstance(step, Tensor):
        return 1 - torch.pow(beta, step.double())
    return 1 - beta**step


def stepwise(steps: Sequence[float | Tensor], fn: Callable[[float | Tensor], tuple[Scalar, ...]]
             ) -> list[tuple[Scalar, ...]]:
    """``fn(step)`` for the step count of each of a group's parameters, with the tensor ops run once per group: a
    host step (a float) on its own, the device steps of one device stacked into one vector and passed to ``fn`` at
    once, each parameter getting 0-dim views of the results.

    A fused or capturable optimizer keeps a step count per parameter on the device, so a formula's bias correction
    is a few tensor ops per parameter, each a kernel launch at several microseconds of host time on a GPU: more than
    the statistics themselves for a model of many parameters. On a GPU an elementwise op gives each element the
    number it gives it alone (on a CPU, vectorized ``pow`` may differ in the last bit of a float64), so the rates are
    the same to the last bit, provided ``fn`` promotes dtypes alike for a 0-dim step and a vector of them: torch ranks
    a 0-dim tensor operand (a tensor lr, say) below a dimensioned one of the same kind, so keep the results at least
    as wide as any such operand (as Adam's float64 bias correction is), and every tensor operand 0-dim. ``fn`` gives
    numbers, 0-dim tensors (shared by every step) or one value per step; the steps of one device and dtype are
    stacked together (stacking steps of two dtypes would round them).

    Example::

        >>> [r for r, in stepwise([2.0, torch.tensor(3.0)], lambda t: (t * 2,))]
        [4.0, tensor(6.)]
    """
    out: list[tuple[Scalar, ...] | None] = [None] * len(steps)
    batches: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(steps):
        if isinstance(t, Tensor):  # one dtype per stack: stacking int64 with bf16 steps would round them
            batches.setdefault((t.device, t.dtype), []).append(i)
        else:
            out[i] = fn(t)
    for index in batches.values():
        if len(index) == 1:  # 0-dim, as each step of a stack is: the same promotions either way
            out[index[0]] = fn(steps[index[0]].reshape(()))
            continue
        n = len(index)
        results = fn(torch.stack([steps[i].reshape(()) for i in index]))
        for r in results:
            if isinstance(r, Tensor) and r.dim() and r.shape != (n,):
                raise ValueError(f"stepwise: fn gave a result of shape {tuple(r.shape)} for {n} steps; it must give "
                                 f"numbers, 0-dim tensors (the same for every step) or one value per step ({n},)")
        for k, i in enumerate(index):
            out[i] = tuple(r[k] if isinstance(r, Tensor) and r.dim() else r for r in results)
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Formula:
    """What the monitor knows about one optimizer class.

    Args:
        spec: ``spec(state, group, param)`` makes one parameter's :class:`RateSpec` (``None`` for a parameter not
            stepped yet); ``None`` for an optimizer without a per-element rate.
        note: for an optimizer without one, why, and what to log instead.
        sharded: whether ``spec`` works on one process's shard of a parameter (FSDP2); Adafactor's factored second
            moment and its RMS(p) span the shards.
        batch: ``batch(states, group, params)``, the specs of a group's parameters at once, where making them one
            by one costs tensor ops per parameter (a bias correction of a step kept on the device, see
            :func:`stepwise`); it must give what ``spec`` gives for each.
    """

    spec: Callable[[dict[str, Any], dict[str, Any], Tensor], RateSpec | None] | None
    note: str = ""
    sharded: bool = True
    batch: Callable[[Sequence[dict[str, Any]], dict[str, Any], Sequence[Tensor]], list[RateSpec | None]] | None = None

    def specs(self, states: Sequence[dict[str, Any]], group: dict[str, Any], params: Sequence[Tensor]
              ) -> list[RateSpec | None]:
        """The :class:`RateSpec` of each of a group's parameters (``None`` for one not stepped yet)."""
        if self.batch is not None:
            return self.batch(states, group, params)
        assert self.spec is not None
        return [self.spec(state, group, p) for state, p in zip(states, params)]


#: the formulas of optimizers without a per-element rate, shared by their registry entries
SIGN_UPDATE = Formula(None, "its update is the sign of a momentum (every element moves by lr): no per-element rate")
PLAIN_LR = Formula(None, "its rate is the lr itself for every element: use LearningRateMonitor")
ORTHOGONALIZED = Formula(None, "it orthogonalizes the whole update matrix: no elementwise rate")
