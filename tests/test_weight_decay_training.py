"""End-to-end training tests of the ``WeightDecay`` callback against independent references.

Every test trains with the callback and compares the final weights with a run that does not use it: a Trainer run
with ``torch.optim.AdamW`` / ``Adam(weight_decay=...)`` / ``SGD(weight_decay=...)``, or a hand-written torch loop.
Where the math is the same operation for operation (fp32 or the same AMP precision, CPU, seeded weights, unshuffled
data), the weights must be equal bit for bit (``torch.equal``); the few tolerances say why in a comment.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import torch
from helpers import (
    D_IN,
    D_OUT,
    BackboneModule,
    GradNormProbe,
    PartlyUsedModule,
    SaveCheckpointAtStep,
    SnapshotWeights,
    TinyGAN,
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
    weights,
)
from lightning.pytorch.callbacks import BackboneFinetuning, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from reference import decay_before_step, train_by_hand
from torch import nn
from torch.optim import SGD, Adam, AdamW
from torch.optim.lr_scheduler import LambdaLR, StepLR

from lightning_wd import WeightDecay

LR = 1e-2
WD = 0.2  # lr * wd = 2e-3 per step: large enough that the decay moves the weights visibly within ~10 steps

NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
# (mode, optimizer given to the callback, reference optimizer that does the same decay itself)
MODE_PAIRS = pytest.mark.parametrize(
    "mode, cls, ref_cls", [("decoupled", Adam, AdamW), ("coupled", AdamW, Adam)], ids=["decoupled", "coupled"]
)


def opt_factory(cls, lr=LR, weight_decay=WD, scheduler=None, interval="step", groups=None, **kwargs):
    """``configure_optimizers`` body: ``cls(params, lr, weight_decay, **kwargs)`` and an optional scheduler.

    ``groups(module)`` returns param-group dicts instead of ``module.parameters()``.
    """

    def make(module):
        params = groups(module) if groups is not None else module.parameters()
        opt = cls(params, lr=lr, weight_decay=weight_decay, **kwargs)
        if scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt), "interval": interval}}

    return make


def run(optimizer_fn, callbacks=(), net_factory=mlp, loader=None, seed=0, module_kwargs=None, **trainer_kwargs):
    module = tiny_module(optimizer_fn, net_factory, seed=seed, **(module_kwargs or {}))
    t = fit(module, callbacks, loader=loader, **trainer_kwargs)
    return module, t


def warmup_then_decay(step: int) -> float:
    return min(1.0, (step + 1) / 4) * 0.9 ** max(0, step - 4)


SCHEDULES = {
    "warmup-per-step": (lambda opt: LambdaLR(opt, warmup_then_decay), "step"),
    "steplr-per-epoch": (lambda opt: StepLR(opt, step_size=1, gamma=0.5), "epoch"),
}


# ---------------------------------------------------------------------------------------------------------------------
# sanity: the settings used below make the decay visible, so a missing or doubled decay cannot go unnoticed
# ---------------------------------------------------------------------------------------------------------------------
def test_settings_make_decay_visible():
    plain, _ = run(opt_factory(Adam, weight_decay=0.0))
    adamw, _ = run(opt_factory(AdamW))
    adam_l2, _ = run(opt_factory(Adam))
    # a decay of 2e-3 per step over 10 steps changes O(1) weights by ~1e-3; unrelated rounding is ~1e-7
    assert_weights_differ(adamw, plain, 1e-4)
    assert_weights_differ(adam_l2, plain, 1e-4)
    assert_weights_differ(adamw, adam_l2, 1e-4)
    # and the callback does something: Adam(weight_decay) + decoupled is not Adam(weight_decay)
    got, _ = run(opt_factory(Adam), [WeightDecay()])
    assert_weights_differ(got, adam_l2, 1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# 1. LR schedulers
# ---------------------------------------------------------------------------------------------------------------------
@NATIVE
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_scheduler_decoupled_equals_adamw(schedule, native):
    sched, interval = SCHEDULES[schedule]
    loader = make_loader(32)  # 4 batches per epoch: 12 steps span 3 epochs
    ref, ref_t = run(opt_factory(AdamW, scheduler=sched, interval=interval), loader=loader, max_steps=12)
    got, t = run(
        opt_factory(Adam, scheduler=sched, interval=interval), [WeightDecay(native=native)], loader=loader, max_steps=12
    )
    assert_same_weights(got, ref)
    # the schedule really moved the lr, and both runs followed it
    final_lr = ref_t.optimizers[0].param_groups[0]["lr"]
    assert final_lr < LR / 2
    assert t.optimizers[0].param_groups[0]["lr"] == final_lr


COUPLED_PAIRS = {
    # (optimizer given to the callback, reference optimizer that applies the L2 term itself, extra kwargs)
    "AdamW+coupled=Adam": (AdamW, Adam, {}),
    "Adam+coupled=Adam": (Adam, Adam, {}),
    "SGD-momentum+coupled=SGD": (SGD, SGD, {"momentum": 0.9}),
}


@NATIVE
@pytest.mark.parametrize("pair", list(COUPLED_PAIRS))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_scheduler_coupled_equals_l2(schedule, pair, native):
    sched, interval = SCHEDULES[schedule]
    cls, ref_cls, kw = COUPLED_PAIRS[pair]
    loader = make_loader(32)
    ref, _ = run(opt_factory(ref_cls, scheduler=sched, interval=interval, **kw), loader=loader, max_steps=12)
    got, _ = run(
        opt_factory(cls, scheduler=sched, interval=interval, **kw),
        [WeightDecay("coupled", native=native)],
        loader=loader,
        max_steps=12,
    )
    assert_same_weights(got, ref)


# ---------------------------------------------------------------------------------------------------------------------
# 2. several param groups with their own lr and weight_decay
# ---------------------------------------------------------------------------------------------------------------------
def three_groups(module):
    net = module.net
    return [
        {"params": net[0].parameters(), "lr": 1e-2, "weight_decay": 0.3},
        {"params": net[2].parameters(), "lr": 3e-3, "weight_decay": 0.0},
        {"params": net[4].parameters(), "lr": 5e-3, "weight_decay": 0.5},
    ]


@NATIVE
@MODE_PAIRS
def test_param_groups_with_own_lr_and_decay(mode, cls, ref_cls, native):
    # constructor weight_decay=0.7 is a default every group overrides: it must not leak anywhere
    ref, _ = run(opt_factory(ref_cls, weight_decay=0.7, groups=three_groups))
    got, t = run(opt_factory(cls, weight_decay=0.7, groups=three_groups), [WeightDecay(mode, native=native)])
    assert_same_weights(got, ref)
    # after fit the optimizer is the user's again: each group's own weight_decay is back
    assert [g["weight_decay"] for g in t.optimizers[0].param_groups] == [0.3, 0.0, 0.5]


# ---------------------------------------------------------------------------------------------------------------------
# 3. several optimizers, manual optimization
# ---------------------------------------------------------------------------------------------------------------------
def gan_optimizers(cls, wd_g=0.3, wd_d=0.1):
    return lambda m: [
        cls(m.gen.parameters(), lr=2e-3, weight_decay=wd_g),
        cls(m.disc.parameters(), lr=1e-2, weight_decay=wd_d),
    ]


@NATIVE
@MODE_PAIRS
def test_manual_optimization_two_optimizers(mode, cls, ref_cls, native):
    # manual optimization counts every opt.step() as a global step: 16 steps = 8 batches, each stepping both
    ref = TinyGAN(gan_optimizers(ref_cls))
    fit(ref, loader=make_loader(64), max_steps=16)
    got = TinyGAN(gan_optimizers(cls))
    t = fit(got, [WeightDecay(mode, native=native)], loader=make_loader(64), max_steps=16)
    assert t.global_step == 16
    assert_same_weights(got, ref)
    # both optimizers really stepped their own sub-network
    init = TinyGAN(gan_optimizers(cls))
    for part in ("gen", "disc"):
        assert_weights_differ(getattr(got, part), getattr(init, part), 1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# 4. gradient accumulation: the decay happens once per real optimizer step
# ---------------------------------------------------------------------------------------------------------------------
@NATIVE
@MODE_PAIRS
def test_gradient_accumulation_decays_once_per_step(mode, cls, ref_cls, native):
    loader = make_loader(72)  # 9 batches per epoch = 3 optimizer steps; 6 steps = 18 batches
    ref, _ = run(opt_factory(ref_cls), loader=loader, max_steps=6, accumulate_grad_batches=3)
    got, t = run(
        opt_factory(cls), [WeightDecay(mode, native=native)], loader=loader, max_steps=6, accumulate_grad_batches=3
    )
    assert t.global_step == 6 and t.current_epoch == 2
    assert_same_weights(got, ref)


# ---------------------------------------------------------------------------------------------------------------------
# 5. gradient clipping: the coupled L2 term is added after clipping, as Adam/SGD(weight_decay) add theirs in step()
# ---------------------------------------------------------------------------------------------------------------------
CLIP = 0.05


@NATIVE
@pytest.mark.parametrize("pair", list(COUPLED_PAIRS))
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_coupled_adds_l2_after_clipping(algorithm, pair, native):
    cls, ref_cls, kw = COUPLED_PAIRS[pair]
    clip_val = CLIP if algorithm == "norm" else CLIP / 10
    clip = dict(gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm)
    probe = GradNormProbe()
    ref, _ = run(opt_factory(ref_cls, weight_decay=0.5, **kw), [probe], **clip)
    got, _ = run(opt_factory(cls, weight_decay=0.5, **kw), [WeightDecay("coupled", native=native)], **clip)
    # clipping really happened at every step: the gradient before clipping is far above the clip value
    seen = probe.norms if algorithm == "norm" else probe.max_abs
    assert len(seen) == 10 and min(seen) > 10 * clip_val
    assert_same_weights(got, ref)
    # the order matters: the same L2 term put into the loss (so it is clipped too) gives another run
    l2_before_clip, _ = run(opt_factory(ref_cls, weight_decay=0.0, **kw), module_kwargs={"l2_in_loss": 0.5}, **clip)
    assert_weights_differ(got, l2_before_clip, 1e-4)


@NATIVE
def test_gradient_clipping_decoupled_equals_adamw(native):
    probe = GradNormProbe()
    ref, _ = run(opt_factory(AdamW, weight_decay=0.5), [probe], gradient_clip_val=CLIP)
    got, _ = run(opt_factory(Adam, weight_decay=0.5), [WeightDecay(native=native)], gradient_clip_val=CLIP)
    assert min(probe.norms) > 10 * CLIP
    assert_same_weights(got, ref)


# ---------------------------------------------------------------------------------------------------------------------
# 6. mixed precision
# ---------------------------------------------------------------------------------------------------------------------
@NATIVE
@MODE_PAIRS
def test_bf16_mixed_equals_reference(mode, cls, ref_cls, native):
    # bf16-mixed keeps fp32 weights and optimizer states (autocast only changes the forward), so the decay of
    # lr * wd = 2e-3 is not lost to bf16 rounding and both runs do the same fp32 update
    ref, _ = run(opt_factory(ref_cls), precision="bf16-mixed")
    got, _ = run(opt_factory(cls), [WeightDecay(mode, native=native)], precision="bf16-mixed")
    assert_same_weights(got, ref)
    plain_fp32, _ = run(opt_factory(ref_cls))
    assert_weights_differ(got, plain_fp32, 0.0)  # autocast really changed the numerics


INF_BATCH = 3

FP16_DEVICES = [
    # Lightning turns Trainer(accelerator="cpu", precision="16-mixed") into bf16-mixed with a warning, but takes an
    # explicit MixedPrecision("16-mixed", "cpu") plugin (torch's CPU autocast does fp16 and has a CPU GradScaler).
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


def fp16_trainer_kwargs(device, max_steps=8):
    """Trainer arguments for one 16-mixed run (a fresh plugin, hence a fresh GradScaler, every call)."""
    if device == "cpu":
        return {"accelerator": "cpu", "plugins": [MixedPrecision("16-mixed", "cpu")], "max_steps": max_steps}
    return {"accelerator": "cuda", "precision": "16-mixed", "max_steps": max_steps}


@NATIVE
@MODE_PAIRS
@pytest.mark.parametrize("device", FP16_DEVICES)
def test_fp16_mixed_skipped_step_is_not_decayed(device, mode, cls, ref_cls, native):
    inf_loss = {"loss_scale_at": {INF_BATCH: math.inf}}  # the gradients of that step are not finite
    ref_snap, got_snap = SnapshotWeights(), SnapshotWeights()
    ref, ref_t = run(opt_factory(ref_cls), [ref_snap], module_kwargs=inf_loss, **fp16_trainer_kwargs(device))
    callback = WeightDecay(mode, native=native)
    got, t = run(opt_factory(cls), [callback, got_snap], module_kwargs=inf_loss, **fp16_trainer_kwargs(device))
    # the scaler did skip exactly one step (it halves its scale once, from the default 2**16)
    assert isinstance(t.precision_plugin, MixedPrecision) and t.precision_plugin.scaler is not None
    assert t.precision_plugin.scaler.get_scale() == ref_t.precision_plugin.scaler.get_scale() == 2.0**15
    for snap in (ref_snap, got_snap):
        assert_same_weights(snap.after[INF_BATCH], snap.before[INF_BATCH])  # skipped: neither update nor decay
        assert_weights_differ(snap.after[INF_BATCH - 1], snap.before[INF_BATCH - 1], 0.0)  # a normal step moves
    assert_same_weights(got, ref)


@NATIVE
@MODE_PAIRS
@pytest.mark.parametrize("device", FP16_DEVICES)
def test_fp16_mixed_fused_optimizer_skipped_step_is_not_decayed(device, mode, cls, ref_cls, native):
    # fused=True optimizers are stepped even on a non-finite step (the scaler hands them `found_inf` and skips inside
    # the kernel) and get still-scaled gradients: the decay must honour found_inf / grad_scale itself
    inf_loss = {"loss_scale_at": {INF_BATCH: math.inf}}
    ref_snap, got_snap = SnapshotWeights(), SnapshotWeights()
    ref_opt, opt = opt_factory(ref_cls, fused=True), opt_factory(cls, fused=True)
    ref, ref_t = run(ref_opt, [ref_snap], module_kwargs=inf_loss, **fp16_trainer_kwargs(device))
    callbacks = [WeightDecay(mode, native=native), got_snap]
    got, t = run(opt, callbacks, module_kwargs=inf_loss, **fp16_trainer_kwargs(device))
    assert t.precision_plugin.scaler.get_scale() == ref_t.precision_plugin.scaler.get_scale() == 2.0**15
    for snap in (ref_snap, got_snap):
        assert_same_weights(snap.after[INF_BATCH], snap.before[INF_BATCH])
        assert_weights_differ(snap.after[INF_BATCH - 1], snap.before[INF_BATCH - 1], 0.0)
    if device == "cuda" and not native and mode != "coupled":
        # CUDA's fused kernel decays by `p -= lr*wd*p` inside its update; the separate pass multiplies by `1 - lr*wd`
        # before it: the same decay, rounded in another order (the CPU's fused kernel rounds as the pass does)
        assert_close_weights(got, ref, rtol=1e-6, atol=1e-7)
    else:
        # the generic coupled pass unscales the still-scaled gradient, adds wd * p and scales it back (exact for the
        # scaler's power-of-two scales), so the fused kernel sees what its own L2 term makes: bit for bit
        assert_same_weights(got, ref)


# ---------------------------------------------------------------------------------------------------------------------
# 7. checkpoints and resume
# ---------------------------------------------------------------------------------------------------------------------
RESUME_CASES = {
    # (mode, optimizer given to the callback, native)
    "decoupled-native": ("decoupled", Adam, True),
    "decoupled-generic": ("decoupled", Adam, False),
    "coupled": ("coupled", AdamW, True),
    "independent": ("independent", Adam, True),
}


def resume_opt(cls):
    return opt_factory(cls, scheduler=lambda opt: StepLR(opt, step_size=3, gamma=0.5), interval="step")


def taken_over_groups(ckpt_path):
    return group_settings(torch.load(ckpt_path, weights_only=False)["optimizer_states"][0]["param_groups"])


@pytest.mark.parametrize("saved", ["during-fit", "after-fit"])
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_continues_bit_for_bit(case, saved, tmp_path):
    mode, cls, native = RESUME_CASES[case]
    loader = make_repeated_loader(5)  # see its docstring: Lightning's resume re-fetches a batch; identical batches
    ckpt = str(tmp_path / "step5.ckpt")

    # uninterrupted 10 steps ("during-fit": this run also writes the checkpoint, right after step 5)
    during = [SaveCheckpointAtStep(ckpt, 5)] if saved == "during-fit" else []
    full, _ = run(resume_opt(cls), [WeightDecay(mode, native=native), *during], loader=loader, max_steps=10)
    if saved == "after-fit":  # 5 steps, then trainer.save_checkpoint
        _, t5 = run(resume_opt(cls), [WeightDecay(mode, native=native)], loader=loader, max_steps=5)
        t5.save_checkpoint(ckpt)
    else:
        # a checkpoint written during training holds the optimizer as configured, and the mode it trains in
        (group,) = taken_over_groups(ckpt)
        assert group["weight_decay"] == WD
        assert group["decoupled_weight_decay"] == (cls is AdamW)
        assert group["lightning_wd_mode"] == mode

    # a NEW module (other initial weights: they must come from the checkpoint), NEW Trainer, NEW callback
    resumed = tiny_module(resume_opt(cls), seed=123)
    t = trainer([WeightDecay(mode, native=native)], max_steps=10)
    t.fit(resumed, loader, ckpt_path=ckpt)
    assert t.global_step == 10
    assert t.optimizers[0].param_groups[0]["lr"] == LR * 0.5**3  # scheduler state restored (10 // 3 = 3 decays)
    assert_same_weights(resumed, full)
    if mode == "decoupled":  # and the uninterrupted run itself is AdamW's
        ref, _ = run(resume_opt(AdamW), loader=loader, max_steps=10)
        assert_same_weights(full, ref)


def test_after_fit_the_optimizer_is_handed_back_as_configured(tmp_path):
    """At fit end the callback detaches: the optimizer (and a checkpoint saved after fit) is the user's, as it is
    between steps during fit."""
    _, t = run(resume_opt(Adam), [WeightDecay()], loader=make_repeated_loader(5), max_steps=5)
    t.save_checkpoint(tmp_path / "after_fit.ckpt")
    (group,) = taken_over_groups(tmp_path / "after_fit.ckpt")
    assert group["weight_decay"] == WD and group["decoupled_weight_decay"] is False
    assert not t.optimizers[0]._optimizer_step_pre_hooks


# ---------------------------------------------------------------------------------------------------------------------
# 8. BackboneFinetuning adds a param group during training
# ---------------------------------------------------------------------------------------------------------------------
def trainable(cls, weight_decay=WD):
    return lambda m: cls([p for p in m.parameters() if p.requires_grad], lr=LR, weight_decay=weight_decay)


def finetuning():
    return BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.5)


@NATIVE
def test_backbone_finetuning_new_group_is_taken_over(native):
    loader = make_loader(32)  # 4 batches per epoch, 3 epochs; the backbone trains in epochs 1 and 2
    ref = BackboneModule(trainable(AdamW))
    ref_t = fit(ref, [finetuning()], loader=loader, max_steps=-1, max_epochs=3)
    got = BackboneModule(trainable(Adam))
    t = fit(got, [finetuning(), WeightDecay(native=native)], loader=loader, max_steps=-1, max_epochs=3)
    init = BackboneModule(trainable(Adam))
    # the backbone group really was added (with the constructor's weight_decay) and trained
    for opt in (ref_t.optimizers[0], t.optimizers[0]):
        assert len(opt.param_groups) == 2 and opt.param_groups[1]["weight_decay"] == WD
    assert_weights_differ(got.backbone, init.backbone, 1e-4)
    # without the take-over, Adam would add an L2 term of 0.2 to the backbone and the runs would differ
    assert_same_weights(got, ref)


# ---------------------------------------------------------------------------------------------------------------------
# 9. logging beside LearningRateMonitor(log_weight_decay=True)
# ---------------------------------------------------------------------------------------------------------------------
def read_metrics(t):
    with open(Path(t.logger.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def column(rows, name):
    return [float(r[name]) for r in rows if r.get(name) not in (None, "")]


def test_logs_decay_beside_lr_monitor(tmp_path):
    _, t = run(
        opt_factory(Adam),
        [LearningRateMonitor(log_weight_decay=True), WeightDecay()],
        max_steps=6,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    rows = read_metrics(t)
    # LearningRateMonitor reads the optimizer's own weight_decay, which the groups hold between steps; without a
    # schedule that is the decay applied, so WeightDecay does not log it a second time, only its timescale
    monitors = column(rows, "lr-Adam-weight_decay")
    assert monitors and all(v == WD for v in monitors)
    assert not column(rows, "weight_decay/Adam/pg1")
    ours = column(rows, "timescale/Adam/pg1")
    assert len(ours) == 6 and all(v == pytest.approx(1 / (LR * WD)) for v in ours)


def test_logs_the_scheduled_decay_beside_lr_monitor(tmp_path):
    # under a schedule the decay applied is not the group's weight_decay that LearningRateMonitor shows: logged
    _, t = run(opt_factory(Adam), [LearningRateMonitor(log_weight_decay=True),
                                   WeightDecay(schedule="linear", weight_decay_end=2 * WD)],
               max_steps=4, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    rows = read_metrics(t)
    assert column(rows, "weight_decay/Adam/pg1") == pytest.approx([WD * (1 + t / 4) for t in range(4)])
    assert set(column(rows, "lr-Adam-weight_decay")) == {WD}


def test_log_weight_decay_false_wins_over_monitor(tmp_path):
    _, t = run(
        opt_factory(Adam),
        [LearningRateMonitor(log_weight_decay=True), WeightDecay(log_weight_decay=False)],
        max_steps=3,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    rows = read_metrics(t)
    assert column(rows, "lr-Adam")  # the monitor logged
    assert not any(k.startswith("weight_decay/") for k in rows[0])


def test_logging_with_backbone_finetuning(tmp_path):
    t = fit(
        BackboneModule(trainable(Adam)),
        [finetuning(), WeightDecay(), LearningRateMonitor(log_weight_decay=True)],
        loader=make_loader(32),
        max_steps=-1,
        max_epochs=2,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    rows = read_metrics(t)
    # the backbone group, logged during epoch 1: its timescale 1 / (lr * wd), at the lr BackboneFinetuning gave it
    backbone = column(rows, "timescale/Adam/pg2")
    assert len(backbone) == 4 and all(v > 0 for v in backbone)
    assert backbone == pytest.approx([1 / (t.optimizers[0].param_groups[1]["lr"] * WD)] * 4)


def test_logging_after_resume_from_checkpoint_saved_after_fit(tmp_path):
    loader = make_repeated_loader(5)
    _, t5 = run(opt_factory(Adam), [WeightDecay()], loader=loader, max_steps=5)
    t5.save_checkpoint(tmp_path / "after_fit.ckpt")
    t = trainer([WeightDecay(), LearningRateMonitor(log_weight_decay=True)], max_steps=8,
                logger=CSVLogger(tmp_path / "logs"), log_every_n_steps=1)
    t.fit(tiny_module(opt_factory(Adam)), loader, ckpt_path=tmp_path / "after_fit.ckpt")
    assert column(read_metrics(t), "timescale/Adam/pg1") == pytest.approx([1 / (LR * WD)] * 3)


# ---------------------------------------------------------------------------------------------------------------------
# 10. bad input
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_mode_raises():
    with pytest.raises(ValueError) as err:
        WeightDecay(mode="bogus")
    message = str(err.value)
    assert "bogus" in message
    assert all(m in message for m in ("decoupled", "coupled", "independent"))


def test_negative_weight_decay_raises():
    with pytest.raises(ValueError, match="weight_decay"):
        WeightDecay(weight_decay=-1)


def test_lbfgs_raises_at_fit_start():
    module = tiny_module(lambda m: torch.optim.LBFGS(m.parameters(), lr=0.1))
    before = weights(module)
    with pytest.raises(MisconfigurationException, match="closure"):
        fit(module, [WeightDecay(weight_decay=0.1)], max_steps=2)
    assert_same_weights(module, before)  # raised before any step


def test_no_decay_anywhere_warns():
    with pytest.warns(UserWarning, match="no decay"):
        run(opt_factory(Adam, weight_decay=0.0), [WeightDecay()], max_steps=2)
    # and only then: with a decay configured, no such warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(opt_factory(Adam), [WeightDecay()], max_steps=2)
    assert not [w for w in caught if "no decay" in str(w.message)]


# ---------------------------------------------------------------------------------------------------------------------
# 11. the weight_decay override argument
# ---------------------------------------------------------------------------------------------------------------------
@NATIVE
@pytest.mark.parametrize("own_decay", [0.0, 0.5])
def test_weight_decay_argument_overrides_optimizer(own_decay, native):
    ref, _ = run(opt_factory(AdamW, weight_decay=0.1))
    got, _ = run(opt_factory(Adam, weight_decay=own_decay), [WeightDecay(weight_decay=0.1, native=native)])
    assert_same_weights(got, ref)


# ---------------------------------------------------------------------------------------------------------------------
# 12. parameters without a gradient in a step are not decayed
# ---------------------------------------------------------------------------------------------------------------------
@NATIVE
@MODE_PAIRS
def test_parameters_without_grad_are_not_decayed(mode, cls, ref_cls, native):
    init = PartlyUsedModule(opt_factory(cls))
    ref = PartlyUsedModule(opt_factory(ref_cls))
    fit(ref)
    got = PartlyUsedModule(opt_factory(cls))
    fit(got, [WeightDecay(mode, native=native)])
    # `never` never has a gradient: untouched; `sometimes` has none on odd batches: AdamW skips it there, and so must
    # the callback (a decay on those steps would make the runs differ)
    assert_same_weights(got.never, init.never)
    assert_weights_differ(got.sometimes, init.sometimes, 1e-4)
    assert_same_weights(got, ref)


# ---------------------------------------------------------------------------------------------------------------------
# 13. exclusions
# ---------------------------------------------------------------------------------------------------------------------
def norm_net():
    return nn.Sequential(
        nn.Linear(D_IN, 16), nn.LayerNorm(16), nn.Tanh(),
        nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Tanh(),
        nn.Linear(16, D_OUT),
    )


# names written out by hand (not computed by the library under test)
NO_DECAY = {
    "bias-glob": ["net.0.bias", "net.1.bias", "net.3.bias", "net.4.bias", "net.6.bias"],
    "bias-and-norm": [
        "net.0.bias", "net.1.bias", "net.3.bias", "net.4.bias", "net.6.bias", "net.1.weight", "net.4.weight"
    ],
}
EXCLUDE_ARGS = {"bias-glob": {"exclude": ["*.bias"]}, "bias-and-norm": {"exclude_bias_and_norm": True}}


def split_groups(no_decay_names):
    def groups(module):
        named = dict(module.named_parameters())
        assert set(no_decay_names) <= set(named)
        return [
            {"params": [p for n, p in named.items() if n not in no_decay_names], "weight_decay": WD},
            {"params": [named[n] for n in no_decay_names], "weight_decay": 0.0},
        ]

    return groups


@NATIVE
@MODE_PAIRS
@pytest.mark.parametrize("exclusion", list(EXCLUDE_ARGS))
def test_exclusions_equal_reference_param_groups(exclusion, mode, cls, ref_cls, native):
    ref, _ = run(opt_factory(ref_cls, groups=split_groups(NO_DECAY[exclusion])), net_factory=norm_net)
    callback = WeightDecay(mode, native=native, **EXCLUDE_ARGS[exclusion])
    got, _ = run(opt_factory(cls), [callback], net_factory=norm_net)
    assert_same_weights(got, ref)
    # the exclusion matters: decaying everything gives another run
    everything, _ = run(opt_factory(ref_cls), net_factory=norm_net)
    assert_weights_differ(got, everything, 1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 14. mode="independent"
# ---------------------------------------------------------------------------------------------------------------------
def hand_written_independent(wd, lr_max, steps=12):
    """Adam (no decay of its own); before each step ``p *= 1 - (lr_t / lr_max) * wd`` for every p with a grad."""
    model = seeded(mlp)
    opt = Adam(model.parameters(), lr=LR)
    batches = (list(make_loader(32)) * 3)[:steps]
    rule = decay_before_step("independent", wd, lr_max)
    return train_by_hand(model, opt, batches, rule, LambdaLR(opt, warmup_then_decay))


def independent_opt():
    return opt_factory(Adam, scheduler=lambda o: LambdaLR(o, warmup_then_decay), interval="step")


# Tolerance: the native path lets Adam compute 1 - lr_t * (wd / lr_max), the hand loop computes
# 1 - (lr_t / lr_max) * wd; the two doubles can differ in the last bit, which occasionally rounds the fp32 factor
# to the neighbouring float. A one-ulp difference (~6e-8 relative) then propagates through 12 Adam steps; 1e-5
# relative / 1e-6 absolute is ~100 ulps, far below the decay's own effect (~1e-3, checked below).
RTOL, ATOL = 1e-5, 1e-6


@NATIVE
@pytest.mark.parametrize("lr_max", [None, 0.05], ids=["lr_max=initial_lr", "lr_max=0.05"])
def test_independent_equals_hand_written_loop(lr_max, native):
    wd = 1e-3 if lr_max is None else 4e-3  # (lr_t / lr_max) * wd is then of the order of 1e-3 per step
    callback = WeightDecay("independent", weight_decay=wd, lr_max=lr_max, native=native)
    got, _ = run(independent_opt(), [callback], loader=make_loader(32), max_steps=12)
    ref = hand_written_independent(wd, LR if lr_max is None else lr_max)
    assert_close_weights(got.net, ref, rtol=RTOL, atol=ATOL)
    # the decay is large against the tolerance: a hand loop without it ends far away
    assert_weights_differ(got.net, hand_written_independent(0.0, 1.0), 100 * ATOL)


@NATIVE
def test_independent_with_scaled_decay_equals_adamw(native):
    # documented: lambda_independent = lr_max * lambda_pytorch gives the same run as decoupled (up to the rounding
    # of (lr_t / lr_max) * (lr_max * wd) against lr_t * wd, see RTOL above)
    adamw = opt_factory(AdamW, scheduler=lambda o: LambdaLR(o, warmup_then_decay))
    ref, _ = run(adamw, loader=make_loader(32), max_steps=12)
    callback = WeightDecay("independent", weight_decay=LR * WD, native=native)
    got, _ = run(independent_opt(), [callback], loader=make_loader(32), max_steps=12)
    assert_close_weights(got, ref, rtol=RTOL, atol=ATOL)
