"""The effective-lr formulas of ``torch.optim``'s adaptive optimizers (read from torch 2.13's sources), one function
per family: each reads one parameter's ``scale``, ``eps`` and second moment from its optimizer state and param group
into a :class:`~lightning_wd.rates.RateSpec` (the formula is in its docstring). Their registry entries
(:mod:`lightning_wd.optimizers.torch_optim`) name them.

Example::

    >>> import torch
    >>> from lightning_wd.effective_lr import effective_lr, rate_statistics
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

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_wd._types import Scalar
from lightning_wd.rates import (
    RateSpec,
    bias_correction,
    copy_fill,
    flat_view,
    root_fill,
    state_numel,
    step_count,
    stepwise,
    zero_fill,
)

__all__ = [
    "adafactor_rate",
    "adagrad_rate",
    "adam_rate",
    "adam_rates",
    "adamax_rate",
    "radam_rate",
    "rmsprop_rate",
    "sparse_adam_rate",
]


def _sqrt(x: Scalar) -> Scalar:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def _minimum(a: Scalar, b: Scalar) -> Scalar:
    """``min(a, b)`` of floats or 0-dim tensors, without reading a tensor on the host."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return min(a, b)


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
        root_bc2 = _sqrt(bias_correction(group["betas"][1], t))
        return lr * root_bc2, group["eps"] * root_bc2

    out: list[RateSpec | None] = [None] * len(states)
    for i, (scale, eps) in zip(stepped, stepwise([step_count(states[i]) for i in stepped], scalars)):
        v = states[i][key]
        out[i] = RateSpec(scale, eps, state_numel(v), root_fill(v), v.device)
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
    root_bc2 = _sqrt(bias_correction(group["betas"][1], step_count(state)))
    return RateSpec(group["lr"] * root_bc2, group["eps"], state_numel(v), root_fill(v), v.device)


def radam_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``lr * r_t * sqrt(1 - beta2^t) / (sqrt(v) + eps)`` once ``torch.optim.RAdam`` rectifies (``rho_t > 5``), else
    ``lr`` for every element: the factor of ``m_hat`` in its update, with torch's
    ``rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)``, ``rho_inf = 2 / (1 - beta2) - 1`` and
    ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))``. For a device step
    (``capturable``) the choice is made on the device."""
    if "exp_avg_sq" not in state:
        return None
    v, lr, eps = state["exp_avg_sq"], group["lr"], group["eps"]
    beta2, t = group["betas"][1], step_count(state)
    bc2 = bias_correction(beta2, t)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2**t / bc2
    rect_sq = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    if isinstance(rho_t, Tensor):
        on = rho_t > 5
        root = root_fill(v)

        def fill(start: int, stop: int, out: Tensor) -> None:
            root(start, stop, out)
            out.mul_(on)  # sqrt(u) = 0 and eps = 1 before rectification: the rate is lr

        # where() keeps the NaN of the root of a negative rect_sq out of the chosen branch
        scale = torch.where(on, lr * rect_sq.clamp(min=0).sqrt() * bc2.sqrt(), lr)
        return RateSpec(scale, torch.where(on, eps, 1.0), state_numel(v), fill, v.device)
    if rho_t > 5:
        return RateSpec(lr * math.sqrt(rect_sq) * math.sqrt(bc2), eps, state_numel(v), root_fill(v), v.device)
    return RateSpec(lr, 1.0, state_numel(v), zero_fill, v.device)


def adamax_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``lr / exp_inf``: the factor of the bias-corrected first moment ``m / (1 - beta1^t)`` in the update of
    ``torch.optim.Adamax``, which torch writes ``lr / (1 - beta1^t) * m / exp_inf`` (its ``eps`` is inside
    ``exp_inf``, the running max of ``|grad| + eps``)."""
    if "exp_inf" not in state:
        return None
    u = state["exp_inf"]
    return RateSpec(group["lr"], 0.0, state_numel(u), copy_fill(u), u.device)


def rmsprop_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``lr / (sqrt(square_avg) + eps)``, with ``square_avg - grad_avg^2`` under ``centered=True``: the factor of the
    gradient in ``torch.optim.RMSprop``'s update. With ``momentum > 0`` the gradient times ``rate / lr`` enters the
    momentum buffer, which the update multiplies by ``lr``."""
    if "square_avg" not in state:
        return None
    sq = state["square_avg"]
    if not group.get("centered", False):
        return RateSpec(group["lr"], group["eps"], state_numel(sq), root_fill(sq), sq.device)
    sq_flat, avg_flat = flat_view(sq), flat_view(state["grad_avg"])

    def fill(start: int, stop: int, out: Tensor) -> None:
        s, g = sq_flat[start:stop], avg_flat[start:stop]
        if s.dtype == torch.float32:
            torch.addcmul(s, g, g, value=-1, out=out)
        else:
            out.copy_(s).addcmul_(g, g, value=-1)
        out.sqrt_()

    return RateSpec(group["lr"], group["eps"], state_numel(sq), fill, sq.device)


def adagrad_rate(state: dict[str, Any], group: dict[str, Any], param: Tensor | None = None) -> RateSpec | None:
    """``lr / (1 + (t - 1) * lr_decay) / (sqrt(sum) + eps)``: the factor of the gradient in ``torch.optim.Adagrad``'s
    update. ``None`` before the parameter's first step (Adagrad makes its state when it is built)."""
    if "sum" not in state:
        return None
    t = step_count(state)
    if not isinstance(t, Tensor) and t == 0:
        return None
    s, lr = state["sum"], group["lr"] / (1 + (t - 1) * group["lr_decay"])
    return RateSpec(lr, group["eps"], state_numel(s), root_fill(s), s.device)


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
    rho = _minimum(group["lr"], 1 / _sqrt(step_count(state)))
    p = param.detach()
    rms = torch.linalg.vector_norm(p, dtype=torch.promote_types(p.dtype, torch.float32)) / math.sqrt(p.numel())
    alpha = rms.clamp_(min=eps2).mul_(rho)
    if "variance" in state:
        flat = flat_view(state["variance"])

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
