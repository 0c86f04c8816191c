"""The optimizer at rest is what the user configured: schedules that write ``weight_decay`` are followed, nothing is
left behind by an exception, checkpoints hold the configured optimizer, a resume in another mode warns."""

from __future__ import annotations

import signal
import warnings
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    SaveCheckpointAtStep,
    assert_close_weights,
    assert_same_weights,
    assert_weights_differ,
    fit,
    group_settings,
    make_loader,
    make_repeated_loader,
    mlp,
    seeded,
    tiny_module,
    trainer,
)
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from reference import cosine_schedule, decay_before_step, train_by_hand
from torch import nn
from torch.optim import Adam, AdamW

from lightning_wd import EffectiveLRMonitor, WeightDecay, attach_weight_decay

LR, WD0, WD1 = 1e-2, 0.04, 0.4  # DINO's cosine weight-decay schedule, 0.04 -> 0.4
STEPS = 12
NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])


cosine_wd = partial(cosine_schedule, total=STEPS, start=WD0, end=WD1)


class CosineWeightDecay(pl.Callback):
    """A DINO-style schedule, as lightly and many repositories ship it: ``group["weight_decay"]`` before each step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["weight_decay"] = cosine_wd(trainer.global_step)


def run(cls, callbacks=(), **kw):
    module = tiny_module(lambda m: cls(m.parameters(), lr=LR, weight_decay=WD0))
    t = fit(module, callbacks, loader=make_loader(96), max_steps=STEPS, **kw)
    return module, t


# ---------------------------------------------------------------------------------------------------------------------
# weight-decay schedules written into the groups
# ---------------------------------------------------------------------------------------------------------------------
@NATIVE
@pytest.mark.parametrize("mode, cls, ref_cls", [("decoupled", Adam, AdamW), ("coupled", AdamW, Adam)])
def test_a_schedule_written_into_the_groups_is_followed(mode, cls, ref_cls, native):
    ref, _ = run(ref_cls, [CosineWeightDecay()])
    got, t = run(cls, [CosineWeightDecay(), WeightDecay(mode, native=native)])
    assert_same_weights(got, ref)
    # the schedule matters: the constant first value gives another run
    constant, _ = run(ref_cls)
    assert_weights_differ(got, constant, 1e-4)
    # and the optimizer is handed back with the user's last written value and switches
    assert t.optimizers[0].param_groups[0]["weight_decay"] == cosine_wd(STEPS - 1)
    assert t.optimizers[0].param_groups[0]["decoupled_weight_decay"] == (cls is AdamW)


def hand_written_independent_schedule(lr_max: float) -> nn.Module:
    model = seeded(mlp)
    opt = Adam(model.parameters(), lr=LR)
    return train_by_hand(model, opt, list(make_loader(96))[:STEPS], decay_before_step("independent", cosine_wd, lr_max))


@NATIVE
def test_a_schedule_is_followed_in_independent_mode(native):
    got, _ = run(Adam, [CosineWeightDecay(), WeightDecay("independent", lr_max=0.1, native=native)])
    # native: Adam computes 1 - lr * (wd / lr_max), the loop 1 - (lr / lr_max) * wd: the same up to rounding
    assert_close_weights(got.net, hand_written_independent_schedule(0.1), rtol=1e-5, atol=1e-6)
    assert_weights_differ(got.net, hand_written_independent_schedule(1e9), 1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# nothing left behind
# ---------------------------------------------------------------------------------------------------------------------
class Boom(Exception):
    pass


class RaisingModule(pl.LightningModule):
    """Adam (``decoupled_weight_decay=False``); raises ``exc`` at ``where`` on the 3rd step."""

    def __init__(self, where: str, exc: type[BaseException] = Boom) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp()
        self.where, self.exc = where, exc

    def _maybe_raise(self, where: str) -> None:
        if self.where == where and self.trainer.global_step == 2:
            raise self.exc("boom")

    def training_step(self, batch, batch_idx):
        self._maybe_raise("training_step")
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        if self.where == "backward" and self.trainer.global_step == 2:
            loss = loss + RaiseInBackward.apply(loss)
        return loss

    def on_before_optimizer_step(self, optimizer):
        self._maybe_raise("hook")

    def configure_optimizers(self):
        cls = RaisingAdam if self.where == "optimizer" else Adam
        return cls(self.parameters(), lr=LR, weight_decay=WD0)


class RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 0

    @staticmethod
    def backward(ctx, g):
        raise Boom("boom in backward")


class RaisingAdam(Adam):
    """Raises inside ``step()`` on its 3rd call, after the update: the decay was already handed over."""

    calls = 0

    def step(self, closure=None):
        out = super().step(closure)
        RaisingAdam.calls += 1
        if RaisingAdam.calls == 3:
            raise Boom("boom in step")
        return out


@pytest.mark.filterwarnings("ignore:lightning_wd.*subclass")
@pytest.mark.parametrize("mode", ["decoupled", "coupled", "independent"])
@pytest.mark.parametrize("where, exc", [("training_step", Boom), ("backward", Boom), ("hook", Boom),
                                        ("optimizer", Boom), ("training_step", KeyboardInterrupt)],
                         ids=["training_step", "backward", "hook", "optimizer_step", "KeyboardInterrupt"])
def test_an_exception_in_a_step_leaves_the_groups_as_configured(where, exc, mode, tmp_path):
    RaisingAdam.calls = 0
    module = RaisingModule(where, exc)
    saved = tmp_path / "on_exception.ckpt"
    t = trainer([WeightDecay(mode), OnExceptionCheckpoint(tmp_path, filename="on_exception")], max_steps=6,
                enable_checkpointing=True)
    if exc is KeyboardInterrupt:  # Lightning shuts down (calling on_exception), then exits with status 1
        sigint = signal.getsignal(signal.SIGINT)
        try:
            with pytest.raises(SystemExit):
                t.fit(module, make_loader(96))
        finally:
            signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl+C from then on
        assert t.interrupted
    else:
        with pytest.raises(Boom):
            t.fit(module, make_loader(96))
    assert t.global_step == 2  # the third step raised
    (group,) = group_settings(t.optimizers[0])
    assert (group["weight_decay"], group["decoupled_weight_decay"]) == (WD0, False)
    # and the checkpoint OnExceptionCheckpoint wrote holds an Adam, not an AdamW
    (saved_group,) = torch.load(saved, weights_only=False)["optimizer_states"][0]["param_groups"]
    assert (saved_group["weight_decay"], saved_group["decoupled_weight_decay"]) == (WD0, False)


@pytest.mark.filterwarnings("ignore:lightning_wd.*subclass")
@pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
def test_plain_attach_a_step_that_raises_puts_the_users_values_back_before_the_exception_leaves_step(native):
    # manual optimization that catches the exception: a checkpoint or hook before the next step must see the
    # configured optimizer, not the values of the step that raised
    RaisingAdam.calls = 0
    model = seeded(mlp)
    opt = RaisingAdam(model.parameters(), lr=LR, weight_decay=WD0)
    handle = attach_weight_decay(opt, native=native)
    before = group_settings(opt)
    assert before[0]["weight_decay"] == WD0 and before[0]["decoupled_weight_decay"] is False
    for i in range(4):
        model(torch.randn(4, 8)).sum().backward()
        if i == 2:
            with pytest.raises(Boom):
                opt.step()
        else:
            opt.step()
        assert group_settings(opt) == before  # after every step, the one that raised included
        opt.zero_grad()
    handle.detach()
    assert group_settings(opt) == before


def test_detach_after_a_raising_step_leaves_the_configured_optimizer():
    RaisingAdam.calls = 2  # the next call raises
    model = seeded(mlp)
    opt = RaisingAdam(model.parameters(), lr=LR, weight_decay=WD0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = attach_weight_decay(opt)
    before = group_settings(opt)
    model(torch.randn(4, 8)).sum().backward()
    with pytest.raises(Boom):
        opt.step()
    assert group_settings(opt) == before
    handle.detach()
    assert group_settings(opt) == before


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints: the configured optimizer, the mode on record
# ---------------------------------------------------------------------------------------------------------------------
def resume_module(cls=Adam, seed=0):
    return tiny_module(lambda m: cls(m.parameters(), lr=LR, weight_decay=WD0), seed=seed)


def test_a_mid_fit_checkpoint_resumed_without_the_callback_trains_with_the_configured_decay(tmp_path):
    ckpt = str(tmp_path / "step3.ckpt")
    loader = make_repeated_loader(5)
    fit(resume_module(), [WeightDecay(), SaveCheckpointAtStep(ckpt, 3)], loader=loader, max_steps=3)
    # without the callback, the optimizer is Adam(weight_decay=WD0), its own L2: as a fresh Adam(WD0) from the
    # checkpoint's weights and state would train
    resumed = resume_module(seed=1)
    t = trainer(max_steps=6)
    t.fit(resumed, loader, ckpt_path=ckpt)
    assert t.optimizers[0].param_groups[0]["weight_decay"] == WD0
    state = torch.load(ckpt, weights_only=False)
    ref = resume_module(seed=2)
    ref.load_state_dict(state["state_dict"])
    opt = Adam(ref.parameters(), lr=LR, weight_decay=WD0)
    opt.load_state_dict(state["optimizer_states"][0])
    train_by_hand(ref, opt, list(loader)[:3])
    assert_same_weights(resumed, ref)


@pytest.mark.parametrize(
    "saved_mode, saved_lr_max, new_mode, new_lr_max, factor",
    [
        ("decoupled", None, "independent", 0.01, "factor 100"),  # 1 / lr_max: a hundredfold at lr_max 1e-2
        ("independent", 0.01, "decoupled", None, "factor 0.01"),
        ("independent", 0.01, "independent", 0.02, "factor 0.5"),
        ("decoupled", None, "coupled", None, "changes in kind"),
    ],
)
def test_a_resume_in_another_mode_warns_naming_both_and_the_factor(
    saved_mode, saved_lr_max, new_mode, new_lr_max, factor, tmp_path
):
    ckpt = str(tmp_path / "step3.ckpt")
    loader = make_repeated_loader(5)
    fit(resume_module(), [WeightDecay(saved_mode, lr_max=saved_lr_max), SaveCheckpointAtStep(ckpt, 3)],
        loader=loader, max_steps=3)
    t = trainer([WeightDecay(new_mode, lr_max=new_lr_max)], max_steps=5)
    with pytest.warns(UserWarning, match=f"mode='{saved_mode}'.*mode='{new_mode}'.*{factor}"):
        t.fit(resume_module(), loader, ckpt_path=ckpt)
    assert t.optimizers[0].param_groups[0]["lightning_wd_mode"] == new_mode


def test_a_resume_in_the_same_mode_does_not_warn(tmp_path):
    ckpt = str(tmp_path / "step3.ckpt")
    loader = make_repeated_loader(5)
    fit(resume_module(), [WeightDecay("independent"), SaveCheckpointAtStep(ckpt, 3)], loader=loader, max_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([WeightDecay("independent")], max_steps=5).fit(resume_module(), loader, ckpt_path=ckpt)
    assert not [w for w in caught if "goes on with mode" in str(w.message)]


# ---------------------------------------------------------------------------------------------------------------------
# one decay per step; no optimizer at all
# ---------------------------------------------------------------------------------------------------------------------
def test_two_weight_decay_callbacks_are_refused_naming_both():
    module = resume_module()
    both = r"WeightDecay\(mode='decoupled'\).*WeightDecay\(mode='coupled'"
    with pytest.raises(MisconfigurationException, match=both):
        fit(module, [WeightDecay(), WeightDecay("coupled", native=False)], max_steps=2)


def test_attaching_twice_to_one_optimizer_is_refused():
    opt = Adam(seeded(mlp).parameters(), lr=LR, weight_decay=WD0)
    first = attach_weight_decay(opt)
    with pytest.raises(ValueError, match="already has weight decay attached"):
        attach_weight_decay(opt, mode="coupled")
    first.detach()
    attach_weight_decay(opt, mode="coupled").detach()  # after detaching, a new attachment is fine


class NoOptimizer(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 2)

    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return None


@pytest.mark.parametrize("callback", [WeightDecay(), WeightDecay(weight_decay=0.0), EffectiveLRMonitor()],
                         ids=["WeightDecay", "WeightDecay(weight_decay=0)", "EffectiveLRMonitor"])
def test_no_optimizer_no_warning_from_the_callbacks(callback):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(NoOptimizer(), [callback], max_steps=2)
    ours = [str(w.message) for w in caught if "WeightDecay" in str(w.message) or "lightning_wd" in str(w.message)
            or "EffectiveLRMonitor" in str(w.message)]
    assert ours == []


def test_an_explicit_zero_weight_decay_does_not_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(Adam, [WeightDecay(weight_decay=0.0)])
    assert not [w for w in caught if "no decay" in str(w.message) or "is None" in str(w.message)]
