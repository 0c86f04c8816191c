"""The callbacks allocate no parameter-sized buffers on non-logging steps: a step allocates what AdamW's does; on a
logging step the monitor's memory does not grow with the parameters."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_wd import attach_weight_decay


class AllocatedBytes(TorchDispatchMode):
    """Adds up the bytes of every tensor that an op creates (in-place ops and views create none), and keeps the
    largest one and the most alive at once (a storage's Python object lives as long as the storage itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = self.largest = self.live = self.peak = 0

    def _freed(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        creates = not any(a.alias_info is not None for a in schema.returns)  # in-place and views alias an input
        if creates:
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor):
                    n = t.untyped_storage().nbytes()
                    self.total += n
                    self.largest = max(self.largest, n)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t.untyped_storage(), self._freed, n)
        return out


def step_allocations(make_opt, **attach_kwargs) -> AllocatedBytes:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    opt = make_opt(model.parameters())
    if attach_kwargs:
        attach_weight_decay(opt, **attach_kwargs)
    for _ in range(2):  # the first step allocates the optimizer state
        model(torch.randn(4, 256)).sum().backward()
        with AllocatedBytes() as counter:
            opt.step()
        opt.zero_grad()
    return counter


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("native", [True, False])
def test_decoupled_step_allocates_exactly_what_adamw_does(foreach, native):
    ours = step_allocations(lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.1, foreach=foreach),
                            mode="decoupled", native=native)
    ref = step_allocations(lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, foreach=foreach))
    assert ours.total == ref.total
    assert ref.largest >= 256 * 256 * 4  # the measure does see the parameter-sized temporaries of Adam itself


def test_generic_coupled_pass_allocates_nothing():
    sgd = lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, weight_decay=0.1)  # noqa: E731
    ours = step_allocations(sgd, mode="coupled", native=False)
    ref = step_allocations(sgd)
    # with native=True SGD applies its own L2 (the mode it implements), which is the reference itself
    assert step_allocations(sgd, mode="coupled").total == ref.total
    # SGD's own L2 (`grad.add(param)`) allocates a new gradient; ours adds in place into .grad
    assert ours.total < ref.total
    assert ref.total - ours.total == 2 * (256 * 256 + 256) * 4


def monitor_logging_step_allocations(width: int, monkeypatch) -> AllocatedBytes:
    import lightning_wd.effective_lr as el
    from lightning_wd import EffectiveLRMonitor

    monkeypatch.setattr(el, "chunk_elements", lambda device: 4096)
    torch.manual_seed(0)
    model = torch.nn.Linear(width, width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    opt.step()
    return collect_allocations(EffectiveLRMonitor(per_parameter=True), opt)


def collect_allocations(monitor, opt) -> AllocatedBytes:
    from lightning_wd.optimizers import formula_for

    formula = formula_for(opt)[1]
    with AllocatedBytes() as counter, torch.no_grad():
        monitor._collect(opt, formula)  # what the monitor's step hook does on a logging step
    return counter


def test_monitor_logging_step_memory_does_not_grow_with_the_parameters(monkeypatch):
    small = monitor_logging_step_allocations(512, monkeypatch)  # a 256K-element weight: 64 chunks
    large = monitor_logging_step_allocations(2048, monkeypatch)  # 4M elements: 1024 chunks
    # the same chunk-sized scratch buffer and block of rows, whatever the size of the weight; more chunks make more
    # small temporaries, one at a time
    assert large.largest == small.largest
    assert large.peak == small.peak < 512 * 512 * 4  # less than one copy of even the smaller weight


def many_parameters_logging_step(n: int, per_parameter: bool) -> AllocatedBytes:
    from lightning_wd import EffectiveLRMonitor

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(n)]
    opt = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn(64)
    opt.step()
    return collect_allocations(EffectiveLRMonitor(per_parameter=per_parameter), opt)


def test_monitor_logging_step_memory_does_not_grow_with_the_number_of_parameters():
    """2,000 parameters against 200: the statistics go through the same blocks of rows and the same scratch. The
    largest tensor is the same, and so is the peak, but for the logged numbers themselves (4 fp32 per parameter)."""
    groups_only = {n: many_parameters_logging_step(n, per_parameter=False) for n in (200, 2000)}
    assert groups_only[2000].largest == groups_only[200].largest
    assert groups_only[2000].peak == groups_only[200].peak
    each = {n: many_parameters_logging_step(n, per_parameter=True) for n in (200, 2000)}
    assert each[2000].largest == each[200].largest == groups_only[200].largest
    assert each[2000].peak - each[200].peak == (2000 - 200) * 4 * 4
    # one block of rows of partials (16 x 13,314 fp64, 1.6 MiB) is the largest; before the statistics were
    # streamed, every parameter's row was alive at once (2,000 x 70 KB)
    assert each[2000].peak < 4 * 2**20
