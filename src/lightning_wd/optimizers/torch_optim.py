"""``torch.optim``: how each optimizer applies its own ``weight_decay`` (read from torch 2.13's sources)."""

from __future__ import annotations

from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.optimizers.directions import Direction, adam_direction, gradient_direction, sgd_direction
from lightning_wd.optimizers.registry import (
    Equilibrium,
    Group,
    OptimizerRule,
    Scalar,
    always,
    non_default,
    register_optimizer,
)
from lightning_wd.optimizers.torch_rates import (
    adafactor_rate,
    adagrad_rate,
    adam_rate,
    adam_rates,
    adamax_rate,
    radam_rate,
    rmsprop_rate,
    sparse_adam_rate,
)
from lightning_wd.rates import ORTHOGONALIZED, PLAIN_LR, Formula

# torch's Adam, AdamW, NAdam and RAdam keep the switch in each param group: `decoupled_weight_decay`
_FLAG = "decoupled_weight_decay"
_FLAGGED = {"decoupled": {_FLAG: True}, "coupled": {_FLAG: False}}


def _flagged_rule(optimizer: Optimizer, group: Group) -> str:
    return "decoupled" if group.get(_FLAG, False) else "coupled"


def _adamw_rule(optimizer: Optimizer, group: Group) -> str:
    return "decoupled" if group.get(_FLAG, True) else "coupled"  # AdamW before the flag existed: always decoupled


def _adagrad_step_size(optimizer: Optimizer, group: Group) -> Scalar:
    """Adagrad's decayed lr ``lr / (1 + (t - 1) * lr_decay)`` at the coming step ``t`` (its state counts ``t - 1``).

    The state is made at construction, so the first parameter's step counter is there; a tensor on the device
    stays there (no host read).
    """
    lr, lr_decay = group["lr"], group["lr_decay"]
    if lr_decay == 0:
        return lr
    step: float | Tensor = optimizer.state[group["params"][0]]["step"]
    return lr / (1 + step * lr_decay)


def _asgd_step_size(optimizer: Optimizer, group: Group) -> Scalar:
    """ASGD's decayed step size ``eta = lr / (1 + lambd * lr * t)**alpha``, kept in its state (``lr`` before its
    first step); a tensor, read on the device."""
    return optimizer.state.get(group["params"][0], {}).get("eta", group["lr"])


def _adadelta(optimizer: Optimizer, group: Group, rule: str) -> str | None:
    if rule in ("decoupled", "corrected"):
        return (
            "Adadelta's lr multiplies an adaptive step (default 1.0); it is not a step size, so a decoupled decay"
            " lr * wd would shrink the weights by wd itself per step. Use mode='coupled' (L2 into the gradient) or"
            " mode='independent'."
        )
    return None


def _adam_form(optimizer: Optimizer, group: Group) -> Equilibrium | None:
    # AMSGrad's running maximum of v makes the update smaller than the gradient's RMS: not the paper's form
    return None if group.get("amsgrad", False) else Equilibrium("adam")


def _rmsprop_direction(optimizer: Optimizer, group: Group, param: Tensor, grad: Tensor) -> Direction | None:
    return gradient_direction(optimizer, group, param, grad) if group["momentum"] == 0 else None


def _sparse_adam(optimizer: Optimizer, group: Group, rule: str) -> str | None:
    if rule == "coupled":
        return (
            "SparseAdam takes sparse gradients; an L2 term `wd * p` would make every gradient dense and defeat it."
            " Use mode='decoupled', which decays the weights directly."
        )
    return None


def _rprop(optimizer: Optimizer, group: Group, rule: str) -> str | None:
    if rule != "coupled":
        return (
            "Rprop's step size is per element and adapts at every step (its `lr` is only the initial step size), so"
            " a decoupled decay `lr * wd` would not follow its steps. Use mode='coupled' (L2 into the gradient)."
        )
    return None


L2 = "L2: `g += wd*p` before the update"
DECOUPLED = "`p *= 1 - lr*wd` before the update"

register_optimizer("torch.optim.SGD", OptimizerRule(
    own="coupled", update_direction=sgd_direction, description=L2, effective_lr=PLAIN_LR,
    equilibrium=lambda o, g: Equilibrium("sgdm", g["momentum"], g["dampening"])))
register_optimizer("torch.optim.Adamax", OptimizerRule(
    own="coupled", update_direction=adam_direction, description=L2, effective_lr=Formula(adamax_rate)))
register_optimizer("torch.optim.ASGD", OptimizerRule(
    own="coupled", update_direction=gradient_direction, step_size=_asgd_step_size,
    description=f"{L2}; its own `p *= 1 - lambd*eta` (lambd=1e-4) is not weight_decay and stays",
    effective_lr=Formula(None, "one step size per parameter (state['eta']), the same for all its elements")))
register_optimizer(
    "torch.optim.RMSprop",
    OptimizerRule(own="coupled", update_direction=_rmsprop_direction,
                  description=f"{L2}; cautious decay only without momentum", effective_lr=Formula(rmsprop_rate)),
)
register_optimizer(
    "torch.optim.Adadelta",
    OptimizerRule(own="coupled", update_direction=gradient_direction, refuse=_adadelta,
                  description=f"{L2}; its lr is a multiplier (default 1.0) of an adaptive step",
                  effective_lr=Formula(None, "its rate divides by the average of squared updates before the step,"
                                             " which the step overwrites")),
)
register_optimizer(
    "torch.optim.Adagrad",
    OptimizerRule(
        own="coupled",
        step_size=_adagrad_step_size,
        update_direction=gradient_direction,
        description=f"{L2}; decoupled decay follows its decayed lr `lr / (1 + (t-1)*lr_decay)`",
        effective_lr=Formula(adagrad_rate),
    ),
)
for _name in ("Adam", "AdamW", "NAdam", "RAdam"):
    register_optimizer(
        f"torch.optim.{_name}",
        OptimizerRule(
            own=_adamw_rule if _name == "AdamW" else _flagged_rule,
            switches=_FLAGGED,
            chosen_switch=None if _name == "AdamW" else non_default(decoupled_weight_decay=False),
            equilibrium=_adam_form if _name in ("Adam", "AdamW") else None,
            # NAdam's update mixes g and m with step-dependent weights: its sign is not m's
            update_direction=None if _name == "NAdam" else adam_direction,
            effective_lr=Formula(radam_rate) if _name == "RAdam" else Formula(adam_rate, batch=adam_rates),
            description=f"{L2}, or {DECOUPLED} with `decoupled_weight_decay=True` (AdamW: always)",
        ),
    )
register_optimizer(
    "torch.optim.Adafactor",
    OptimizerRule(
        own="decoupled",
        exact_generic=False,  # it measures RMS(p) for its step size before its own decay
        update_direction=gradient_direction,
        description="`p *= 1 - lr*wd` after measuring RMS(p) for its step size, before the update",
        effective_lr=Formula(adafactor_rate, sharded=False),
    ),
)
register_optimizer("torch.optim.Muon", OptimizerRule(
    own="decoupled", description=DECOUPLED,
    effective_lr=ORTHOGONALIZED))
register_optimizer("torch.optim.SparseAdam", OptimizerRule(
    own=None, refuse=_sparse_adam, description="no weight_decay", effective_lr=Formula(sparse_adam_rate)))
register_optimizer("torch.optim.Rprop", OptimizerRule(
    own=None, refuse=_rprop, description="no weight_decay",
    effective_lr=Formula(None, "its per-element step sizes (state['step_size']) multiply sign(grad), not grad")))
register_optimizer(
    "torch.optim.LBFGS",
    OptimizerRule(
        own=None,
        refuse=always(
            "LBFGS evaluates its closure several times per step, so a decay applied after the closure would be"
            " applied once per evaluation. Put an L2 term into the loss instead."
        ),
        description="no weight_decay; evaluates its closure several times per step",
        effective_lr=Formula(None, "a quasi-Newton direction and a line search: no elementwise rate"),
    ),
)
