"""The one reference oracle of the tests: every decay rule written out by hand, and a hand-written training loop.

Written from the formulas (papers, the optimizers' documentation), never from the library: nothing here imports
lightning_wd. A test trains the same model with an optimizer that has no decay of its own and applies the rule
before each step (:func:`train_by_hand` with :func:`decay_before_step`), then compares with what the library did.

The rules, for a parameter ``p`` with a gradient, before the optimizer's step (``step``: the optimizer's step size,
the lr unless said otherwise; ``lr_max``: the lr the decay is measured against):

- decoupled: ``p *= 1 - step*wd``
- coupled: ``g += wd*p`` (an L2 term, which the step then treats as part of the gradient)
- independent: ``p *= 1 - (lr/lr_max)*wd``
- corrected (AdamC): ``p *= 1 - step*(lr/lr_max)*wd``
- cautious (decoupled or coupled): only where ``direction*p >= 0``, the update's direction and the weight agreeing
  in sign

Each is written as one expression so that, where the library computes the same numbers in the same order, a test can
ask for the same weights bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

RULES = ("decoupled", "coupled", "independent", "corrected")

#: ``before_step(optimizer, t)``: the reference's own work after backward, before step ``t`` (counted from 0)
BeforeStep = Callable[[Any, int], None]


# ---------------------------------------------------------------------------------------------------------------------
# weight-decay schedules over ``total`` steps, from ``start`` (step 0) towards ``end``
# ---------------------------------------------------------------------------------------------------------------------
def cosine_schedule(t: int, total: int, start: float, end: float) -> float:
    """``end + (start - end) * (1 + cos(pi * t / total)) / 2`` (DINO's cosine weight-decay schedule)."""
    return end + (start - end) * (1 + math.cos(math.pi * t / total)) / 2


def linear_schedule(t: int, total: int, start: float, end: float) -> float:
    """``start + (end - start) * t / total``."""
    return start + (end - start) * t / total


# ---------------------------------------------------------------------------------------------------------------------
# the rules, on one parameter, in place (call them under torch.no_grad())
# ---------------------------------------------------------------------------------------------------------------------
def decoupled(p: Tensor, step: float, wd: float, mask: Tensor | None = None) -> None:
    """``p *= 1 - step*wd`` (where ``mask`` holds, if given)."""
    p.mul_(1 - step * wd if mask is None else torch.where(mask, 1 - step * wd, 1.0))


def coupled(p: Tensor, wd: float, mask: Tensor | None = None) -> None:
    """``p.grad += wd*p`` (where ``mask`` holds, if given)."""
    p.grad.add_(p if mask is None else torch.where(mask, p, 0.0), alpha=wd)


def independent(p: Tensor, lr: float, lr_max: float, wd: float) -> None:
    """``p *= 1 - (lr/lr_max)*wd``: the decay follows the lr's schedule, not its size."""
    p.mul_(1 - lr / lr_max * wd)


def corrected(p: Tensor, step: float, lr: float, lr_max: float, wd: float) -> None:
    """``p *= 1 - step*(lr/lr_max)*wd``: AdamC's ``wd * lr**2 / lr_max`` where the step size is the lr."""
    p.mul_(1 - step * (lr / lr_max) * wd)


def cautious_mask(direction: Tensor, p: Tensor) -> Tensor:
    """Where the update's direction (what the step subtracts, before its lr) and the weight agree in sign."""
    return direction * p >= 0


def apply_rule(rule: str, p: Tensor, wd: float, lr: float, lr_max: float | None = None, step: float | None = None,
               mask: Tensor | None = None) -> None:
    """One of :data:`RULES` on ``p``; ``step`` is the lr unless given; ``mask`` only for decoupled and coupled."""
    step = lr if step is None else step
    if rule == "decoupled":
        decoupled(p, step, wd, mask)
    elif rule == "coupled":
        coupled(p, wd, mask)
    elif mask is not None:
        raise ValueError(f"no cautious form of {rule!r} here")
    elif rule == "independent":
        independent(p, lr, lr_max, wd)
    elif rule == "corrected":
        corrected(p, step, lr, lr_max, wd)
    else:
        raise ValueError(f"unknown rule {rule!r}, expected one of {RULES}")


def decay_before_step(
    rule: str,
    wd: float | Callable[[int], float],
    lr_max: float | None = None,
    step_size: Callable[[Any, dict], float] | None = None,
    direction: Callable[[Any, Tensor], Tensor] | None = None,
    select: Callable[[Tensor], bool] | None = None,
) -> BeforeStep:
    """A ``before_step(optimizer, t)`` that applies ``rule`` to every parameter with a gradient.

    ``wd``: a number, or the decay of step ``t`` (a schedule). The lr is each group's (a tensor lr read as a float);
    ``step_size(optimizer, group)`` gives the step size where it is not the lr. ``direction(optimizer, p)``: the
    update's direction, for a cautious decay (only where :func:`cautious_mask` holds). ``select(p)``: only those
    parameters.
    """

    @torch.no_grad()
    def before_step(optimizer: Any, t: int) -> None:
        wd_t = wd(t) if callable(wd) else wd
        for group in optimizer.param_groups:
            lr = group["lr"]
            lr = float(lr) if isinstance(lr, Tensor) else lr
            step = step_size(optimizer, group) if step_size is not None else lr
            for p in group["params"]:
                if p.grad is None or (select is not None and not select(p)):
                    continue
                mask = cautious_mask(direction(optimizer, p), p) if direction is not None else None
                apply_rule(rule, p, wd_t, lr, lr_max, step, mask)

    return before_step


def in_turn(*before_steps: BeforeStep) -> BeforeStep:
    """Several ``before_step`` functions, one after the other."""

    def before_step(optimizer: Any, t: int) -> None:
        for each in before_steps:
            each(optimizer, t)

    return before_step


# ---------------------------------------------------------------------------------------------------------------------
# the hand-written training loop
# ---------------------------------------------------------------------------------------------------------------------
def train_by_hand(
    model: nn.Module,
    optimizer: Any,
    batches: Iterable[tuple[Tensor, Any]],
    before_step: BeforeStep | None = None,
    scheduler: Any = None,
    loss: Callable[[Tensor, Any], Tensor] = nn.functional.mse_loss,
) -> nn.Module:
    """For each ``(x, y)`` of ``batches``: ``zero_grad``, ``loss(model(x), y).backward()``, ``before_step(optimizer,
    t)``, ``optimizer.step()``, ``scheduler.step()``; the trained ``model``. The optimizer is built without decay of
    its own where ``before_step`` applies the rule."""
    for t, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        loss(model(x), y).backward()
        if before_step is not None:
            before_step(optimizer, t)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return model
