"""bf16 weights: the decay rounds away without a remedy, and stochastic rounding keeps it on track with fp32."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from helpers import trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_wd import WeightDecay, attach_weight_decay
from lightning_wd.low_precision import decay_is_lost, smallest_safe_decay


def decay_only_norms(dtype: torch.dtype, stochastic: bool | None, steps: int = 1000) -> torch.Tensor:
    """Norm of a weight after ``steps`` Adam steps with zero gradients: only the decay moves it."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4096).to(dtype))
    if stochastic is None:  # the fp32 reference: torch's own AdamW
        opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.1)
    else:
        opt = torch.optim.Adam([w], lr=1e-3, weight_decay=0.1)
        attach_weight_decay(opt, stochastic_rounding=stochastic)
    w.grad = torch.zeros_like(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            opt.step()
    return w.detach().float().norm()


def test_bf16_decay_follows_fp32_with_stochastic_rounding_and_not_without():
    # lr * wd = 1e-4 per step, below bf16's 2**-8: the plain product rounds every weight back
    fp32 = decay_only_norms(torch.float32, None)
    torch.manual_seed(0)
    start = torch.randn(4096).to(torch.bfloat16).float().norm()
    assert fp32 / start == pytest.approx((1 - 1e-4) ** 1000, rel=1e-4)  # ~9.5% decay in fp32
    remedied = decay_only_norms(torch.bfloat16, True)
    plain = decay_only_norms(torch.bfloat16, False)
    assert abs(remedied / fp32 - 1) < 0.01
    assert plain == start  # nothing decayed at all
    assert abs(plain / fp32 - 1) > 0.05


def test_lost_decay_threshold_per_dtype():
    assert smallest_safe_decay(torch.bfloat16) == 2**-8
    assert smallest_safe_decay(torch.float16) == 2**-11
    assert decay_is_lost(1e-5, torch.bfloat16) and decay_is_lost(1e-5, torch.float16)
    assert not decay_is_lost(1e-2, torch.bfloat16)
    assert not decay_is_lost(1e-12, torch.float32)


def test_plain_product_really_rounds_back_below_the_threshold():
    """The threshold is a fact about bf16, checked against torch itself, not only our formula."""
    w = torch.randn(10000).to(torch.bfloat16)
    below = smallest_safe_decay(torch.bfloat16) / 2.5
    assert torch.equal(w * (1 - below), w)
    assert (w * (1 - smallest_safe_decay(torch.bfloat16)) != w).all()


class Tiny(L.LightningModule):
    def __init__(self, lr: float, wd: float, schedule: bool = False) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.lr, self.wd, self.schedule = lr, wd, schedule

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.wd)
        if not self.schedule:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.01),
                                                   "interval": "step"}}


def fit(module: L.LightningModule, precision: str, steps: int = 4, **kwargs) -> None:
    t = trainer([WeightDecay(**kwargs)], max_steps=steps, precision=precision)
    t.fit(module, DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=4))


def test_bf16_true_warns_at_fit_start_naming_dtype_and_what_is_lost():
    with pytest.warns(UserWarning, match=r"torch\.bfloat16 weights decay by 1e-05 per step .* no weight decays at all"):
        fit(Tiny(lr=1e-3, wd=0.01), "bf16-true")


def test_warning_when_an_lr_change_makes_the_decay_vanish():
    # lr * wd = 0.1 at the start (safe in bf16), 0.001 after the scheduler's first drop (lost)
    with pytest.warns(UserWarning, match="weights decay by") as record:
        fit(Tiny(lr=1.0, wd=0.1, schedule=True), "bf16-true", steps=4)
    assert sum("weights decay by" in str(w.message) for w in record) == 1


@pytest.mark.parametrize("precision, kwargs", [("32-true", {}), ("bf16-true", {"stochastic_rounding": True})])
def test_no_warning_where_the_decay_is_kept(precision, kwargs):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(Tiny(lr=1e-3, wd=0.01), precision, **kwargs)
    assert not [w for w in record if "weights decay by" in str(w.message)]
