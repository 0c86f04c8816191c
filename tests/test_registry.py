"""The optimizer registry: unknown classes warn once naming the assumption, a declaration silences it and is obeyed,
and a run through the Trainer with an optimizer whose lr is None (a relative step size) trains as its own decay."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_same_weights, fit, tiny_module
from torch import nn

from lightning_wd import WeightDecay, attach_weight_decay
from lightning_wd.optimizers import OptimizerRule, register_optimizer, registry, rule_for


class HomeMadeAdamW(torch.optim.Optimizer):
    """A hand-written AdamW-like optimizer (no torch base other than Optimizer): `p *= 1 - lr*wd` before a
    sign-of-gradient step."""

    def __init__(self, params, lr=1e-2, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def train(opt, m, steps=5):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in m.parameters()])


@pytest.fixture
def clean_registry():
    saved = dict(registry._BY_CLASS), dict(registry._BY_PATH), set(registry._UNRESOLVED)
    yield
    registry._BY_CLASS.clear(), registry._BY_CLASS.update(saved[0])
    registry._BY_PATH.clear(), registry._BY_PATH.update(saved[1])
    registry._UNRESOLVED.clear(), registry._UNRESOLVED.update(saved[2])


def test_an_unknown_class_warns_once_naming_it_and_the_assumption(clean_registry):
    m = model()
    with pytest.warns(UserWarning, match=r"HomeMadeAdamW is not in lightning_wd's optimizer registry; assuming that its"
                                         r" `weight_decay` only adds a decay .* step size is the group's lr"):
        handle = attach_weight_decay(HomeMadeAdamW(m.parameters(), weight_decay=0.1))
    handle.detach()
    assert rule_for(HomeMadeAdamW)[1] is None


@pytest.mark.parametrize("how", ["class", "path"])
def test_a_declaration_silences_the_warning_and_gives_native_handoff(clean_registry, how):
    key = HomeMadeAdamW if how == "class" else f"{__name__}.HomeMadeAdamW"
    register_optimizer(key, OptimizerRule(own="decoupled", description="p *= 1 - lr*wd before a sign step"))
    m = model()
    opt = HomeMadeAdamW(m.parameters(), weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach_weight_decay(opt, mode="decoupled")
    ours = train(opt, m)
    m2 = model()
    ref = train(HomeMadeAdamW(m2.parameters(), weight_decay=0.1), m2)  # its own decay, nothing attached
    assert torch.equal(ours, ref)


def test_a_subclass_of_a_registered_class_warns_naming_its_base():
    class MyAdam(torch.optim.Adam):
        pass

    with pytest.warns(UserWarning, match=r"MyAdam is a subclass of torch.optim.adam.Adam, whose entry it gets"):
        attach_weight_decay(MyAdam(model().parameters(), weight_decay=0.1)).detach()


def test_transformers_adafactor_with_lr_none_trains_through_the_trainer_as_its_own_decay():
    adafactor = pytest.importorskip("transformers.optimization").Adafactor

    def make(m):
        return adafactor(m.parameters(), lr=None, weight_decay=0.1)  # relative step, scale_parameter: the defaults

    ref = tiny_module(make)
    fit(ref, max_steps=6)
    got = tiny_module(make)
    t = fit(got, [WeightDecay(log_weight_decay=True)], max_steps=6)  # the TypeError at the first step
    assert_same_weights(got, ref)
    assert t.optimizers[0].param_groups[0]["lr"] is None
    with pytest.raises(Exception, match="lr is None"):
        fit(tiny_module(make), [WeightDecay("independent")], max_steps=1)
