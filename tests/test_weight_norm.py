"""The math of WeightNormMonitor, without a Trainer: norms against float64 sums of squares, the equilibrium formulas
against the paper's per-neuron forms written out here, and the prediction itself against training runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_wd.optimizers import Equilibrium, OptimizerRule, register_optimizer, rule_for
from lightning_wd.weight_norm import (
    adam_l2_norm,
    normalized_update_norm,
    sgdm_norm,
    squared_norms,
)


def test_squared_norms_match_float64_sums_in_the_order_given():
    g = torch.Generator().manual_seed(0)
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2, 2], [1, 0, 0]]), torch.tensor([1.0, 2.0, -3.0]), (3, 3),
                                     check_invariants=True)
    tensors = [
        torch.randn(3, 4, generator=g),
        torch.randn(7, generator=g).to(torch.bfloat16),
        torch.randn(2, 5, generator=g, dtype=torch.float64),
        torch.zeros(0, 5),  # an empty FSDP2 shard
        torch.randn(5, generator=g) * 1e3,
        sparse,  # uncoalesced: index (2, 0) twice, so its norm is that of [1, -1]
    ]
    got = squared_norms(tensors)
    assert got.dtype == torch.float32 and got.shape == (6,)
    expected = [t.double().square().sum().item() for t in tensors[:5]] + [1.0 + 1.0]
    for a, b in zip(got.tolist(), expected):
        assert a == pytest.approx(b, rel=1e-6, abs=0)
    assert squared_norms([]).numel() == 0


# --- the closed forms against the paper's per-neuron forms ---------------------------------------------------------
K, C = 6, 10  # rows (output neurons) and inputs per neuron


def homogeneous(row_norm: float, seed: int) -> torch.Tensor:
    """A K x C matrix whose rows all have the norm ``row_norm``: the 'neurons alike' of the whole-matrix forms."""
    m = torch.randn(K, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return m / m.norm(dim=1, keepdim=True) * row_norm


def test_whole_matrix_forms_are_sqrt_rows_times_the_papers_per_neuron_forms():
    lr, wd, momentum, dampening = 3e-3, 0.05, 0.9, 0.2
    w, g = homogeneous(1.7, 0), homogeneous(0.04, 1)
    scale_free = (w.norm() * g.norm()).item()  # the whole matrix's |g~| = |G| |W|
    per_neuron_g = 1.7 * 0.04  # one neuron's |g~| = |g_r| |w_r|
    n = K * C

    # AdamW (Table 1 of arXiv 2305.17212): sqrt(lr C / (2 wd)) per neuron
    assert normalized_update_norm(lr, lr * wd, n) == pytest.approx(math.sqrt(K) * math.sqrt(lr * C / (2 * wd)))
    # AdamC's corrected decay wd lr^2 / lr_max: the norm of the peak lr, whatever the current lr
    lr_max = 1e-2
    assert normalized_update_norm(lr, wd * lr**2 / lr_max, n) == pytest.approx(
        math.sqrt(K) * math.sqrt(lr_max * C / (2 * wd)))
    # Adam + L2: (lr sqrt(C) |g~| / (2 wd))^(1/3) per neuron
    assert adam_l2_norm(lr, wd, n, scale_free) == pytest.approx(
        math.sqrt(K) * (lr * math.sqrt(C) * per_neuron_g / (2 * wd)) ** (1 / 3))
    # SGDM + L2: (lr |g~|^2 / (2 wd (1 - momentum)))^(1/4) per neuron, dampening scaling the lr
    assert sgdm_norm(lr, scale_free, momentum, 0.0, weight_decay=wd) == pytest.approx(
        math.sqrt(K) * (lr * per_neuron_g**2 / (2 * wd * (1 - momentum))) ** 0.25)
    lr_eff = lr * (1 - dampening) / (1 - momentum)
    assert sgdm_norm(lr, scale_free, momentum, dampening, weight_decay=wd) == pytest.approx(
        math.sqrt(K) * (lr_eff * per_neuron_g**2 / (2 * wd)) ** 0.25)
    # a multiplicative decay x = lr_eff * wd is the same decay as L2 through momentum; plain SGD has lr_eff = lr
    assert sgdm_norm(lr, scale_free, momentum, dampening, shrink=lr_eff * wd) == pytest.approx(
        sgdm_norm(lr, scale_free, momentum, dampening, weight_decay=wd))
    assert sgdm_norm(lr, scale_free, 0.0, dampening, weight_decay=wd) == pytest.approx(
        math.sqrt(K) * (lr * per_neuron_g**2 / (2 * wd)) ** 0.25)
    with pytest.raises(ValueError, match="exactly one"):
        sgdm_norm(lr, scale_free, momentum, weight_decay=wd, shrink=lr * wd)


def test_the_registry_names_the_update_form_of_the_papers_optimizers_only():
    params = [nn.Parameter(torch.zeros(2, 2))]

    class Lion(torch.optim.Optimizer):  # a third-party Lion: declared in the registry, as any optimizer is
        def __init__(self, params):
            super().__init__(params, {"lr": 1e-4})

    class MyAdamW(torch.optim.AdamW):
        pass

    register_optimizer(Lion, OptimizerRule(own="decoupled", equilibrium=lambda o, g: Equilibrium("lion")))
    lion_pytorch = pytest.importorskip("lion_pytorch")
    cases = {
        torch.optim.Adam(params): "adam",
        torch.optim.AdamW(params): "adam",
        MyAdamW(params): "adam",
        torch.optim.SGD(params, lr=0.1, momentum=0.9): "sgdm",
        Lion(params): "lion",
        lion_pytorch.Lion(params): "lion",
        torch.optim.Adam(params, amsgrad=True): None,
        torch.optim.RMSprop(params): None,
        torch.optim.NAdam(params): None,
    }
    for opt, kind in cases.items():
        form = rule_for(opt)[0].form(opt, opt.param_groups[0])
        assert (form.kind if form is not None else None) == kind, type(opt).__name__
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.1)
    assert rule_for(sgd)[0].form(sgd, sgd.param_groups[0]) == Equilibrium("sgdm", 0.9, 0.1)


# --- the prediction itself ---------------------------------------------------------------------------------------
def train_scale_invariant(make_opt, steps: int, init_scale: float, c_in: int = 32, k: int = 16, seed: int = 0):
    """A linear layer (no bias) followed by a non-affine LayerNorm, so the layer's output does not depend on the scale
    of its weight, then a linear head; noisy batches (random inputs and labels), so the gradient is noise-dominated.
    Returns the weight (K x C) at the end and, for each of the last 20% of the steps, (|W| after the step, |G| |W|
    at the step)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer, head = nn.Linear(c_in, k, bias=False), nn.Linear(k, 4)
    with torch.no_grad():
        layer.weight.mul_(init_scale)
    opt = make_opt([{"params": [layer.weight]}, {"params": head.parameters(), "weight_decay": 0.0}])
    tail = []
    for t in range(steps):
        x, y = torch.randn(16, c_in, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        loss = nn.functional.cross_entropy(head(nn.functional.layer_norm(layer(x), (k,))), y)
        opt.zero_grad()
        loss.backward()
        scale_free = (layer.weight.grad.norm() * layer.weight.norm()).item() if t >= 0.8 * steps else None
        opt.step()
        if scale_free is not None:
            tail.append((layer.weight.norm().item(), scale_free))
    return layer.weight.detach(), tail


@pytest.fixture
def one_thread():
    """These loops are thousands of tiny ops: one thread is several times faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LR, WD = 1e-2, 0.5  # decay 5e-3 per step: 3,000 steps are 15 timescales


@pytest.mark.parametrize("init_scale", [4.0, 0.25], ids=["from_above", "from_below"])
def test_adamw_reaches_the_predicted_median_neuron_norm(init_scale, one_thread):
    """AdamW settles each neuron of C inputs at sqrt(lr C / (2 wd)) (Kosson et al., Table 1).

    Measured (torch 2.13, CPU), median neuron over the prediction after 3,000 steps: 0.94 from above, 0.82 from below
    (the whole matrix, averaged over the last 600 steps: 0.98 and 0.85); after 6,000 steps both 0.86 (whole 0.96,
    0.93). Adam approaches from below slowly: its second moment (beta2 = 0.999) remembers the large gradients of the
    small weights. The settled value is a little under the prediction; with betas=(0, 0.99) a run from the default
    init gives 0.99 (whole 1.01): the slow second moment and momentum make the update a little smaller than the
    random walk assumes.
    """
    weight, tail = train_scale_invariant(lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=WD), 3000, init_scale)
    k, c = weight.shape
    predicted = math.sqrt(LR * c / (2 * WD))
    start = init_scale * math.sqrt(1 / 3)  # nn.Linear's init: uniform(+-1/sqrt(C)), a row norm of sqrt(1/3)
    assert abs(start / predicted - 1) > 0.5  # it had to move to get there
    median = weight.norm(dim=1).median().item()
    assert median / predicted == pytest.approx(1, abs=0.2), median / predicted
    whole = sum(w for w, _ in tail) / len(tail)
    assert whole / (math.sqrt(k) * predicted) == pytest.approx(1, abs=0.2)


@pytest.mark.parametrize("optimizer", ["adam_l2", "sgdm"])
def test_adam_l2_and_sgdm_reach_the_predicted_layer_norm(optimizer, one_thread):
    """Adam + L2 and SGD with momentum + L2 settle the layer where the paper's balance puts it, given the measured
    scale-free gradient |g~| = |G| |W| (whole matrix; averaged over the last 20% of the steps as the mean the
    formulas take: |g~| for Adam + L2, |g~|^2 for SGDM). Measured: 0.99 and 0.99."""
    if optimizer == "adam_l2":
        lr, wd = 1e-2, 0.1
        weight, tail = train_scale_invariant(lambda p: torch.optim.Adam(p, lr=lr, weight_decay=wd), 2000, 4.0)
        n = weight.numel()
        g = sum(s for _, s in tail) / len(tail)
        predicted = (lr * math.sqrt(n) * g / (2 * wd)) ** (1 / 3)
    else:
        lr, wd, momentum = 0.05, 0.05, 0.9  # lr_eff * wd = 0.025 per step
        weight, tail = train_scale_invariant(
            lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum, weight_decay=wd), 1000, 4.0)
        g2 = sum(s * s for _, s in tail) / len(tail)
        predicted = (lr / (1 - momentum) * g2 / (2 * wd)) ** 0.25
    whole = sum(w for w, _ in tail) / len(tail)
    assert abs(4.0 * math.sqrt(weight.shape[0] / 3) / predicted - 1) > 0.5  # it had to move to get there
    assert whole / predicted == pytest.approx(1, abs=0.2), whole / predicted
