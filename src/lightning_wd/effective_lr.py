"""Effective learning rates of adaptive optimizers, and the statistics that summarize them, as plain torch functions.

An adaptive optimizer moves each element of a parameter by ``rate * m``: ``m`` is the element's bias-corrected first
moment (Adam's ``m_hat``), or its gradient where the optimizer keeps no first moment, and ``rate``, the element's
*effective learning rate*, has the form ``scale / (sqrt(u) + eps)``, with ``u`` a second-moment estimate and
``scale``, ``eps`` scalars. The functions ``*_rate`` below read one parameter's ``scale``, ``eps`` and ``u`` from its
optimizer state and param group (each formula is in its function's docstring); which optimizer uses which is in its
entry of the optimizer registry (:mod:`lightning_wd.optimizers`, ``OptimizerRule.effective_lr``).

A :class:`RateSpec` describes one parameter's rate without computing it: ``scale``, ``eps``, and a ``fill`` that
writes ``sqrt(u)`` for a range of elements into a buffer. :func:`rate_statistics` streams the parameters of a param
group through one chunk-sized scratch buffer and returns the min, max, mean and median of each parameter's rate and of
the whole group's, with no host read and with memory that grows neither with the size of the largest parameter nor
with the number of parameters. On a CUDA GPU, a state read by a plain root goes through two fused Triton kernels instead
(:mod:`lightning_wd.rate_triton`, :func:`fused_kernel_available`): two reads of the state for all the
statistics, about half the time of the torch ops.

Example::

    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(3))
    >>> opt = torch.optim.Adam([w], lr=1e-3)
    >>> w.grad = torch.tensor([1e-4, 1e-2, 1.0])
    >>> opt.step()
    >>> spec = adam_rate(opt.state[w], opt.param_groups[0], w)
    >>> [round(x, 4) for x in effective_lr(spec).tolist()]  # after one step v_hat = grad**2: lr / (|grad| + eps)
    [9.999, 0.1, 0.001]
    >>> w_stats, group_stats = rate_statistics([spec])  # [min, max, mean, median] of w, then of its param group
    >>> [round(x, 4) for x in w_stats.tolist()]  # the median from a histogram: within 0.39% of 0.1
    [0.001, 9.999, 3.3667, 0.0999]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_wd._types import Scalar

#: the statistics logged for every parameter, in this order
STATS: tuple[str, ...] = ("min", "max", "mean", "median")

#: the histogram of the rate behind the median: ``2**MANTISSA_BITS`` bins per power of two of the rate, over
#: ``2**RATE_EXPONENTS[0] <= rate < 2**RATE_EXPONENTS[1]`` (rates outside go to the end bins)
MANTISSA_BITS: int = 7
RATE_EXPONENTS: tuple[int, int] = (-64, 40)
HIST_BINS: int = (RATE_EXPONENTS[1] - RATE_EXPONENTS[0]) << MANTISSA_BITS
_SHIFT = 23 - MANTISSA_BITS
_FIRST_BIN_BITS = (RATE_EXPONENTS[0] + 127) << MANTISSA_BITS  # fp32 bits of 2**lo, shifted like a bin index
_LAST_BIN_BITS = _FIRST_BIN_BITS + HIST_BINS - 1

#: how many parameters' partial statistics :func:`rate_statistics` holds at a time (and reduces per collective)
BLOCK_ROWS: int = 16

__all__ = [
    "BLOCK_ROWS",
    "HIST_BINS",
    "MANTISSA_BITS",
    "RATE_EXPONENTS",
    "STATS",
    "Formula",
    "ORTHOGONALIZED",
    "PLAIN_LR",
    "SIGN_UPDATE",
    "Partials",
    "RateSpec",
    "accumulate_partials",
    "adafactor_rate",
    "bias_correction",
    "root_rate",
    "adagrad_rate",
    "adam_rate",
    "adam_rates",
    "adamax_rate",
    "chunk_elements",
    "effective_lr",
    "empty_partials",
    "fused_kernel_available",
    "fused_kernel_disabled",
    "fused_kernel_enabled",
    "histogram_median_rel_error",
    "make_scratch",
    "radam_rate",
    "rate_statistics",
    "rmsprop_rate",
    "sparse_adam_rate",
    "stepwise",
    "summarize_partials",
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
            root are one pass (``torch.sqrt(v, out=...)``), and Adamax's ``exp_inf`` goes in as it is.
        device: where the state lives and the work happens.
        row: ``fill`` is only asked for whole rows of this many elements (Adafactor's factored second moment is
            built row by row).

    Example::

        >>> v = torch.tensor([4.0, 16.0])
        >>> spec = RateSpec(1e-2, 0.0, 2, lambda a, b, out: torch.sqrt(v[a:b], out=out), v.device)
        >>> effective_lr(spec)
        tensor([0.0050, 0.0025])
    """

    scale: Scalar
    eps: Scalar
    numel: int
    fill: Callable[[int, int, Tensor], None]
    device: torch.device
    row: int = 1


# --- the formulas, one function per optimizer family ------------------------------------------------------------


def _step(state: dict[str, Any]) -> float | Tensor:
    """The step count ``t`` after the update: a float when it lives on the host, else the device tensor (no sync)."""
    step = state["step"]
    if isinstance(step, Tensor) and step.device.type == "cpu":
        return float(step)  # a CPU scalar, as torch's own optimizers keep it: reading it costs no device sync
    return step


def _bias_correction(beta: float, step: float | Tensor) -> Scalar:
    """``1 - beta^step``: a float for a host step, an fp64 tensor on the step's device for a device step."""
    if isinstance(step, Tensor):
        return 1 - torch.pow(beta, step.double())
    return 1 - beta**step


def _sqrt(x: Scalar) -> Scalar:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def _minimum(a: Scalar, b: Scalar) -> Scalar:
    """``min(a, b)`` of floats or 0-dim tensors, without reading a tensor on the host."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return min(a, b)


def _flat(t: Tensor) -> Tensor:
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
    in place of the calls (:func:`fused_kernel_available`)."""

    def __init__(self, t: Tensor, root: bool) -> None:
        self.flat = _flat(t)
        self.root = root

    def __call__(self, start: int, stop: int, out: Tensor) -> None:
        part = self.flat[start:stop]
        if not self.root:
            out.copy_(part)
        elif part.dtype == torch.float32:
            torch.sqrt(part, out=out)
        else:  # a low-precision state in fp32 (`torch.sqrt(bf16, out=fp32)` would take the root in bf16)
            out.copy_(part).sqrt_()


def _root_fill(t: Tensor) -> _StateFill:
    """``fill`` writing ``sqrt(t)``."""
    return _StateFill(t, root=True)


def _copy_fill(t: Tensor) -> _StateFill:
    """``fill`` writing ``t`` itself, for a state that is already the root (Adamax's ``exp_inf``)."""
    return _StateFill(t, root=False)


def _numel(t: Tensor) -> int:
    """The number of rates of a state ``t``: twice its elements for a complex one (see :func:`_flat`)."""
    return t.numel() * (2 if t.is_complex() else 1)


def _zero_fill(start: int, stop: int, out: Tensor) -> None:
    out.zero_()


def root_rate(v: Tensor, scale: Scalar, eps: Scalar) -> RateSpec:
    """``scale / (sqrt(v) + eps)`` of every element of the second-moment state ``v``: the shape of most formulas
    (the registry's family modules build theirs from it)."""
    return RateSpec(scale, eps, _numel(v), _root_fill(v), v.device)


def bias_correction(beta: float, step: float | Tensor) -> Scalar:
    """``1 - beta**step`` (see :func:`_bias_correction`)."""
    return _bias_correction(beta, step)


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


def adam_rates(states: Sequence[dict[str, Any]], group: dict[str, Any], params: Sequence[Tensor] | None = None
               ) -> list[RateSpec | None]:
    """:func:`adam_rate` of the parameters of one param group, with their bias corrections computed together
    (:func:`stepwise`)."""
    key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
    stepped = [i for i, state in enumerate(states) if key in state]
    # torch takes an lr tensor of one element in any shape: as a 0-dim one, it is a scalar of the rate whatever the
    # steps' shape, and a group's rates are those of each parameter alone
    lr = group["lr"].reshape(()) if isinstance(group["lr"], Tensor) else group["lr"]

    def scalars(t: float | Tensor) -> tuple[Scalar, Scalar]:
        root_bc2 = _sqrt(_bias_correction(group["betas"][1], t))
        return lr * root_bc2, group["eps"] * root_bc2

    out: list[RateSpec | None] = [None] * len(states)
    for i, (scale, eps) in zip(stepped, stepwise([_step(states[i]) for i in stepped], scalars)):
        v = states[i][key]
        out[i] = RateSpec(scale, eps, _numel(v), _root_fill(v), v.device)
    return out


def adam_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``lr / (sqrt(v / (1 - beta2^t)) + eps)``, the factor of ``m_hat = m / (1 - beta1^t)`` in the update of
    ``torch.optim.Adam`` and ``AdamW``, with ``v = max_exp_avg_sq`` under AMSGrad, else ``exp_avg_sq``.

    It is also ``torch.optim.NAdam``'s rate (decoupled decay or not): NAdam divides by the same denominator, and
    its momentum-schedule weights ``mu_t`` are scalars of its numerator, which this rate multiplies:
    ``(1 - mu_t) / (1 - prod mu) * grad + mu_{t+1} / (1 - prod mu * mu_{t+1}) * m``.

    Computed as ``lr * sqrt(bc2) / (sqrt(v) + eps * sqrt(bc2))``, the same number, so that the square root is taken
    of ``v`` as it is stored. ``None`` for a parameter the optimizer has not stepped yet. :func:`adam_rates` makes
    those of a whole group.
    """
    return adam_rates([state], group)[0]


def sparse_adam_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``lr * sqrt(1 - beta2^t) / (sqrt(v) + eps)``, the factor of ``m_hat`` in ``torch.optim.SparseAdam``'s update
    (its ``eps`` is added before the bias correction, unlike Adam's). A step moves only the rows of its sparse
    gradient; this is the rate of each element at the step that moves it."""
    if "exp_avg_sq" not in state:
        return None
    v = state["exp_avg_sq"]
    root_bc2 = _sqrt(_bias_correction(group["betas"][1], _step(state)))
    return RateSpec(group["lr"] * root_bc2, group["eps"], _numel(v), _root_fill(v), v.device)


def radam_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``lr * r_t * sqrt(1 - beta2^t) / (sqrt(v) + eps)`` once ``torch.optim.RAdam`` rectifies (``rho_t > 5``), else
    ``lr`` for every element: the factor of ``m_hat`` in its update, with torch's
    ``rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)``, ``rho_inf = 2 / (1 - beta2) - 1`` and
    ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))``. For a device step
    (``capturable``) the choice is made on the device."""
    if "exp_avg_sq" not in state:
        return None
    v, lr, eps = state["exp_avg_sq"], group["lr"], group["eps"]
    beta2, t = group["betas"][1], _step(state)
    bc2 = _bias_correction(beta2, t)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2**t / bc2
    rect_sq = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    if isinstance(rho_t, Tensor):
        on = rho_t > 5
        root_fill = _root_fill(v)

        def fill(start: int, stop: int, out: Tensor) -> None:
            root_fill(start, stop, out)
            out.mul_(on)  # sqrt(u) = 0 and eps = 1 before rectification: the rate is lr

        # where() keeps the NaN of the root of a negative rect_sq out of the chosen branch
        scale = torch.where(on, lr * rect_sq.clamp(min=0).sqrt() * bc2.sqrt(), lr)
        return RateSpec(scale, torch.where(on, eps, 1.0), _numel(v), fill, v.device)
    if rho_t > 5:
        return RateSpec(lr * math.sqrt(rect_sq) * math.sqrt(bc2), eps, _numel(v), _root_fill(v), v.device)
    return RateSpec(lr, 1.0, _numel(v), _zero_fill, v.device)


def adamax_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``lr / exp_inf``: the factor of the bias-corrected first moment ``m / (1 - beta1^t)`` in the update of
    ``torch.optim.Adamax``, which torch writes ``lr / (1 - beta1^t) * m / exp_inf`` (its ``eps`` is inside
    ``exp_inf``, the running max of ``|grad| + eps``)."""
    if "exp_inf" not in state:
        return None
    u = state["exp_inf"]
    return RateSpec(group["lr"], 0.0, _numel(u), _copy_fill(u), u.device)


def rmsprop_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``lr / (sqrt(square_avg) + eps)``, with ``square_avg - grad_avg^2`` under ``centered=True``: the factor of the
    gradient in ``torch.optim.RMSprop``'s update. With ``momentum > 0`` the gradient times ``rate / lr`` enters the
    momentum buffer, which the update multiplies by ``lr``."""
    if "square_avg" not in state:
        return None
    sq = state["square_avg"]
    if not group.get("centered", False):
        return RateSpec(group["lr"], group["eps"], _numel(sq), _root_fill(sq), sq.device)
    sq_flat, avg_flat = _flat(sq), _flat(state["grad_avg"])

    def fill(start: int, stop: int, out: Tensor) -> None:
        s, g = sq_flat[start:stop], avg_flat[start:stop]
        if s.dtype == torch.float32:
            torch.addcmul(s, g, g, value=-1, out=out)
        else:
            out.copy_(s).addcmul_(g, g, value=-1)
        out.sqrt_()

    return RateSpec(group["lr"], group["eps"], _numel(sq), fill, sq.device)


def adagrad_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``lr / (1 + (t - 1) * lr_decay) / (sqrt(sum) + eps)``: the factor of the gradient in ``torch.optim.Adagrad``'s
    update. ``None`` before the parameter's first step (Adagrad makes its state when it is built)."""
    if "sum" not in state:
        return None
    t = _step(state)
    if not isinstance(t, Tensor) and t == 0:
        return None
    s = state["sum"]
    return RateSpec(group["lr"] / (1 + (t - 1) * group["lr_decay"]), group["eps"], _numel(s), _root_fill(s), s.device)


def adafactor_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor) -> RateSpec | None:
    """``alpha / sqrt(max(v_est, eps1^2))``: the factor of the gradient in ``torch.optim.Adafactor``'s update.

    ``v_est = row_var ⊗ col_var / max(mean(row_var), eps1)`` (torch's ``var_estimate``, built here one chunk of rows
    at a time, never for the whole parameter), or ``variance`` for a parameter of fewer than 2 dimensions;
    ``eps1`` is the machine epsilon of the parameter's dtype when the group's ``eps[0]`` is None.
    ``alpha = max(eps2, RMS(p)) * min(lr, 1 / sqrt(t))``, its relative step size.

    Two factors of the update are not in this rate. ``RMS(p)``: torch measures it before the update, this function
    (called after the step) measures ``param`` as it is given, so the rate is off by the step's relative change of
    the parameter's RMS (``RMS(p_after) / RMS(p_before)``), unless ``eps2`` dominates. And torch's update clipping,
    the factor ``1 / max(1, RMS(update) / d)`` (with ``d`` the group's ``d``, 1 by default), which depends on the
    gradient, not on the state.
    """
    if "row_var" not in state and "variance" not in state:
        return None
    if param.numel() == 0:
        return None
    eps1, eps2 = group["eps"]
    eps1 = torch.finfo(param.dtype).eps if eps1 is None else eps1
    rho = _minimum(group["lr"], 1 / _sqrt(_step(state)))
    p = param.detach()
    rms = torch.linalg.vector_norm(p, dtype=torch.promote_types(p.dtype, torch.float32)) / math.sqrt(p.numel())
    alpha = rms.clamp_(min=eps2).mul_(rho)
    if "variance" in state:
        flat = _flat(state["variance"])

        def fill_variance(start: int, stop: int, out: Tensor) -> None:
            out.copy_(flat[start:stop]).clamp_(min=eps1 * eps1).sqrt_()

        return RateSpec(alpha, 0.0, param.numel(), fill_variance, param.device)
    row_var, col_var = state["row_var"], state["col_var"]  # (..., R, 1) and (..., 1, C)
    n_rows, n_cols = row_var.shape[-2], col_var.shape[-1]
    rows = row_var.detach().reshape(-1).float()  # one entry per row of every matrix (small: no parameter-sized copy)
    cols = col_var.detach().reshape(-1, n_cols).float()
    means = row_var.detach().float().mean(dim=-2).clamp_(min=eps1).reshape(-1)

    def fill(start: int, stop: int, out: Tensor) -> None:
        r, end = start // n_cols, stop // n_cols
        while r < end:  # one matrix of a batch of matrices at a time
            m = r // n_rows
            r_stop = min(end, (m + 1) * n_rows)
            seg = out[(r - start // n_cols) * n_cols : (r_stop - start // n_cols) * n_cols].view(r_stop - r, n_cols)
            torch.mul(rows[r:r_stop, None], cols[m], out=seg).div_(means[m])  # as torch: (row @ col) / mean
            r = r_stop
        out.clamp_(min=eps1 * eps1).sqrt_()

    return RateSpec(alpha, 0.0, param.numel(), fill, param.device, row=n_cols)


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


# --- the statistics ---------------------------------------------------------------------------------------------

_triton_enabled = True
#: where the fused pass runs: CUDA GPUs; the tests add "cpu" under Triton's interpreter (``TRITON_INTERPRET=1``)
_TRITON_DEVICES: tuple[str, ...] = ("cuda",)


def fused_kernel_enabled() -> bool:
    """Whether the fused Triton pass may be used (``False`` inside :func:`fused_kernel_disabled`)."""
    return _triton_enabled


def fused_kernel_available(device: torch.device | str | None = None) -> bool:
    """Whether :func:`rate_statistics` takes the fused Triton pass on ``device`` (default: any CUDA device): Triton
    is installed (it comes with torch's CUDA builds), the device is a CUDA GPU, and the pass is not switched off.

    The fused pass reads each state twice in all (once for the minimum, maximum, sum and the histogram of the rate's
    powers of two, once for the bins of the median's power of two), instead of the eager torch pass's eight ops per
    chunk and its atomic-bound histogram: on an H200, a small fraction of an optimizer step where the eager pass
    costs many (BENCHMARKS.md). Both give the same statistics. Elsewhere (a CPU, a GPU without Triton, an
    accelerator Triton does not serve) the eager pass runs.
    """
    device = torch.device(device) if device is not None else None
    if not _triton_enabled or (device.type != "cuda" if device is not None else not torch.cuda.is_available()):
        return False
    from lightning_wd import rate_triton

    return rate_triton.HAS_TRITON


@contextlib.contextmanager
def fused_kernel_disabled() -> Iterator[None]:
    """Within it, the statistics go through the eager torch pass even where the fused Triton pass is available: to
    compare the two, or to rule the kernel out.

    Example::

        >>> with fused_kernel_disabled():
        ...     fused_kernel_available("cuda")
        False
    """
    global _triton_enabled
    enabled, _triton_enabled = _triton_enabled, False
    try:
        yield
    finally:
        _triton_enabled = enabled


def chunk_elements(device: torch.device) -> int:
    """How many elements :func:`accumulate_partials` processes at a time on ``device``.

    On a CPU, chunks of 1M elements (4 MB) stay in cache across the passes over them: an 8.4M-element tensor takes
    1.3x as long all at once as in chunks, 512K-element chunks 1.05x as long as 1M ones, 2M as long
    (``benchmarks/stats_pass.py``). On an accelerator the chunks are larger, to keep the number of kernel launches
    down; either way the scratch memory of a logging step is bounded, whatever the largest parameter.
    """
    return 1 << 20 if device.type == "cpu" else 1 << 24


def _chunk(spec: RateSpec) -> int:
    """The elements of ``spec`` per chunk: :func:`chunk_elements`, in whole rows, at most the parameter."""
    n = chunk_elements(spec.device)
    if spec.row > 1:
        n = max(spec.row, n - n % spec.row)
    return max(1, min(n, spec.numel))


def make_scratch(numel: int, device: torch.device) -> Tensor:
    """The fp32 buffer that :func:`accumulate_partials` works in, for chunks of up to ``numel`` elements; reuse it
    across parameters (fresh allocations each cost page faults, which on a CPU take longer than the arithmetic)."""
    return torch.empty(max(1, numel), dtype=torch.float32, device=device)


def effective_lr(spec: RateSpec) -> Tensor:
    """The rate of every element of ``spec``, flat, in fp32: a parameter-sized tensor (the statistics never make
    one); elementwise the very numbers whose min, max and mean :func:`rate_statistics` reports."""
    out = torch.empty(spec.numel, dtype=torch.float32, device=spec.device)
    if spec.numel:
        spec.fill(0, spec.numel, out)
    return _rate_(out, spec)


def _rate_(root: Tensor, spec: RateSpec) -> Tensor:
    """``scale / (root + eps)`` in place: one division (``reciprocal_().mul_()`` costs a pass more)."""
    if isinstance(spec.eps, Tensor) or spec.eps != 0:  # Adamax and Adafactor have their eps inside the root
        root.add_(spec.eps)
    return torch.div(spec.scale, root, out=root)


class Partials(NamedTuple):
    """Statistics of rates that add up across chunks, parameters and shards, one row per parameter (or group).

    ``ext``: ``[..., 2]`` fp32, ``[min, max]`` of the rate (combined by min and max).
    ``sums``: ``[..., 2 + HIST_BINS]`` fp64, ``[sum of the rate, count, histogram of the rate]`` (combined by sum;
    counts exact up to 2**53).
    """

    ext: Tensor
    sums: Tensor


def empty_partials(rows: int, device: torch.device) -> Partials:
    """``rows`` rows of the partials of no elements: the identities of the combination."""
    # fill_ rather than a tensor from a list: on an accelerator, a copy from host memory waits for the device
    ext = torch.empty(rows, 2, dtype=torch.float32, device=device)
    ext[:, 0].fill_(float("inf"))
    ext[:, 1].fill_(float("-inf"))
    return Partials(ext, torch.zeros(rows, 2 + HIST_BINS, dtype=torch.float64, device=device))


def accumulate_partials(spec: RateSpec, ext: Tensor, sums: Tensor, scratch: Tensor) -> None:
    """Add the statistics of ``spec``'s rate into one row of partials (``ext`` of 2 values, ``sums`` of
    ``2 + HIST_BINS``), in chunks (:func:`chunk_elements`) of the fp32 ``scratch`` (:func:`make_scratch`).

    The histogram's bins are read straight off the bits of the fp32 rate (for non-negative floats the bit pattern
    grows with the value): its exponent and the first :data:`MANTISSA_BITS` bits of its mantissa. Nothing is read on
    the host, and the result does not depend on the chunk size (but for the order of the fp32 sums).

    On a CPU, a state behind a plain root or copy ``fill`` goes through the fused kernel instead, in one pass and
    without the scratch (:func:`fused_kernel_available`).
    """
    if spec.numel == 0:
        return
    _accumulate_eager(spec, ext, sums, scratch)


def _accumulate_eager(spec: RateSpec, ext: Tensor, sums: Tensor, scratch: Tensor) -> None:
    """:func:`accumulate_partials` by torch ops, chunk by chunk through ``scratch``."""
    # below this many elements a chunk's counts go straight into the row (`index_add_`): `bincount` fills and adds
    # a count for every possible bin, ~15 us whatever the chunk (benchmarks/stats_pass.py)
    small = 1 << 14
    step = min(_chunk(spec), scratch.numel() - scratch.numel() % spec.row)
    if step < 1:
        raise ValueError(f"scratch of {scratch.numel()} elements holds no row of {spec.row}")
    sums[1].add_(spec.numel)
    for start in range(0, spec.numel, step):
        n = min(step, spec.numel - start)
        rate = scratch[:n]
        spec.fill(start, start + n, rate)
        _rate_(rate, spec)
        lo, hi = torch.aminmax(rate)
        torch.minimum(ext[0], lo, out=ext[0])
        torch.maximum(ext[1], hi, out=ext[1])
        # torch's fp32 sum is a cascade sum, accurate to ~1e-7 without an fp64 copy
        sums[0].add_(rate.sum())
        # the bin indices overwrite the rates they come from (a second buffer measured 1.05x the time, and twice
        # the memory); clamped: a NaN rate (its sign bit set) goes to the first bin instead of failing the count
        bits = rate.view(torch.int32)
        idx = torch.bitwise_right_shift(bits, _SHIFT, out=bits).clamp_(_FIRST_BIN_BITS, _LAST_BIN_BITS)
        _count_bins(idx, sums[2:], None if n >= small else False)


def _count_bins(idx: Tensor, hist: Tensor, bincount: bool | None = None) -> None:
    """``hist[i] += (idx == _FIRST_BIN_BITS + i).sum()`` for every bin ``i``, ``idx`` clamped to the bins:
    ``bincount`` on a CPU (the fastest there; counted from index 0 so that the offset costs no pass), elsewhere an
    ``index_add_`` into the fixed bins (``bincount`` sizes its output from the data, which costs a host sync;
    ``index_add_`` takes the int32 ``idx`` as it is, where ``scatter_add_`` would need an int64 copy). ``idx`` is
    scratch: it may be overwritten."""
    use_bincount = idx.device.type == "cpu" if bincount is None else bincount
    if use_bincount:
        counts = torch.bincount(idx)  # as long as the largest index: at least _FIRST_BIN_BITS + 1
        hist[: counts.numel() - _FIRST_BIN_BITS] += counts[_FIRST_BIN_BITS:]
    else:
        ones = torch.ones((), dtype=hist.dtype, device=hist.device).expand(idx.shape)
        hist.index_add_(0, idx.sub_(_FIRST_BIN_BITS), ones)


def summarize_partials(ext: Tensor, sums: Tensor) -> Tensor:
    """``[..., 4]`` fp32: ``[min, max, mean, median]`` of the rate, for each row of partials.

    ``min``, ``max`` and ``mean`` are exact; ``median`` is the geometric centre of the histogram bin holding the lower
    median, kept within ``[min, max]``: within :func:`histogram_median_rel_error` (0.39%) of the exact lower median.
    A row of no elements (count 0) gives NaN for all four.
    """
    mn, mx, count = ext[..., 0].double(), ext[..., 1].double(), sums[..., 1]
    mean = sums[..., 0] / count
    # the lower median is the element of rank floor((n - 1) / 2) from 0 in increasing order: its bin is the first
    # whose cumulative count exceeds that rank. Found in two steps, the power of two, then the bin within it: a
    # cumulative sum over all bins costs 7x as much as the sums per power of two
    rank = torch.floor((count - 1) / 2).unsqueeze(-1)
    fine = sums[..., 2:].unflatten(-1, (-1, 1 << MANTISSA_BITS))  # [..., powers of two, bins in each]
    per_octave = fine.sum(-1)
    coarse = per_octave.cumsum(-1)
    octave = torch.searchsorted(coarse, rank.contiguous(), right=True).clamp_(max=coarse.shape[-1] - 1)
    before = coarse.gather(-1, octave) - per_octave.gather(-1, octave)  # the elements in the powers below it
    within = fine.gather(-2, octave.unsqueeze(-1).expand(*octave.shape[:-1], 1, fine.shape[-1])).squeeze(-2)
    b = torch.searchsorted(within.cumsum(-1), (rank - before).contiguous(), right=True).clamp_(max=fine.shape[-1] - 1)
    b = b + (octave << MANTISSA_BITS)
    low, high = ((((b + i + _FIRST_BIN_BITS) << _SHIFT).to(torch.int32).view(torch.float32).double()).squeeze(-1)
                 for i in (0, 1))
    median = torch.sqrt(low * high).clamp(mn, mx)  # the end bins' centres can lie outside the data
    stats = torch.stack([mn, mx, mean, median], -1)
    return stats.masked_fill((count == 0).unsqueeze(-1), float("nan")).float()


def histogram_median_rel_error() -> float:
    """Bound on ``|approx / exact - 1|`` of the median, for rates inside the histogram's range (or where the exact
    median is the min or the max, as when the median falls in an end bin that holds it).

    A bin spans at most a factor ``1 + 2**-MANTISSA_BITS`` of the rate, so its geometric centre is off by at most a
    factor ``(1 + 2**-MANTISSA_BITS)**(1/2)`` (plus 1e-6 for the fp32 arithmetic).
    """
    return (1 + 2.0**-MANTISSA_BITS) ** 0.5 - 1 + 1e-6


class _Block:
    """Up to :data:`BLOCK_ROWS` rows of partials, and the indices of the parameters they hold."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.partials = empty_partials(rows, device)
        self.index: list[int] = []

    def reset(self) -> None:
        self.partials.ext[:, 0].fill_(float("inf"))
        self.partials.ext[:, 1].fill_(float("-inf"))
        self.partials.sums.zero_()
        self.index.clear()


def rate_statistics(
    specs: Sequence[RateSpec],
    per_parameter: bool = True,
    per_group: bool = True,
    shards: Sequence[Hashable | None] | None = None,
    reduce: Callable[[Partials, Any], None] | None = None,
    buckets: Sequence[int | None] | None = None,
    n_buckets: int = 0,
) -> Tensor:
    """``[min, max, mean, median]`` (fp32, as :func:`summarize_partials`) of each spec's rate (the first
    ``len(specs)`` rows, with ``per_parameter``), of the specs of each bucket together (the next ``n_buckets`` rows:
    ``buckets[i]`` is spec ``i``'s bucket, or ``None``), and of all of them together (the last row, with
    ``per_group``), on the first spec's device.

    On a CUDA GPU with Triton the fused pass takes the specs whose state it can read
    (:func:`fused_kernel_available`); otherwise, or for any other spec in the call, the eager torch pass below.

    Each parameter's statistics are accumulated into a row of a block of :data:`BLOCK_ROWS` rows through a
    chunk-sized scratch buffer; a full block is summarized into four numbers per row and added into the group's
    row, and then reused. So the memory is bounded by the block, the chunk and the output (16 bytes per row),
    whatever the number of parameters and their sizes.

    Parameters sharded across processes: ``shards[i]`` is ``None`` for a whole tensor, else a token naming how spec
    ``i`` is sharded. Their rows go to separate blocks (one per token), and before such a block is summarized
    ``reduce(partials, token)`` must turn its rows into those of the whole parameters (an ``all_reduce``: ``ext``
    by min and max, ``sums`` by sum). Every process that calls this with the same sequence of tokens makes the same
    calls of ``reduce`` in the same order, with blocks of the same sizes, also for a shard of no elements.
    """
    if not specs:
        raise ValueError("rate_statistics needs at least one RateSpec")
    tokens = list(shards) if shards is not None else [None] * len(specs)
    if any(t is not None for t in tokens) and reduce is None:
        raise ValueError("sharded specs need a `reduce`")
    bucket_of = list(buckets) if buckets is not None else [None] * len(specs)
    if _triton_enabled and specs[0].device.type in _TRITON_DEVICES:
        from lightning_wd import rate_triton

        one_device = all(s.device == specs[0].device for s in specs)  # the kernels work on one device per call
        interpret = specs[0].device.type == "cpu"
        if rate_triton.HAS_TRITON and one_device and all(rate_triton.triton_accepts(s, interpret) for s in specs):
            return rate_triton.checked_rate_statistics(specs, per_parameter, per_group, tokens, reduce, bucket_of,
                                                       n_buckets)
    return _eager_rate_statistics(specs, per_parameter, per_group, tokens, reduce, bucket_of, n_buckets)


def _eager_rate_statistics(specs: Sequence[RateSpec], per_parameter: bool, per_group: bool,
                           tokens: list[Hashable | None], reduce: Any, bucket_of: list[int | None],
                           n_buckets: int) -> Tensor:
    """:func:`rate_statistics` by torch ops."""
    return _EagerPass(specs, per_parameter, per_group, reduce, bucket_of, n_buckets).run(tokens)


class _EagerPass:
    """One call of the eager pass: the output rows, the group's and the buckets' partials, the blocks of rows, and a
    chunk-sized scratch buffer per device (made at the first spec that needs it)."""

    def __init__(self, specs: Sequence[RateSpec], per_parameter: bool, per_group: bool, reduce: Any,
                 bucket_of: list[int | None], n_buckets: int) -> None:
        self.specs, self.per_parameter, self.reduce, self.bucket_of = specs, per_parameter, reduce, bucket_of
        self.device = device = specs[0].device
        n_out = (len(specs) if per_parameter else 0) + n_buckets + (1 if per_group else 0)
        self.out = torch.empty(n_out, len(STATS), dtype=torch.float32, device=device)
        self.group = empty_partials(1, device) if per_group else None
        self.bucketed = empty_partials(n_buckets, device) if n_buckets else None
        self.largest: dict[torch.device, int] = {}
        for spec in specs:
            self.largest[spec.device] = max(self.largest.get(spec.device, 0), _chunk(spec))
        self.scratch: dict[torch.device, Tensor] = {}
        # a row for a spec on another device than the blocks' (a group that spans devices)
        self.detour = {d: _Block(1, d) for d in self.largest if d != device}

    def run(self, tokens: list[Hashable | None]) -> Tensor:
        counts: dict[Hashable | None, int] = {}
        for t in tokens:
            counts[t] = counts.get(t, 0) + 1
        blocks = {t: _Block(min(BLOCK_ROWS, n), self.device) for t, n in counts.items()}
        for i, (spec, token) in enumerate(zip(self.specs, tokens)):
            block = blocks[token]
            self._into_row(spec, block, len(block.index))
            block.index.append(i)
            if len(block.index) == len(block.partials.ext):
                self._flush(token, block)
        for token, block in blocks.items():  # the same order on every process: that of the tokens' first appearance
            if block.index:
                self._flush(token, block)
        first = len(self.specs) if self.per_parameter else 0
        if self.bucketed is not None:
            self.out[first : first + len(self.bucketed.ext)] = summarize_partials(*self.bucketed)
        if self.group is not None:
            self.out[-1] = summarize_partials(*self.group)[0]
        return self.out

    def _accumulate(self, spec: RateSpec, ext: Tensor, sums: Tensor) -> None:
        if spec.numel == 0:
            return
        if spec.device not in self.scratch:
            self.scratch[spec.device] = make_scratch(self.largest[spec.device], spec.device)
        _accumulate_eager(spec, ext, sums, self.scratch[spec.device])

    def _into_row(self, spec: RateSpec, block: _Block, r: int) -> None:
        if spec.device == self.device:
            self._accumulate(spec, block.partials.ext[r], block.partials.sums[r])
            return
        row = self.detour[spec.device]
        row.reset()
        self._accumulate(spec, row.partials.ext[0], row.partials.sums[0])
        block.partials.ext[r].copy_(row.partials.ext[0])
        block.partials.sums[r].copy_(row.partials.sums[0])

    def _flush(self, token: Hashable | None, block: _Block) -> None:
        rows = len(block.index)
        part = Partials(block.partials.ext[:rows], block.partials.sums[:rows])
        if token is not None:
            self.reduce(part, token)
        if self.per_parameter:
            stats = summarize_partials(*part)
            first = block.index[0]
            if block.index == list(range(first, first + rows)):
                self.out[first : first + rows] = stats
            else:  # sharded and whole parameters in one group: row by row (an index tensor would be a host copy)
                for j, i in enumerate(block.index):
                    self.out[i] = stats[j]
        if self.group is not None:
            _combine(self.group, 0, part.ext.amin(0)[0], part.ext.amax(0)[1], part.sums.sum(0))
        if self.bucketed is not None:
            for j, i in enumerate(block.index):
                if self.bucket_of[i] is not None:
                    _combine(self.bucketed, self.bucket_of[i], part.ext[j, 0], part.ext[j, 1], part.sums[j])
        block.reset()


def _combine(into: Partials, row: int, lo: Tensor, hi: Tensor, sums: Tensor) -> None:
    """Add the partials ``(lo, hi, sums)`` into row ``row`` of ``into``."""
    torch.minimum(into.ext[row, 0], lo, out=into.ext[row, 0])
    torch.maximum(into.ext[row, 1], hi, out=into.ext[row, 1])
    into.sums[row].add_(sums)
