"""Every optimizer of the compatibility list, in every mode, against the optimizer's own decay (native), a
hand-written loop of the rule (adapted), or the documented refusal; and the table of docs/compatibility.md rendered
from the list.

Each run: a 4-16-16-2 tanh MLP, 8 full-batch steps of an MSE loss, the lr halved after step 4 (so that the
independent and corrected decays differ from the decoupled one), the same data and initial weights every time.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from compat_cases import CASES, MODES, WD, Case, Expect, _import, readme_with_table, render_table
from helpers import flat_parameters, mlp, seeded
from reference import decay_before_step
from torch import nn

from lightning_wd import attach_weight_decay

STEPS = 8
ROOT = Path(__file__).resolve().parents[1]


def model() -> nn.Module:
    """A 4-16-16-2 tanh MLP, the same initial weights every time."""
    return seeded(lambda: mlp(4, 16, 2))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    return x, torch.tanh(x[:, :2] * 2) + 0.1 * torch.randn(32, 2, generator=g)


def lr_at(case: Case, t: int) -> float:
    return case.lr * (0.5 if case.schedule and t >= STEPS // 2 else 1.0)


def set_lr(optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)  # torchao keeps a tensor lr and refuses a float
        else:
            group["lr"] = value


def train(case: Case, make, mode: str | None = None, before_step=None, weight_decay: float = WD) -> torch.Tensor:
    """``make(model, wd, lr)`` trained for STEPS steps; ``mode``: with lightning_wd attached; ``before_step(opt, t)``:
    the reference's own work after backward, before each step."""
    net = model()
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = make(net, weight_decay, case.lr)
        if case.prepare is not None:
            case.prepare(optimizer)
        if case.lr is not None:  # every group, also those with an lr of their own: lr_max is the lr of the start
            set_lr(optimizer, lr_at(case, 0))
        if mode is not None:
            attach_weight_decay(optimizer, mode=mode, weight_decay=WD if case.wd_argument else None)
        for t in range(STEPS):
            if case.lr is not None:
                set_lr(optimizer, lr_at(case, t))

            def closure():
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(net(x), y)
                loss.backward(create_graph=case.create_graph)
                return loss

            if case.closure:
                optimizer.step(closure)
            else:
                closure()
                if before_step is not None:
                    before_step(optimizer, t)
                optimizer.step()
    return flat_parameters(net)


def coefficient(mode: str, case: Case, t: int) -> float:
    """The weight_decay under which a decoupled decay `lr * c` is this mode's decay (lr_max: the first lr)."""
    if mode == "independent":
        return WD / case.lr
    if mode == "corrected":
        return WD * lr_at(case, t) / case.lr
    return WD


def hand_rule(case: Case, mode: str, expect: Expect):
    """The rule written out by hand (reference.py), applied before each step to the optimizer built without decay,
    with the optimizer's real step size; lr_max is the lr of the start."""
    return decay_before_step(mode, WD, lr_max=case.lr, step_size=expect.step_size)


def params_of_cases():
    for case in CASES:
        for mode in MODES:
            yield pytest.param(case, mode, id=f"{case.id}-{mode}")


@pytest.mark.parametrize("case, mode", list(params_of_cases()))
def test_every_optimizer_in_every_mode(case: Case, mode: str):
    try:
        _import(case.package)
    except ImportError:
        pytest.skip(f"{case.package} is not installed (pip install -e '.[test]')")
    expect = case.expect[mode]
    if expect.status == "refused":
        with pytest.raises(ValueError, match=expect.match):
            train(case, case.make, mode)
        return
    ours = train(case, case.make, mode)
    if expect.status == "native":
        reference_make = expect.reference or case.make

        def scaled(optimizer, t):
            for group in optimizer.param_groups:
                if group.get("weight_decay", 0):  # groups configured without decay keep none
                    group["weight_decay"] = coefficient(mode, case, t)

        reference = train(case, reference_make, before_step=scaled if expect.scaled else None)
    else:
        reference = train(case, case.make, before_step=hand_rule(case, mode, expect), weight_decay=0.0)
    assert torch.isfinite(ours).all()
    if expect.exact:
        assert torch.equal(ours, reference), f"max diff {(ours - reference).abs().max().item():.3g}"
    else:  # the same rule, rounded in another order
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)


def test_the_readme_table_is_rendered_from_the_cases():
    for case in CASES:
        try:
            _import(case.package)
        except ImportError:
            pytest.skip(f"{case.package} is not installed: the table names its optimizers' rules")
    page = (ROOT / "docs" / "compatibility.md").read_text()
    assert readme_with_table(page, render_table()) == page, "run `python tests/compat_cases.py` to update it"
