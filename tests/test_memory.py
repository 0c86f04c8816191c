"""The callbacks allocate no parameter-sized buffers on non-logging steps: a step allocates what AdamW's does."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_wd import attach_weight_decay


class AllocatedBytes(TorchDispatchMode):
    """Adds up the bytes of every tensor that an op creates (in-place ops and views create none)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.largest = 0

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
    ours = step_allocations(lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, weight_decay=0.1), mode="coupled")
    ref = step_allocations(lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, weight_decay=0.1))
    # SGD's own L2 (`grad.add(param)`) allocates a new gradient; ours adds in place into .grad
    assert ours.total < ref.total
    assert ref.total - ours.total == 2 * (256 * 256 + 256) * 4
