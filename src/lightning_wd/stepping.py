"""The points of an optimizer step where lightning_wd acts, in one place for the decay and the monitors.

An optimizer's ``step()`` is wrapped once, on the instance (as torch's LR schedulers wrap it), by a :class:`StepHooks`
that calls its listeners at four points of the outermost call:

- ``on_begin``: the step starts (param groups added since the last step can be adopted here);
- ``on_grads_ready``: the gradients are final. With a closure (Lightning's automatic optimization runs forward,
  backward, the ``on_before_optimizer_step`` hooks and gradient clipping inside it) that is right after the
  closure's first evaluation, inside the optimizer's step and before its update; without one (a plain loop,
  Lightning's 16-mixed path, which runs the closure itself) it is at once. Listeners are called in the order of
  their ``priority``: the monitors read the gradients and weights (priority 0) before the decay changes them (10);
- ``on_end``: the update is done;
- ``on_abort``: the step raised, in the closure, in a listener or in the optimizer's update; the exception then
  propagates, after every listener has put back what it changed.

Only the outermost call counts: a subclass whose ``step()`` calls ``super().step()`` runs inside it, and an optimizer
that wraps another (``Lookahead``) steps the inner one inside its own step. A closure evaluated a second time in one
step (LBFGS, SAM) is reported to ``on_closure_repeat``.

Example::

    >>> import torch
    >>> class Printer:
    ...     priority = 0
    ...     def on_grads_ready(self, optimizer): print("gradients final")
    ...     def on_end(self, optimizer): print("updated")
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.SGD([w], lr=0.1)
    >>> hooks = StepHooks.of(opt)
    >>> printer = Printer()
    >>> hooks.add(printer)
    >>> w.grad = torch.ones(2)
    >>> opt.step()
    gradients final
    updated
    >>> hooks.remove(printer)
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["StepHooks", "closure_of"]

_MISSING = object()
_TABLE: weakref.WeakKeyDictionary[Optimizer, StepHooks] = weakref.WeakKeyDictionary()


def closure_of(args: tuple, kwargs: dict) -> tuple[Callable[[], Any] | None, bool]:
    """The closure passed to ``step(*args, **kwargs)``, and whether it was passed by position."""
    if args and callable(args[0]):
        return args[0], True
    closure = kwargs.get("closure")
    return (closure if callable(closure) else None), False


def _call(listeners: list[Any], method: str, optimizer: Optimizer) -> None:
    for listener in listeners:
        fn = getattr(listener, method, None)
        if fn is not None:
            fn(optimizer)


class StepHooks:
    """The listeners of one optimizer's steps; :meth:`of` finds or makes it. See the module docstring."""

    def __init__(self, optimizer: Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._listeners: list[Any] = []
        self._inner: Callable[..., Any] | None = None  # the step() we wrap: the class's, or an instance wrapper
        self._saved: Any = _MISSING  # the instance attribute `step` we replaced, if any
        self._method: types.MethodType | None = None
        self._in_step = False

    @classmethod
    def of(cls, optimizer: Optimizer) -> StepHooks:
        hooks = _TABLE.get(optimizer)
        if hooks is None:
            hooks = _TABLE[optimizer] = cls(optimizer)
        return hooks

    @property
    def listeners(self) -> tuple[Any, ...]:
        return tuple(self._listeners)

    def add(self, listener: Any) -> None:
        """Call ``listener`` at the points of every step from now on (in the order of its ``priority``)."""
        if listener in self._listeners:
            return
        self._listeners.append(listener)
        self._listeners.sort(key=lambda x: getattr(x, "priority", 0))  # stable: equal priorities keep their order
        self._install()

    def remove(self, listener: Any) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
        if not self._listeners:
            self._uninstall()

    # --- the wrapper on the instance ----------------------------------------------------------------------------
    def _install(self) -> None:
        optimizer = self._optimizer()
        if optimizer is None or self._method is not None:
            return  # installed (possibly under a wrapper added since, e.g. an LR scheduler's): still in the chain
        self._saved = optimizer.__dict__.get("step", _MISSING)
        self._inner = optimizer.step
        hooks = self

        @functools.wraps(type(optimizer).step)
        def step(opt: Optimizer, *args: Any, **kwargs: Any) -> Any:
            return hooks._run(opt, args, kwargs)

        if getattr(self._inner, "_wrapped_by_lr_sched", False):
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # so a new scheduler does not wrap again
        # a bound method, as torch's LR schedulers expect (they re-bind `opt.step.__func__`)
        self._method = types.MethodType(step, optimizer)
        optimizer.step = self._method  # type: ignore[method-assign]

    def _uninstall(self) -> None:
        optimizer = self._optimizer()
        if optimizer is None or self._method is None:
            return
        if optimizer.__dict__.get("step") is not self._method:
            return  # something wrapped it since: stay in the chain, passing calls through
        if self._saved is _MISSING:
            del optimizer.__dict__["step"]
        else:
            optimizer.step = self._saved  # type: ignore[method-assign]
        self._method, self._inner, self._saved = None, None, _MISSING

    # --- one step ------------------------------------------------------------------------------------------------
    def _run(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> Any:
        assert self._inner is not None
        if self._in_step or not self._listeners:
            return self._inner(*args, **kwargs)
        listeners = list(self._listeners)
        self._in_step = True
        try:
            _call(listeners, "on_begin", optimizer)
            closure, positional = closure_of(args, kwargs)
            if closure is None:
                _call(listeners, "on_grads_ready", optimizer)
            elif positional:
                args = (self._wrap(closure, listeners, optimizer), *args[1:])
            else:
                kwargs = {**kwargs, "closure": self._wrap(closure, listeners, optimizer)}
            out = self._inner(*args, **kwargs)
            _call(listeners, "on_end", optimizer)
            return out
        except BaseException:
            _call(listeners, "on_abort", optimizer)
            raise
        finally:
            self._in_step = False

    @staticmethod
    def _wrap(closure: Callable[[], Any], listeners: list[Any], optimizer: Optimizer) -> Callable[[], Any]:
        calls = 0

        def closure_then_grads_ready() -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                _call(listeners, "on_closure_repeat", optimizer)
            with torch.enable_grad():
                out = closure()
            if calls == 1:
                _call(listeners, "on_grads_ready", optimizer)
            return out

        return closure_then_grads_ready
