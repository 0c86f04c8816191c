r"""Weight norms, gradient-to-weight ratios and the equilibrium norms of rotational equilibrium, without Lightning.

The callback :class:`lightning_wd.WeightNormMonitor` is a thin layer over this module.

**Norms.** :func:`squared_norms` takes any list of tensors (weights, gradients; the local shards of ``DTensor``
parameters under FSDP2) and returns their squared L2 norms in one float32 vector, with one batched
``torch._foreach_norm`` per (device, dtype). (The callback sums the squares of shards over the processes.)

**Equilibrium norms** (Kosson, Messmer & Jaggi, "Rotational Equilibrium: How Weight Decay Balances Learning Across
Neural Networks", arXiv 2305.17212). A weight vector :math:`\omega` that the network's output does not depend on in
scale (a normalization layer follows it) gets gradients orthogonal to it, of size :math:`\|g\| = \|\tilde g\| /
\|\omega\|`, where :math:`\tilde g` is the gradient it would have at unit norm. Each step then grows its squared
norm by the update's squared size (a random walk: successive updates uncorrelated and orthogonal to
:math:`\omega`), and the decay shrinks it by :math:`2x\|\omega\|^2` (:math:`p \leftarrow (1 - x)\,p`). The
norm settles where the two balance, :math:`2x\|\omega\|^2 = \mathbb E\|\Delta\omega\|^2`. Per neuron (one output row
of ``C`` inputs), this balance gives for the optimizers the paper covers (AdamW's is the paper's headline form; the
rows of AdamW, Adam + L2 and SGDM are checked against training runs in ``tests/test_weight_norm.py``, Lion's is not):

============================  =========================================================  ==============================
optimizer and decay           equilibrium norm of one neuron                             function
============================  =========================================================  ==============================
AdamW, Lion                   :math:`\sqrt{\eta C / (2\lambda)}`                         :func:`normalized_update_norm`
Adam + L2 (coupled)           :math:`(\eta \sqrt{C}\, \|\tilde g\| / (2\lambda))^{1/3}`  :func:`adam_l2_norm`
SGD with momentum + L2        :math:`(\eta \|\tilde g\|^2 / (2\lambda(1-\alpha)))^{1/4}`  :func:`sgdm_norm`
============================  =========================================================  ==============================

The functions take the per-step shrink ``x`` that the decay really applies rather than :math:`\eta\lambda`, so the
same balance covers the other decoupled modes: ``x = ηλ`` gives the table's AdamW row; ``mode="corrected"`` (AdamC,
``x = λη²/η_max``) gives :math:`\sqrt{\eta_{max} C / (2\lambda)}`, a norm that no longer falls with the lr. For SGD
the gradient's whole displacement through momentum is :math:`\eta(1-d)/(1-\alpha)` times the gradient (dampening
``d``; Nesterov the same), and a multiplicative decay ``x`` gives :math:`(\eta_{eff}^2\|\tilde g\|^2/(2x))^{1/4}`,
which is the table's row for the L2 decay ``x = η_eff λ``.

Assumptions, as in the paper: the weight is scale-invariant; the updates are noise-dominated and uncorrelated from
step to step (a random walk); for Adam, ``sqrt(v_hat)`` is the gradient's RMS (``eps`` negligible, ``v`` caught up
with the gradient's scale) and, with L2, the L2 term is small against the gradient in ``v``; the decay acts slowly
(``x << 1``). The equilibrium is the one of the *current* lr and decay: under a schedule the norm lags behind it by
about the timescale ``1/x``. Adam's slow second moment (``beta2 = 0.999``) and momentum put AdamW somewhat below the
prediction (about 10% for a whole layer in a small test; with ``betas=(0, 0.99)`` within 1%).

**Whole parameters.** A weight matrix of ``K`` rows (output neurons) and ``C = numel / K`` inputs is ``K`` neurons;
with the neurons alike, its norm is :math:`\sqrt K` times one neuron's. The forms with :math:`\|\tilde g\|` use the
whole matrix's :math:`\|\tilde g\| = \|G\|\,\|W\|` (one neuron's is :math:`\|G\|\,\|W\|/K`), which makes ``K`` cancel:
for Adam + L2, :math:`\|W\| = (\eta\sqrt{n}\,\|G\|\|W\| / (2\lambda))^{1/3}` with ``n = numel``; for SGDM,
:math:`(\eta_{eff}\|G\|^2\|W\|^2 / (2\lambda))^{1/4}`; for AdamW, :math:`\eta\sqrt{n / (2x)}`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_wd._types import Scalar
from lightning_wd.decay import local_tensor
from lightning_wd.modes import per_step_decay
from lightning_wd.optimizers import Equilibrium, rule_for

#: a decay as the norms see it: ``("shrink", x)`` for ``p *= 1 - x``, ``("l2", wd)`` for ``g += wd * p``
Decay = tuple[str, Any]

__all__ = [
    "Decay",
    "adam_l2_norm",
    "decay_of_group",
    "equilibrium_norm",
    "normalized_update_norm",
    "sgdm_norm",
    "squared_norms",
]

# --- the closed forms --------------------------------------------------------------------------------------------
def normalized_update_norm(lr: Scalar, shrink: Scalar, numel: int) -> Scalar:
    r"""AdamW and Lion: :math:`\eta\sqrt{n / (2x)}` for ``numel = n`` weights decayed by ``p *= 1 - shrink`` per step.

    Each step moves each weight by about ``lr`` (Adam's ``m_hat / sqrt(v_hat)``, Lion's sign, of RMS 1), so
    ``E|update|^2 = lr^2 n``; with ``shrink = lr * wd`` this is the paper's ``sqrt(lr * C / (2 wd))`` per neuron of
    ``C`` inputs, times ``sqrt(rows)``.
    """
    return lr * (numel / (2 * shrink)) ** 0.5


def adam_l2_norm(lr: Scalar, weight_decay: Scalar, numel: int, scale_free_grad: Scalar) -> Scalar:
    r"""Adam with L2 (coupled) decay: :math:`(\eta\sqrt{n}\,\|\tilde g\| / (2\lambda))^{1/3}`.

    Adam divides the L2 term ``wd * p`` by the gradient's RMS ``|g| / sqrt(n)`` too, so the decay per step is
    ``lr * wd * sqrt(n) / |g|`` and depends on the gradient; with ``|g| = |g~| / |w|`` the balance is a cubic.
    ``scale_free_grad`` is :math:`\|\tilde g\| = \|g\|\,\|w\|` of the whole matrix.
    """
    return (lr * math.sqrt(numel) * scale_free_grad / (2 * weight_decay)) ** (1 / 3)


def sgdm_norm(
    lr: Scalar,
    scale_free_grad: Scalar,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: Scalar | None = None,
    shrink: Scalar | None = None,
) -> Scalar:
    r"""SGD with momentum :math:`\alpha`: :math:`(\eta_{eff}\|\tilde g\|^2 / (2\lambda))^{1/4}` with L2 decay
    ``weight_decay``, or :math:`(\eta_{eff}^2\|\tilde g\|^2 / (2x))^{1/4}` with a multiplicative decay ``shrink``.

    :math:`\eta_{eff} = \eta(1-d)/(1-\alpha)` is the whole displacement that momentum gives one gradient (L2's
    ``wd * p`` goes through momentum too, so its shrink is :math:`\eta_{eff}\lambda`). ``scale_free_grad`` is
    :math:`\|\tilde g\| = \|g\|\,\|w\|` of the whole matrix. Pass exactly one of ``weight_decay`` and ``shrink``.
    """
    if (weight_decay is None) == (shrink is None):
        raise ValueError("Pass exactly one of `weight_decay` (L2) and `shrink` (p *= 1 - shrink).")
    lr_eff = lr * (1 - dampening) / (1 - momentum) if momentum else lr
    x = lr_eff * weight_decay if shrink is None else shrink
    return (lr_eff**2 * scale_free_grad**2 / (2 * x)) ** 0.25


# --- norms of many tensors, and of sharded ones -------------------------------------------------------------------
def squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """The squared L2 norm of each tensor's process-local part, as one float32 vector on the first tensor's device.

    One ``torch._foreach_norm`` per (device, dtype) (the batched kernel needs one of each); bf16/fp16 tensors are
    summed in float32. A ``DTensor`` contributes its local shard (possibly empty: 0); a sparse tensor its values.
    The results are put back in order without an index tensor: making one from host data would be a host-to-device
    copy, which synchronizes on CUDA.
    """
    locals_ = [_dense(local_tensor(t)) for t in tensors]
    if not locals_:
        return torch.zeros(0)
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(locals_):
        buckets[(t.device, t.dtype)].append(i)
    device = locals_[0].device
    norms: list[Tensor] = [locals_[0]] * len(locals_)  # placeholders, all overwritten
    for (_, dtype), index in buckets.items():
        low = dtype in (torch.float16, torch.bfloat16)
        values = torch._foreach_norm([locals_[i] for i in index], 2, dtype=torch.float32 if low else None)
        if len(buckets) == 1:
            return torch.stack(values).float().square_()
        for i, v in zip(index, values):
            norms[i] = v.to(device=device, dtype=torch.float32)  # asynchronous for a device-to-device copy
    return torch.stack(norms).square_()


def _dense(t: Tensor) -> Tensor:
    return t.coalesce().values() if t.is_sparse else t


# --- the decay each parameter gets, and its equilibrium ---------------------------------------------------------
def decay_of_group(optimizer: Optimizer, group: Mapping[str, Any], attached: Any = None
                   ) -> tuple[Decay | None, list[Decay | None]]:
    """The decay ``group`` gets in the coming step, and each of its parameters': from ``attached`` (a
    :class:`lightning_wd.AttachedWeightDecay`: its mode, schedule, exclusions and uncorrected parameters) where
    given, else from the optimizer's own ``weight_decay`` as its registry entry describes it (``None``: none, or a
    rule whose per-step shrink cannot be read before the step, such as a relative step size)."""
    if attached is None:
        decay = _own_decay(optimizer, group)
        return decay, [decay] * len(group["params"])
    wd = attached.current_weight_decay(group)
    shrink = attached.per_step_decay(group, wd)
    decay: Decay | None = ("l2", wd) if attached.mode == "coupled" else None if shrink is None else ("shrink", shrink)
    step = attached.step_size(group)
    plain = None if step is None else ("shrink", per_step_decay("decoupled", group["lr"], wd, None, step))
    return decay, [None if attached.is_excluded(p) else plain if attached.is_uncorrected(p) else decay
                   for p in group["params"]]


def _own_decay(optimizer: Optimizer, group: Mapping[str, Any]) -> Decay | None:
    wd = group.get("weight_decay", 0.0)
    rule, _ = rule_for(optimizer)
    own = rule.own_rule(optimizer, group)
    if own == "coupled":
        return ("l2", wd)
    step = rule.group_step_size(optimizer, group)
    if own == "decoupled" and step is not None:
        return ("shrink", per_step_decay("decoupled", group["lr"], wd, None, step))
    return None


def equilibrium_norm(form: Equilibrium | None, p: Tensor, lr: float, decay: Decay | None, w_sq: float | None,
                     g_sq: float | None) -> float | None:
    """The predicted norm of weight matrix ``p`` under update ``form``, ``lr`` and ``decay`` (with its squared norm
    ``w_sq`` and its gradient's ``g_sq`` at this step), or ``None`` where the paper has no prediction: 1-D
    parameters, no decay, an update rule it does not cover."""
    if p.dim() < 2 or decay is None or form is None:
        return None
    kind, x = decay
    scale_free = math.sqrt(w_sq * g_sq) if w_sq is not None and g_sq is not None else None  # |g~| = |g| |w|
    if form.kind in ("adam", "lion") and kind == "shrink":
        return normalized_update_norm(lr, x, p.numel())
    if form.kind == "adam" and kind == "l2" and scale_free is not None:
        return adam_l2_norm(lr, x, p.numel(), scale_free)
    if form.kind == "sgdm" and scale_free is not None:
        decay_arg = {"weight_decay": x} if kind == "l2" else {"shrink": x}
        return sgdm_norm(lr, scale_free, form.momentum, form.dampening, **decay_arg)
    return None
