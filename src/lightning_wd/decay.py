"""The decay math, as plain torch functions over lists of tensors.

Nothing here knows about Lightning or about optimizers: each function takes the tensors of one param group and
the numbers that scale them, groups the tensors by (device, dtype) and issues one ``torch._foreach_*`` call per
group, in the style of ``torch.optim``'s multi-tensor paths. No function reads a tensor's value on the host, so
none of them syncs a GPU with its host.

Example::

    >>> import torch
    >>> w = [torch.ones(3), torch.full((2,), 2.0)]
    >>> decay_weights_(w, lr=0.1, weight_decay=0.5)     # p *= 1 - lr * wd
    >>> w[0]
    tensor([0.9500, 0.9500, 0.9500])
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

from lightning_wd.low_precision import LOW_PRECISION, stochastic_round

Scalar = Union[float, Tensor]

__all__ = ["add_l2_to_grads_", "decay_weights_", "group_by_device_and_dtype", "local_tensor"]


def local_tensor(t: Tensor) -> Tensor:
    """The process-local part of ``t``: the shard of a ``DTensor`` (FSDP2), else ``t`` itself.

    Decay is elementwise, so it acts on each shard where it lives, with no collective.
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def group_by_device_and_dtype(*lists: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[list[Tensor]]]:
    """Split parallel lists of tensors into one set of lists per (device, dtype) of the first list.

    ``torch._foreach_*`` kernels need every tensor of one call on the same device with the same dtype.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = defaultdict(lambda: [[] for _ in lists])
    for tensors in zip(*lists):
        bucket = groups[(tensors[0].device, tensors[0].dtype)]
        for out, t in zip(bucket, tensors):
            out.append(t)
    return dict(groups)


def _on_device(x: Scalar, device: torch.device) -> Scalar:
    # A tensor-valued factor (tensor lr, AMP's found_inf) must sit on the tensors' device; the copy is
    # asynchronous, so it does not sync the host.
    return x.to(device, non_blocking=True) if isinstance(x, Tensor) and x.device != device else x


def decay_weights_(
    params: Sequence[Tensor],
    lr: Scalar,
    weight_decay: float,
    skip: Tensor | None = None,
    stochastic_rounding: bool = False,
) -> None:
    """Decoupled decay in place: ``p *= 1 - lr * weight_decay`` for every ``p`` in ``params``.

    This is ``torch.optim.AdamW``'s own formula (it multiplies by ``1 - lr * weight_decay`` before its update), so
    an Adam step after this call equals an AdamW step bit for bit.

    Args:
        params: the tensors to decay (``DTensor`` shards are decayed locally).
        lr: the learning rate of this step, a float or a 0-dim tensor (no host sync either way).
        weight_decay: the decay coefficient.
        skip: optional 0-dim tensor, non-zero when this step must not decay (AMP's ``found_inf`` for optimizers that
            skip inside their own kernel); evaluated on the device, without a host sync.
        stochastic_rounding: compute the product of bf16/fp16 tensors in fp32 and round it stochastically (see
            :mod:`lightning_wd.low_precision`), so that a decay below the format's resolution is not lost. It costs
            an fp32 temporary per such tensor; other dtypes are unaffected.
    """
    if not params or weight_decay == 0:
        return
    factor: Scalar = 1 - lr * weight_decay
    for (device, dtype), (tensors,) in group_by_device_and_dtype([local_tensor(p) for p in params]).items():
        f = _on_device(factor, device)
        if skip is not None:
            f = torch.where(_on_device(skip, device) > 0, torch.ones((), device=device), f)
        if stochastic_rounding and dtype in LOW_PRECISION:
            for t in tensors:  # per tensor: the rounding needs an fp32 temporary of the tensor's size
                t.copy_(stochastic_round(t.float() * f, dtype))
        else:
            torch._foreach_mul_(tensors, f)


def add_l2_to_grads_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    weight_decay: float,
    grad_scale: Tensor | None = None,
) -> None:
    """Coupled (L2) decay in place: ``g += weight_decay * p`` for every pair, as ``Adam(weight_decay=...)`` does.

    Args:
        params: the parameters.
        grads: their gradients, in the same order.
        weight_decay: the L2 coefficient; pass ``-weight_decay`` for a maximizing optimizer, which negates the
            gradient before it adds its own L2 term.
        grad_scale: the AMP loss scale (0-dim tensor) when the gradients are still scaled (fused optimizers unscale
            inside their kernel), so that the term added is ``weight_decay * p`` after unscaling. The result is exact
            for a power-of-two scale (torch's GradScaler only makes those); for another scale the scaling back and
            forth may round the gradient by one unit in its last place.
    """
    if not params or weight_decay == 0:
        return
    local_params = [local_tensor(p) for p in params]
    local_grads = [local_tensor(g) for g in grads]
    for (device, _), (g, p) in group_by_device_and_dtype(local_grads, local_params).items():
        if grad_scale is None:
            torch._foreach_add_(g, p, alpha=weight_decay)
        else:
            # Still-scaled gradients (fused optimizers unscale inside their kernel, then add their L2 term): unscale,
            # add, scale back. With the power-of-two scales of torch's GradScaler the scaling is exact, so the kernel
            # then sees `g / s + wd * p` rounded as its own L2 term is: bit for bit `Adam(weight_decay, fused=True)`.
            scale = _on_device(grad_scale, device)
            torch._foreach_div_(g, scale)
            torch._foreach_add_(g, p, alpha=weight_decay)
            torch._foreach_mul_(g, scale)
