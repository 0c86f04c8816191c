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
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_wd._types import Scalar
from lightning_wd.low_precision import LOW_PRECISION, stochastic_round

#: the update direction of one parameter, elements ``[start, stop)`` of it flattened (a fresh tensor): its sign decides
#: where cautious decay acts
Direction = Callable[[int, int], Tensor]

__all__ = [
    "Direction",
    "add_l2_to_grads_",
    "cautious_chunk_elements",
    "cautious_decay_",
    "decay_weights_",
    "flat_like",
    "group_by_device_and_dtype",
    "local_tensor",
    "shrink_bucket_",
]


def local_tensor(t: Tensor) -> Tensor:
    """The process-local part of ``t``: the shard of a ``DTensor`` (FSDP2), else ``t`` itself.

    Decay is elementwise, so it acts on each shard where it lives, with no collective.
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def flat_like(t: Tensor, ref: Tensor) -> Tensor:
    """The elements of ``t`` as one 1-D tensor, in the order in which ``ref`` (a tensor of the same shape, e.g. the
    parameter whose gradient or state ``t`` is) lays out its elements in memory: a view where ``t`` is laid out as
    ``ref`` is (a channels-last weight, its gradient and its optimizer state), a copy otherwise.

    Elementwise work on a parameter and its gradient and state then pairs the same elements, whatever the layout,
    and touches each in memory order.
    """
    order = sorted(range(ref.dim()), key=lambda d: ref.stride(d), reverse=True)  # stable: ties keep dim order
    permuted = t.permute(order) if order else t
    return permuted.view(-1) if permuted.is_contiguous() else permuted.reshape(-1)


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
    generator: Callable[[torch.device], torch.Generator] | None = None,
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
        generator: the random generator of stochastic rounding on each device (``generator(device)``), drawn from
            in the order of ``params``; ``None``: torch's default generator.
    """
    if not params or weight_decay == 0:
        return
    factor: Scalar = 1 - lr * weight_decay
    for (device, dtype), (tensors,) in group_by_device_and_dtype([local_tensor(p) for p in params]).items():
        shrink_bucket_(tensors, device, dtype, factor, skip, stochastic_rounding, generator)


def shrink_bucket_(tensors: list[Tensor], device: torch.device, dtype: torch.dtype, factor: Scalar,
                   skip: Tensor | None = None, stochastic_rounding: bool = False,
                   generator: Callable[[torch.device], torch.Generator] | None = None) -> None:
    """``t *= factor`` for tensors that share ``device`` and ``dtype`` (what :func:`decay_weights_` does per group
    of them; callers that keep such groups call it directly, without regrouping at every step)."""
    f = _on_device(factor, device)
    if skip is not None:
        f = torch.where(_on_device(skip, device) > 0, torch.ones((), device=device), f)
    if stochastic_rounding and dtype in LOW_PRECISION:
        g = generator(device) if generator is not None else None
        for t in tensors:  # per tensor: the rounding needs an fp32 temporary of the tensor's size
            t.copy_(stochastic_round(t.float() * f, dtype, g))
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


def cautious_chunk_elements(device: torch.device) -> int:
    """How many elements :func:`cautious_decay_` works on at a time: its temporaries are this size, never the
    parameter's (512K elements on a CPU, where a chunk stays in cache; 16M on an accelerator, to keep launches few)."""
    return 1 << 19 if device.type == "cpu" else 1 << 24


@torch.no_grad()
def cautious_decay_(
    params: Sequence[Tensor],
    directions: Sequence[Direction],
    per_step_decay: Scalar | None = None,
    grads: Sequence[Tensor] | None = None,
    weight_decay: Scalar = 0.0,
    skip: Tensor | None = None,
) -> None:
    """Cautious weight decay (Chen et al. 2025): decay only the elements whose update and weight have the same sign,
    ``u * p >= 0`` (zero counts as the same sign), chunk by chunk.

    Decoupled (``per_step_decay = x``): ``p *= 1 - x`` where ``u * p >= 0``. Coupled (``grads`` given):
    ``g += weight_decay * p`` there. ``directions[i](start, stop)`` gives the update direction ``u`` of
    ``params[i]``'s elements ``[start, stop)`` (flattened in the parameter's memory order, :func:`flat_like`); it is
    called before the optimizer's step, from its state and the gradient, so that no parameter-sized temporary is
    ever made. ``skip``: as in :func:`decay_weights_`.

    Example::

        >>> p = torch.tensor([1.0, -1.0, 2.0, 0.0])
        >>> u = torch.tensor([0.5, 0.5, -3.0, 1.0])
        >>> cautious_decay_([p], [lambda a, b: u[a:b].clone()], per_step_decay=0.5)
        >>> p
        tensor([ 0.5000, -1.0000,  2.0000,  0.0000])
    """
    for i, (param, direction) in enumerate(zip(params, directions)):
        local = local_tensor(param)
        flat = flat_like(local, local)  # a view for any dense layout (channels-last, transposed); a copy otherwise
        target = flat if grads is None else flat_like(local_tensor(grads[i]), local)
        if grads is None:
            factor: Scalar = 1 - per_step_decay
            if isinstance(factor, Tensor) or skip is not None:
                factor = torch.as_tensor(factor, device=flat.device, dtype=torch.float32)
                if skip is not None:
                    factor = torch.where(_on_device(skip, flat.device) > 0, torch.ones_like(factor), factor)
        chunk = cautious_chunk_elements(flat.device)
        for start in range(0, flat.numel(), chunk):
            stop = min(start + chunk, flat.numel())
            same_sign = direction(start, stop).mul_(flat[start:stop]).ge(0)
            if grads is None:
                target[start:stop].mul_(torch.where(same_sign, factor, 1.0))
            else:  # `add(p, alpha=wd)` where the signs agree: the arithmetic of the optimizers' own L2 term
                target[start:stop].add_(torch.where(same_sign, flat[start:stop], 0.0), alpha=weight_decay)
        _write_back(target, local if grads is None else local_tensor(grads[i]), local)


def _write_back(flat: Tensor, t: Tensor, ref: Tensor) -> None:
    """Where :func:`flat_like` had to copy ``t`` (a layout that is not dense), copy the result back into ``t``."""
    if flat.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
        return  # a view: written in place
    order = sorted(range(ref.dim()), key=lambda d: ref.stride(d), reverse=True)
    permuted = t.permute(order) if order else t
    permuted.copy_(flat.view(permuted.shape))
