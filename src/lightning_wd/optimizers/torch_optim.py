"""``torch.optim``: how each optimizer applies its own ``weight_decay`` (read from torch 2.13's sources)."""

from __future__ import annotations

from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.optimizers.registry import Group, OptimizerRule, Scalar, register_optimizer

# torch's Adam, AdamW, NAdam and RAdam keep the switch in each param group: `decoupled_weight_decay`
_FLAG = "decoupled_weight_decay"
_FLAGGED = {"decoupled": {_FLAG: True}, "coupled": {_FLAG: False}}


def _flagged_rule(group: Group) -> str:
    return "decoupled" if group.get(_FLAG, False) else "coupled"


def _adamw_rule(group: Group) -> str:
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


def _never(reason: str):
    return lambda optimizer, group, rule: reason


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

for _name in ("SGD", "RMSprop", "Adamax", "ASGD"):
    register_optimizer(f"torch.optim.{_name}", OptimizerRule(own="coupled", description=L2))
register_optimizer(
    "torch.optim.Adadelta",
    OptimizerRule(own="coupled", description=f"{L2}; its lr is a multiplier (default 1.0) of an adaptive step"),
)
register_optimizer(
    "torch.optim.Adagrad",
    OptimizerRule(
        own="coupled",
        step_size=_adagrad_step_size,
        description=f"{L2}; decoupled decay follows its decayed lr `lr / (1 + (t-1)*lr_decay)`",
    ),
)
for _name in ("Adam", "AdamW", "NAdam", "RAdam"):
    register_optimizer(
        f"torch.optim.{_name}",
        OptimizerRule(
            own=_adamw_rule if _name == "AdamW" else _flagged_rule,
            switches=_FLAGGED,
            description=f"{L2}, or {DECOUPLED} with `decoupled_weight_decay=True` (AdamW: always)",
        ),
    )
register_optimizer(
    "torch.optim.Adafactor",
    OptimizerRule(
        own="decoupled",
        description=f"{DECOUPLED}, after measuring RMS(p) for its step size (the generic pass decays first)",
    ),
)
register_optimizer("torch.optim.Muon", OptimizerRule(own="decoupled", description=DECOUPLED))
register_optimizer(
    "torch.optim.SparseAdam", OptimizerRule(own=None, refuse=_sparse_adam, description="no weight_decay")
)
register_optimizer("torch.optim.Rprop", OptimizerRule(own=None, refuse=_rprop, description="no weight_decay"))
register_optimizer(
    "torch.optim.LBFGS",
    OptimizerRule(
        own=None,
        refuse=_never(
            "LBFGS evaluates its closure several times per step, so a decay applied after the closure would be"
            " applied once per evaluation. Put an L2 term into the loss instead."
        ),
        description="no weight_decay; evaluates its closure several times per step",
    ),
)
