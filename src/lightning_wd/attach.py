"""Attach weight decay to any ``torch.optim.Optimizer`` through its step hooks.

This is the engine behind :class:`lightning_wd.WeightDecay`, usable on its own in a hand-written loop or with
Lightning Fabric::

    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.01)
    handle = attach_weight_decay(opt, mode="decoupled")   # now trains exactly as AdamW
    for x, y in data:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    handle.detach()                                        # the optimizer's own decay comes back

How it works. Each param group's decay is *taken over*: it is copied to the group key ``"lightning_wd"``, and the
group's ``weight_decay`` is set to 0, so the optimizer's own decay is off. Because the value lives in the param
group, ``optimizer.state_dict()`` saves it and a resume restores it; groups added later (``add_param_group``) are
taken over at their first step. A step pre-hook then applies the decay after the gradients are final:

- when ``step()`` gets a closure (Lightning's automatic optimization runs forward, backward, the
  ``on_before_optimizer_step`` hooks and gradient clipping inside it), the closure is wrapped and the decay runs
  right after it, still before the update;
- without a closure (a plain loop, Lightning's 16-mixed path, which runs the closure itself and calls ``step()``
  only when the gradients are finite), the pre-hook applies it at once.

For ``torch.optim.Adam`` and ``AdamW`` (``native=True``) the decay instead rides inside the optimizer's own
foreach or fused kernel: the pre-hook hands the group its decay for the duration of the step and the post-hook
sets it back to 0. That path is AdamW's own code, so it costs no extra pass over the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_wd.decay import add_l2_to_grads_, decay_weights_
from lightning_wd.low_precision import LOW_PRECISION, decay_is_lost, smallest_safe_decay
from lightning_wd.modes import Mode, check_lr_max, check_mode, check_weight_decay

#: param-group key that holds the decay taken over from ``weight_decay``
WD_KEY = "lightning_wd"
#: param-group key that holds the reference lr of ``mode="independent"``
LR_MAX_KEY = "lightning_wd_lr_max"

_NATIVE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)

__all__ = [
    "AttachedWeightDecay",
    "LR_MAX_KEY",
    "WD_KEY",
    "attach_weight_decay",
    "calls_closure_repeatedly",
    "unwrap_optimizer",
]


def calls_closure_repeatedly(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` evaluates its closure several times in one ``step()`` (LBFGS does)."""
    return isinstance(optimizer, torch.optim.LBFGS)


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The ``torch.optim.Optimizer`` inside Lightning's ``LightningOptimizer`` or Fabric's ``_FabricOptimizer``."""
    inner = optimizer
    while inner is not None and not isinstance(inner, Optimizer):
        inner = getattr(inner, "optimizer", None)  # both wrappers expose the wrapped optimizer as `.optimizer`
    if inner is None:
        raise TypeError(
            "`optimizer` must be a torch.optim.Optimizer (or a Lightning/Fabric wrapper of one),"
            f" got {type(optimizer).__name__}."
        )
    return inner


def _closure_of(args: tuple, kwargs: dict) -> tuple[Callable[[], Any] | None, bool]:
    """The closure passed to ``step()``, and whether it was passed by position."""
    if len(args) > 1 and callable(args[1]):
        return args[1], True
    closure = kwargs.get("closure")
    return (closure if callable(closure) else None), False


class AttachedWeightDecay:
    """Weight decay attached to one optimizer; made by :func:`attach_weight_decay`. ``detach()`` undoes it."""

    def __init__(
        self,
        optimizer: Optimizer,
        mode: Mode = "decoupled",
        weight_decay: float | None = None,
        exclude: Iterable[Tensor] = (),
        lr_max: float | None = None,
        native: bool = True,
        stochastic_rounding: bool = False,
    ) -> None:
        optimizer = unwrap_optimizer(optimizer)
        if calls_closure_repeatedly(optimizer):
            raise ValueError(
                f"{type(optimizer).__name__} evaluates its closure several times per step, so a decay applied after"
                " the closure would be applied several times per step. Use an optimizer that takes one gradient"
                " per step, or its own `weight_decay`."
            )
        self.optimizer = optimizer
        self.mode = check_mode(mode)
        self.weight_decay = check_weight_decay(weight_decay)
        self.lr_max = check_lr_max(lr_max)
        self.native = native
        self.stochastic_rounding = bool(stochastic_rounding)
        self._excluded = {id(p) for p in exclude}
        self._native_groups: list[dict[str, Any]] = []
        # Per param group, keyed by its params list, which load_state_dict carries over into the new group dicts:
        # (the list itself, so that its id cannot be reused; its length when seen; its dtypes; whether it holds
        # excluded params).
        self._group_info: dict[int, tuple[list[Tensor], int, frozenset[torch.dtype], bool]] = {}
        self._last_decay: dict[int, float] = {}
        self._warned: set[tuple[int, torch.dtype]] = set()
        self.take_over()
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    # --- taking the decay over from the optimizer ---------------------------------------------------------------
    def take_over(self) -> None:
        """Move the decay of every group not yet taken over into ``WD_KEY`` and zero the optimizer's own."""
        for group in self.optimizer.param_groups:
            if WD_KEY not in group:
                group[WD_KEY] = float(group.get("weight_decay", 0.0))
                if "weight_decay" in group:
                    group["weight_decay"] = 0.0
            # An explicit argument wins over what a resumed checkpoint holds, so a resume with a new value obeys it.
            if self.weight_decay is not None:
                group[WD_KEY] = self.weight_decay
            if self.mode == "independent":
                if self.lr_max is not None:
                    group[LR_MAX_KEY] = self.lr_max
                elif LR_MAX_KEY not in group:
                    group[LR_MAX_KEY] = group.get("initial_lr", group["lr"])

    def detach(self) -> None:
        """Remove the hooks and give every group its decay back in ``weight_decay``."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for group in self.optimizer.param_groups:
            if WD_KEY in group:
                if "weight_decay" in group:
                    group["weight_decay"] = group[WD_KEY]
                del group[WD_KEY]
            group.pop(LR_MAX_KEY, None)

    def __enter__(self) -> AttachedWeightDecay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # --- per step ----------------------------------------------------------------------------------------------
    def _info(self, group: dict[str, Any]) -> tuple[frozenset[torch.dtype], bool]:
        params = group["params"]
        info = self._group_info.get(id(params))
        if info is None or info[1] != len(params):
            dtypes = frozenset(p.dtype for p in params)
            info = (params, len(params), dtypes, any(id(p) in self._excluded for p in params))
            self._group_info[id(params)] = info
        return info[2], info[3]

    def _uses_native(self, group: dict[str, Any]) -> bool:
        if not self.native or type(self.optimizer) not in _NATIVE_OPTIMIZERS or "decoupled_weight_decay" not in group:
            return False
        dtypes, has_excluded = self._info(group)
        if has_excluded:
            return False  # the optimizer's decay is per group; exclusions need the per-parameter pass
        # AdamW is Adam with the group flag `decoupled_weight_decay` set; the pre-hook sets the flag for the mode
        return not (self.stochastic_rounding and dtypes & set(LOW_PRECISION))

    def _native_weight_decay(self, group: dict[str, Any]) -> float | Tensor:
        wd = group[WD_KEY]
        return wd / group[LR_MAX_KEY] if self.mode == "independent" else wd

    def per_step_decay(self, group: dict[str, Any]) -> float | Tensor:
        """The factor ``x`` of this step's ``p *= 1 - x`` for ``group`` (decoupled and independent modes)."""
        if self.mode == "independent":
            return group["lr"] / group[LR_MAX_KEY] * group[WD_KEY]
        return group["lr"] * group[WD_KEY]

    def check_precision(self) -> None:
        """Warn for every group whose decay rounds away in its weights' dtype (also done before every step)."""
        for index, group in enumerate(self.optimizer.param_groups):
            if group[WD_KEY] != 0:
                self._check_precision(index, group)

    def _check_precision(self, index: int, group: dict[str, Any]) -> None:
        """Warn once per group and dtype when rounding would swallow the decay (at the start and at lr changes)."""
        if self.mode == "coupled" or self.stochastic_rounding:
            return  # coupled decay does not multiply the weights; stochastic rounding keeps the decay
        x = self.per_step_decay(group)
        if isinstance(x, Tensor) or self._last_decay.get(id(group["params"])) == x:
            return  # a tensor lr is not read on the host: that would sync the device
        self._last_decay[id(group["params"])] = x
        for dtype in self._info(group)[0]:
            if decay_is_lost(x, dtype) and (index, dtype) not in self._warned:
                self._warned.add((index, dtype))
                rank_zero_warn(
                    f"lightning_wd: param group {index} of {type(self.optimizer).__name__} holds {dtype} weights and"
                    f" decays them by {x:.3g} per step (p *= 1 - {x:.3g}), below {smallest_safe_decay(dtype):.3g},"
                    f" the smallest decay {dtype} can apply to every weight: most of the decay rounds away. Pass"
                    " `stochastic_rounding=True` to keep it, or keep fp32 master weights (e.g. bf16-mixed)."
                )

    def _pre_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.take_over()
        generic = []
        for index, group in enumerate(optimizer.param_groups):
            if group[WD_KEY] == 0:
                continue
            self._check_precision(index, group)
            if self._uses_native(group):
                self._native_groups.append({"group": group, "flag": group["decoupled_weight_decay"]})
                group["weight_decay"] = self._native_weight_decay(group)
                group["decoupled_weight_decay"] = self.mode != "coupled"
            else:
                generic.append(group)
        if not generic:
            return None
        closure, positional = _closure_of(args, kwargs)
        if closure is None:
            self._apply(generic)
            return None
        wrapped = self._wrap_closure(closure, generic)
        if positional:
            return (args[0], wrapped, *args[2:]), kwargs
        return args, {**kwargs, "closure": wrapped}

    def _post_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        for saved in self._native_groups:
            saved["group"]["weight_decay"] = 0.0
            saved["group"]["decoupled_weight_decay"] = saved["flag"]
        self._native_groups.clear()

    def _wrap_closure(self, closure: Callable[[], Any], groups: list[dict[str, Any]]) -> Callable[[], Any]:
        calls = 0

        def closure_then_decay() -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise RuntimeError(
                    f"{type(self.optimizer).__name__}.step() called its closure more than once; lightning_wd applies"
                    " the decay once per step after the closure and cannot follow an optimizer that re-evaluates it."
                )
            with torch.enable_grad():
                out = closure()
            self._apply(groups)
            return out

        return closure_then_decay

    @torch.no_grad()
    def _apply(self, groups: list[dict[str, Any]]) -> None:
        opt = self.optimizer
        # Optimizers that handle AMP scaling themselves (torch's fused=True) are stepped even when the gradients
        # are not finite, with `found_inf` and `grad_scale` set on them; their gradients are still scaled.
        amp_in_step = getattr(opt, "_step_supports_amp_scaling", False)
        found_inf = getattr(opt, "found_inf", None) if amp_in_step else None
        grad_scale = getattr(opt, "grad_scale", None) if amp_in_step else None
        for group in groups:
            params = [p for p in group["params"] if p.grad is not None and id(p) not in self._excluded]
            wd = group[WD_KEY]
            if self.mode == "coupled":
                grads = [p.grad for p in params]
                add_l2_to_grads_(params, grads, -wd if group.get("maximize", False) else wd, grad_scale)
            else:
                lr = group["lr"] if self.mode == "decoupled" else group["lr"] / group[LR_MAX_KEY]
                decay_weights_(params, lr, wd, skip=found_inf, stochastic_rounding=self.stochastic_rounding)


def attach_weight_decay(
    optimizer: Optimizer,
    mode: Mode = "decoupled",
    weight_decay: float | None = None,
    exclude: Iterable[Tensor] = (),
    lr_max: float | None = None,
    native: bool = True,
    stochastic_rounding: bool = False,
) -> AttachedWeightDecay:
    """Take over the weight decay of ``optimizer`` and apply it in ``mode`` on every step.

    Args:
        optimizer: any ``torch.optim.Optimizer`` whose ``step()`` evaluates its closure at most once, or the
            optimizer that ``fabric.setup(...)`` returns.
        mode: ``"decoupled"`` (``p -= lr * wd * p``, AdamW), ``"coupled"`` (``grad += wd * p``, L2 as in
            ``Adam(weight_decay=...)``) or ``"independent"`` (``p -= (lr / lr_max) * wd * p``, decay that follows the
            lr schedule but not the lr's size).
        weight_decay: one decay for every group; ``None`` keeps each group's own ``weight_decay``.
        exclude: parameters never decayed (e.g. biases and norm weights).
        lr_max: the reference lr of ``mode="independent"``; ``None`` takes each group's ``initial_lr`` (set by LR
            schedulers) or its lr when first seen.
        native: let ``torch.optim.Adam``/``AdamW`` apply the decay inside their own kernel (same result, no extra
            pass); other optimizers always use the separate foreach pass.
        stochastic_rounding: decay bf16/fp16 weights with stochastic rounding, so that a per-step decay smaller than
            the format's resolution is not rounded away (see :mod:`lightning_wd.low_precision`). Without it, such a
            lost decay is reported with a warning, once per group and dtype.

    Returns:
        A handle whose ``detach()`` removes the hooks and restores the optimizer's own ``weight_decay``.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.5)
        >>> handle = attach_weight_decay(opt)
        >>> opt.param_groups[0]["weight_decay"], opt.param_groups[0]["lightning_wd"]
        (0.0, 0.5)
        >>> handle.detach()
        >>> opt.param_groups[0]["weight_decay"]
        0.5
    """
    return AttachedWeightDecay(optimizer, mode, weight_decay, exclude, lr_max, native, stochastic_rounding)
