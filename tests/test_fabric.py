"""The same decay in Lightning Fabric: attach to the optimizer that ``fabric.setup`` returns."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric import Fabric

from lightning_wd import attach_weight_decay


def fabric_run(make_opt, mode: str | None, precision: str = "32-true", steps: int = 8) -> torch.Tensor:
    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    model, opt = fabric.setup(model, make_opt(model.parameters()))
    handle = attach_weight_decay(opt, mode=mode) if mode else None
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=g)
        opt.zero_grad()
        fabric.backward(model(x).pow(2).mean())
        opt.step()
    if handle:
        handle.detach()
        assert opt.param_groups[0]["weight_decay"] == 0.1
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fabric_adam_decoupled_is_adamw(precision):
    ours = fabric_run(lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1), "decoupled", precision)
    ref = fabric_run(lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1), None, precision)
    assert torch.equal(ours, ref)


def test_fabric_adamw_coupled_is_adam_l2():
    ours = fabric_run(lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1), "coupled")
    ref = fabric_run(lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1), None)
    assert torch.equal(ours, ref)


def test_non_optimizer_is_refused_with_its_type():
    with pytest.raises(TypeError, match="torch.optim.Optimizer .* got Linear"):
        attach_weight_decay(torch.nn.Linear(2, 2))
