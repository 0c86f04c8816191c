"""The effective-lr formulas of third-party Adam variants against the optimizers' real updates, in float64:
``before - after == rate * what it multiplies`` at every step, with no weight decay (skipped without the package)."""

from __future__ import annotations

import warnings

import pytest
import torch
from compat_cases import _import
from test_effective_lr import grads

from lightning_wd.effective_lr import effective_lr
from lightning_wd.optimizers import formula_for


def m_hat_by(step_of):
    """``exp_avg / (1 - beta1^t)``, with ``t`` read by ``step_of(opt, w)``."""
    def multiplied(opt, w, grad, before_state):
        group = opt.param_groups[0]
        return opt.state[w]["exp_avg"] / (1 - group["betas"][0] ** step_of(opt, w))
    return multiplied


state_step = m_hat_by(lambda opt, w: float(opt.state[w]["step"]))
group_step = m_hat_by(lambda opt, w: float(opt.param_groups[0]["step"]))


def exp_avg(opt, w, grad, before_state):
    return opt.state[w]["exp_avg"]


def nesterov(opt, w, grad, before_state):
    """timm NAdamW's numerator: ``lerp(m, g, 1 - beta1) / (1 - beta1^t)``."""
    group, state = opt.param_groups[0], opt.state[w]
    beta1 = group["betas"][0]
    return torch.lerp(state["exp_avg"], grad, 1 - beta1) / (1 - beta1 ** float(state["step"]))


# name -> (module, factory, what the rate multiplies, which tensor moves by rate * that: "param" or a state key)
CASES = {
    "optimi Adam": ("optimi", lambda p: _import("optimi").Adam(p, lr=5e-2, weight_decay=0), exp_avg, "param"),
    "optimi AdamW": ("optimi", lambda p: _import("optimi").AdamW(p, lr=5e-2, weight_decay=0), exp_avg, "param"),
    "timm AdamWLegacy": ("timm.optim.adamw", lambda p: _import("timm.optim.adamw").AdamWLegacy(
        p, lr=5e-2, weight_decay=0), state_step, "param"),
    "timm NAdamW": ("timm.optim.nadamw", lambda p: _import("timm.optim.nadamw").NAdamW(
        p, lr=5e-2, weight_decay=0), nesterov, "param"),
    "timm AdamP (no projection)": ("timm.optim.adamp", lambda p: _import("timm.optim.adamp").AdamP(
        p, lr=5e-2, delta=0.0), state_step, "param"),
    "pytorch_optimizer AdaBelief": ("pytorch_optimizer", lambda p: _import("pytorch_optimizer").AdaBelief(
        p, lr=5e-2), group_step, "param"),
    "pytorch_optimizer AdamP (no projection)": ("pytorch_optimizer", lambda p: _import("pytorch_optimizer").AdamP(
        p, lr=5e-2, delta=0.0), group_step, "param"),
    "pytorch_optimizer Lamb": ("pytorch_optimizer", lambda p: _import("pytorch_optimizer").Lamb(
        p, lr=5e-2), group_step, "param"),
    "prodigyopt Prodigy": ("prodigyopt", lambda p: _import("prodigyopt").Prodigy(p, lr=1.0, d0=1e-2),
                           lambda opt, w, grad, d_before: exp_avg(opt, w, grad, None) * d_before
                           / opt.param_groups[0]["d"], "param"),  # documented: the step used d before its update
    "schedulefree AdamWScheduleFree (z)": ("schedulefree", lambda p: _import("schedulefree").AdamWScheduleFree(
        p, lr=5e-2, warmup_steps=3), lambda opt, w, grad, before: grad, "z"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_third_party_rate_times_what_it_multiplies_is_the_real_update(name):
    module, make, multiplied, moving = CASES[name]
    try:
        _import(module)
    except ImportError:
        pytest.skip(f"{module} is not installed")
    w = torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make([w])
    if hasattr(opt, "train"):
        opt.train()  # schedule-free optimizers step only in train mode
    spec_of = formula_for(opt)[1].spec
    for step, g in enumerate(grads(w.shape, 8)):
        w.grad = g.clone()
        tracked = lambda: (w if moving == "param" else opt.state[w][moving]).detach().clone()  # noqa: E731
        before = tracked() if moving == "param" or moving in opt.state.get(w, {}) else None
        d_before = opt.param_groups[0].get("d")
        opt.step()
        if before is None:  # z is made by the first step
            continue
        rate = effective_lr(spec_of(opt.state[w], opt.param_groups[0], w)).double().view_as(w)
        expected = rate * multiplied(opt, w, g, d_before)
        assert torch.count_nonzero(expected) > 0
        torch.testing.assert_close(before - tracked(), expected, rtol=2e-6, atol=1e-12,
                                   msg=lambda m, step=step: f"step {step}: {m}")


def test_the_optimizers_without_a_per_element_rate_say_so():
    lion = pytest.importorskip("lion_pytorch").Lion
    found = formula_for(lion([torch.nn.Parameter(torch.zeros(2))]))
    assert found is not None and found[1].spec is None and "sign" in found[1].note
