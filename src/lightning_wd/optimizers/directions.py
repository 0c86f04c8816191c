"""The sign of an optimizer's coming update, before its step, for cautious weight decay.

Each function takes ``(optimizer, group, param, grad)`` and returns ``direction(start, stop)``: the update direction
of the flattened elements ``[start, stop)`` of ``param`` (only its sign matters), computed from the state and the
gradient the way the optimizer will compute it, one chunk at a time, never as a parameter-sized tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.decay import Direction, flat_like, local_tensor
from lightning_wd.optimizers.registry import Group

__all__ = ["Direction", "adam_direction", "gradient_direction", "lion_direction", "sgd_direction"]


def _flat(t: Tensor, param: Tensor) -> Tensor:
    """``t`` (the gradient or a state of ``param``) flattened in ``param``'s memory order, as cautious decay walks
    it."""
    return flat_like(local_tensor(t), local_tensor(param))


def _flat_grad(optimizer: Optimizer, group: Group, param: Tensor, grad: Tensor) -> Tensor:
    g = _flat(grad, param)
    # a maximizing optimizer steps along +g; the flag is a group key in torch, an attribute in some packages
    return g.neg() if group.get("maximize", getattr(optimizer, "maximize", False)) else g


def gradient_direction(optimizer: Optimizer, group: Group, param: Tensor, grad: Tensor) -> Direction:
    """Optimizers that divide the gradient by a positive denominator (Adagrad, Adafactor, RMSprop without momentum):
    the update has the gradient's sign."""
    g = _flat_grad(optimizer, group, param, grad)
    return lambda start, stop: g[start:stop].clone()


def adam_direction(optimizer: Optimizer, group: Group, param: Tensor, grad: Tensor) -> Direction:
    """Adam, AdamW, RAdam, Adamax: the update has the sign of this step's first moment ``lerp(m, g, 1 - beta1)``,
    computed as torch's Adam computes it (``m = 0`` before the first step)."""
    g = _flat_grad(optimizer, group, param, grad)
    m = optimizer.state.get(param, {}).get("exp_avg")
    if m is None:
        return lambda start, stop: g[start:stop].clone()
    m = _flat(m, param)
    weight = 1 - group["betas"][0]
    return lambda start, stop: torch.lerp(m[start:stop], g[start:stop], weight)


def sgd_direction(optimizer: Optimizer, group: Group, param: Tensor, grad: Tensor) -> Direction:
    """SGD: the gradient, or with momentum the new buffer ``mu * buf + (1 - dampening) * g`` (Nesterov: ``g + mu *
    buf``), as torch's SGD computes them (the buffer is ``g`` at the first step)."""
    g = _flat_grad(optimizer, group, param, grad)
    mu, dampening, nesterov = group["momentum"], group["dampening"], group["nesterov"]
    if mu == 0:
        return lambda start, stop: g[start:stop].clone()
    buf = optimizer.state.get(param, {}).get("momentum_buffer")
    buf = _flat(buf, param) if buf is not None else None

    def direction(start: int, stop: int) -> Tensor:
        gc = g[start:stop]
        new = gc.clone() if buf is None else buf[start:stop].mul(mu).add_(gc, alpha=1 - dampening)
        return gc.add(new, alpha=mu) if nesterov else new

    return direction


def lion_direction(optimizer: Optimizer, group: Group, param: Tensor, grad: Tensor) -> Direction:
    """Lion: the sign of the interpolation ``beta1 * m + (1 - beta1) * g`` (``m = 0`` before the first step)."""
    g = _flat_grad(optimizer, group, param, grad)
    m = optimizer.state.get(param, {}).get("exp_avg")
    if m is None:
        return lambda start, stop: g[start:stop].clone()
    m = _flat(m, param)
    beta1 = group["betas"][0]
    return lambda start, stop: m[start:stop].mul(beta1).add_(g[start:stop], alpha=1 - beta1)
