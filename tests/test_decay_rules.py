"""The newer decay rules against hand-written reference loops: weight-decay schedules, corrected decay (AdamC),
cautious decay and the timescale that sets the decay.

Each reference loop is plain torch, written from the formula in the paper (not from the library): where the
arithmetic is the same operation for operation the weights must be equal bit for bit, elsewhere within 1e-6.
"""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import (
    SaveCheckpointAtStep,
    assert_close_weights,
    assert_same_weights,
    assert_weights_differ,
    fit,
    make_loader,
    make_repeated_loader,
    mlp,
    seeded,
    tiny_module,
    trainer,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from reference import cosine_schedule, decay_before_step, in_turn, linear_schedule, train_by_hand
from torch import nn
from torch.optim import SGD, Adam, AdamW
from torch.optim.lr_scheduler import CosineAnnealingLR

import lightning_wd.decay as decay_module
from lightning_wd import WeightDecay, attach_weight_decay

LR, WD0, WD_END, STEPS = 1e-2, 0.04, 0.4, 12
NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])


cosine = partial(cosine_schedule, total=STEPS, start=WD0, end=WD_END)
linear = partial(linear_schedule, total=STEPS, start=WD0, end=WD_END)


def batches(n: int = STEPS):
    return list(make_loader(96))[:n]


def cosine_lr(opt):
    return {"optimizer": opt, "lr_scheduler": {"scheduler": CosineAnnealingLR(opt, T_max=STEPS), "interval": "step"}}


def lightning_run(cls, callback, weight_decay=WD0, scheduler=False, net=mlp, **kw):
    def configure(m):
        opt = cls(m.parameters(), lr=LR, weight_decay=weight_decay)
        return cosine_lr(opt) if scheduler else opt

    module = tiny_module(configure, net)
    t = fit(module, [callback] if callback else [], loader=make_loader(96), max_steps=STEPS, **kw)
    return module, t


# ---------------------------------------------------------------------------------------------------------------------
# 1. weight-decay schedules
# ---------------------------------------------------------------------------------------------------------------------
def own_weight_decay(wd_of_step, group=0):
    """A ``before_step`` that gives param group ``group`` the weight_decay ``wd_of_step(t)`` for step t."""

    def before_step(opt, t):
        opt.param_groups[group]["weight_decay"] = wd_of_step(t)

    return before_step


def reference_with_wd_schedule(cls, wd_of_step, by_hand=None, scheduler=False):
    """``cls`` (AdamW, Adam with L2) given ``wd_of_step(t)`` as its own weight_decay before step t; or, with
    ``by_hand`` (a rule of reference.py, with its lr_max), ``cls`` without decay and that rule applied by hand."""
    model = seeded(mlp)
    opt = cls(model.parameters(), lr=LR, weight_decay=0.0)
    sched = CosineAnnealingLR(opt, T_max=STEPS) if scheduler else None
    rule = own_weight_decay(wd_of_step) if by_hand is None else decay_before_step(by_hand[0], wd_of_step, by_hand[1])
    return train_by_hand(model, opt, batches(), rule, sched)


@NATIVE
@pytest.mark.parametrize("kind, formula", [("cosine", cosine), ("linear", linear)])
@pytest.mark.parametrize("mode, cls, ref_cls", [("decoupled", Adam, AdamW), ("coupled", AdamW, Adam)])
def test_schedule_equals_the_optimizer_given_the_same_schedule(mode, cls, ref_cls, kind, formula, native, tmp_path):
    callback = WeightDecay(mode, schedule=kind, weight_decay_end=WD_END, native=native, log_weight_decay=True)
    got, t = lightning_run(cls, callback, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    ref = reference_with_wd_schedule(ref_cls, formula)
    assert_same_weights(got.net, ref)
    assert_weights_differ(got.net, reference_with_wd_schedule(ref_cls, lambda t: WD0), 1e-4)  # it matters
    # the decay each step applied is what the log shows, and the group holds the configured value at rest
    with open(Path(t.logger.log_dir) / "metrics.csv", newline="") as f:
        logged = [float(r["weight_decay/" + cls.__name__ + "/pg1"]) for r in csv.DictReader(f)
                  if r.get("weight_decay/" + cls.__name__ + "/pg1")]
    assert logged == [formula(s) for s in range(STEPS)]
    assert t.optimizers[0].param_groups[0]["weight_decay"] == WD0


@NATIVE
def test_schedule_in_independent_mode_equals_the_hand_loop(native):
    callback = WeightDecay("independent", schedule="cosine", weight_decay_end=WD_END, lr_max=0.1, native=native)
    got, _ = lightning_run(Adam, callback, scheduler=True)
    ref = reference_with_wd_schedule(Adam, cosine, by_hand=("independent", 0.1), scheduler=True)
    assert_close_weights(got.net, ref, rtol=1e-6, atol=1e-7)


def test_a_group_configured_without_decay_keeps_none_under_a_schedule():
    def groups(m):
        return [{"params": m.net[0].parameters(), "weight_decay": WD0},
                {"params": [*m.net[2].parameters(), *m.net[4].parameters()], "weight_decay": 0.0}]

    module = tiny_module(lambda m: Adam(groups(m), lr=LR))
    fit(module, [WeightDecay(schedule="linear", weight_decay_end=WD_END)], max_steps=3)
    ref = seeded(mlp)
    opt = AdamW([{"params": ref[0].parameters(), "weight_decay": WD0},
                 {"params": [*ref[2].parameters(), *ref[4].parameters()], "weight_decay": 0.0}], lr=LR)
    train_by_hand(ref, opt, list(make_loader())[:3], own_weight_decay(partial(linear, total=3)))
    assert_same_weights(module.net, ref)


def test_schedule_needs_its_end_value_and_a_known_length():
    with pytest.raises(ValueError, match="`weight_decay_end`"):
        WeightDecay(schedule="cosine")
    with pytest.raises(ValueError, match="'cosine', 'linear'"):
        WeightDecay(schedule="step", weight_decay_end=0.1)
    module = tiny_module(lambda m: Adam(m.parameters(), lr=LR, weight_decay=WD0))
    with pytest.raises(MisconfigurationException, match="max_steps"):
        fit(module, [WeightDecay(schedule="cosine", weight_decay_end=0.4)], max_steps=-1, max_epochs=-1,
            max_time={"seconds": 1})


# ---------------------------------------------------------------------------------------------------------------------
# 2. corrected decay (AdamC): wd * lr_t**2 / lr_max
# ---------------------------------------------------------------------------------------------------------------------
def reference_corrected(wd, lr_max, plain_params=()):
    """Adam (no decay of its own), cosine lr; before each step the corrected decay ``p *= 1 - lr_t*(lr_t/lr_max)*wd``
    (AdamC's ``wd * lr_t**2 / lr_max``), or the decoupled ``p *= 1 - lr_t * wd`` for the parameters named in
    ``plain_params``."""
    model = seeded(mlp)
    opt = Adam(model.parameters(), lr=LR)
    plain = {id(p) for name, p in model.named_parameters() if name in plain_params}
    rules = in_turn(decay_before_step("corrected", wd, lr_max, select=lambda p: id(p) not in plain),
                    decay_before_step("decoupled", wd, select=lambda p: id(p) in plain))
    return train_by_hand(model, opt, batches(), rules, CosineAnnealingLR(opt, T_max=STEPS))


@NATIVE
def test_corrected_equals_the_hand_loop(native):
    wd = 2.0  # wd * lr**2 / lr_max = 2e-2 at the start: visible in 12 steps
    got, t = lightning_run(Adam, WeightDecay("corrected", native=native), weight_decay=wd, scheduler=True)
    assert t.optimizers[0].param_groups[0]["lightning_wd_lr_max"] == LR
    assert_close_weights(got.net, reference_corrected(wd, LR), rtol=1e-6, atol=1e-7)
    # not the decoupled decay: that one is lr_max / lr_t times stronger as the lr falls
    assert_weights_differ(got.net, reference_corrected(wd, LR, plain_params=[n for n, _ in mlp().named_parameters()]),
                          1e-5)


def test_uncorrected_parameters_get_the_decoupled_decay():
    wd = 2.0
    callback = WeightDecay("corrected", uncorrected=["net.4.*"])  # the output layer, as the paper advises
    got, _ = lightning_run(Adam, callback, weight_decay=wd, scheduler=True)
    assert_close_weights(got.net, reference_corrected(wd, LR, plain_params=["4.weight", "4.bias"]),
                         rtol=1e-6, atol=1e-7)


def test_uncorrected_needs_mode_corrected():
    with pytest.raises(ValueError, match="`uncorrected`.*mode='corrected'"):
        WeightDecay("decoupled", uncorrected=["*.weight"])


# ---------------------------------------------------------------------------------------------------------------------
# 3. cautious decay: only where the update and the weight have the same sign
# ---------------------------------------------------------------------------------------------------------------------
def reference_cautious(make_opt, direction_of, mode="decoupled", wd=0.5, steps=STEPS):
    """``make_opt(params)`` with no decay of its own; before each step, mask = ``direction_of(opt, p) * p >= 0``
    and ``p *= 1 - lr * wd`` (decoupled) or ``g += wd * p`` (coupled) where the mask holds."""
    model = seeded(mlp)
    opt = make_opt(model.parameters())
    return train_by_hand(model, opt, batches(steps), decay_before_step(mode, wd, direction=direction_of))


def adam_new_first_moment(opt, p):
    m = opt.state[p].get("exp_avg", torch.zeros_like(p)) if p in opt.state else torch.zeros_like(p)
    return m.lerp(p.grad, 1 - opt.param_groups[0]["betas"][0])  # Adam's own exp_avg update


def sgd_new_buffer(opt, p):
    buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
    return p.grad.clone() if buf is None else buf * 0.9 + p.grad


@NATIVE
@pytest.mark.parametrize("mode", ["decoupled", "coupled"])
@pytest.mark.parametrize(
    "cls, kw, ref_opt, direction",
    [
        (Adam, {}, lambda ps: Adam(ps, lr=LR), adam_new_first_moment),
        (SGD, {"momentum": 0.9}, lambda ps: SGD(ps, lr=LR, momentum=0.9), sgd_new_buffer),
    ],
    ids=["Adam", "SGD-momentum"],
)
def test_cautious_equals_the_hand_loop(cls, kw, ref_opt, direction, mode, native):
    module = tiny_module(lambda m: cls(m.parameters(), lr=LR, weight_decay=0.5, **kw))
    fit(module, [WeightDecay(mode, cautious=True, native=native)], loader=make_loader(96), max_steps=STEPS)
    ref = reference_cautious(ref_opt, direction, mode)
    assert_same_weights(module.net, ref)
    # the mask matters: decaying every element gives another run
    everything = reference_cautious(ref_opt, lambda opt, p: p, mode)  # p * p >= 0 everywhere
    assert_weights_differ(module.net, everything, 1e-5)


def test_cautious_works_in_chunks_without_a_parameter_sized_temporary(monkeypatch):
    from test_memory import AllocatedBytes

    def run(chunk):
        monkeypatch.setattr(decay_module, "cautious_chunk_elements", lambda device: chunk)
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(256, 256))
        opt = Adam([w], lr=LR, weight_decay=0.5)
        attach_weight_decay(opt, cautious=True)
        for _ in range(3):
            w.grad = torch.randn(256, 256)
            with AllocatedBytes() as counter:
                opt.step()
        return w.detach().clone(), counter

    small, small_alloc = run(1000)  # 66 chunks, the last one short
    whole, _ = run(1 << 19)
    assert torch.equal(small, whole)
    # Adam's own step makes parameter-sized temporaries (the largest allocation); ours are chunk-sized
    adam_only = Adam([nn.Parameter(torch.randn(256, 256))], lr=LR)
    adam_only.param_groups[0]["params"][0].grad = torch.randn(256, 256)
    adam_only.step()
    with AllocatedBytes() as plain:
        adam_only.step()
    assert small_alloc.peak - plain.peak <= 1000 * 8  # at most a chunk of float32 and of bool at a time, beyond Adam


@pytest.mark.parametrize(
    "make_opt, match",
    [
        (lambda ps: torch.optim.NAdam(ps, weight_decay=0.1), "NAdam"),
        (lambda ps: torch.optim.Muon([p for p in ps if p.ndim == 2], weight_decay=0.1), "Muon"),
    ],
    ids=["NAdam", "Muon"],
)
def test_cautious_is_refused_where_the_update_sign_is_unknown(make_opt, match):
    with pytest.raises(ValueError, match=f"cautious decay needs the sign .* {match}"):
        attach_weight_decay(make_opt(list(seeded(mlp).parameters())), cautious=True)


def test_cautious_rmsprop_with_momentum_is_refused_at_the_step():
    model = seeded(mlp)
    opt = torch.optim.RMSprop(model.parameters(), lr=LR, momentum=0.9, weight_decay=0.1)
    attach_weight_decay(opt, cautious=True)
    model(torch.randn(2, 8)).sum().backward()
    with pytest.raises(ValueError, match="RMSprop with momentum"):
        opt.step()
    assert opt.param_groups[0]["weight_decay"] == 0.1


# ---------------------------------------------------------------------------------------------------------------------
# 4. the timescale that sets the decay: lambda = 1 / (lr_max * tau)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, expected_wd", [("decoupled", 1 / (LR * 6)), ("independent", 1 / 6)])
def test_timescale_as_a_fraction_of_the_run_sets_the_decay(mode, expected_wd):
    got, t = lightning_run(Adam, WeightDecay(mode, timescale=0.5), weight_decay=0.0)  # tau = 0.5 * 12 steps
    assert t.optimizers[0].param_groups[0]["weight_decay"] == pytest.approx(expected_wd)
    if mode == "decoupled":
        ref, _ = lightning_run(AdamW, None, weight_decay=1 / (LR * 6))
        assert_same_weights(got, ref)


def test_timescale_in_epochs():
    # 96 samples / 8 per batch = 12 steps per epoch; tau = 2 epochs = 24 steps
    _, t = lightning_run(Adam, WeightDecay(timescale=2, timescale_unit="epochs"))
    assert t.optimizers[0].param_groups[0]["weight_decay"] == pytest.approx(1 / (LR * 24))


def test_timescale_in_epochs_needs_no_end_of_the_run():
    module = tiny_module(lambda m: Adam(m.parameters(), lr=LR))
    t = fit(module, [WeightDecay(timescale=2, timescale_unit="epochs")], loader=make_loader(96), max_steps=-1,
            max_epochs=-1, max_time={"seconds": 1}, limit_train_batches=3)  # stopped by time: no known length
    assert t.optimizers[0].param_groups[0]["weight_decay"] == pytest.approx(1 / (LR * 2 * 3))
    with pytest.raises(MisconfigurationException, match="length of the run"):
        fit(tiny_module(lambda m: Adam(m.parameters(), lr=LR)), [WeightDecay(timescale=0.5)], max_steps=-1,
            max_epochs=-1, max_time={"seconds": 1})


def test_timescale_is_logged_for_any_configuration(tmp_path):
    _, t = lightning_run(Adam, WeightDecay(log_weight_decay=True), scheduler=True, logger=CSVLogger(tmp_path),
                         log_every_n_steps=1)
    with open(Path(t.logger.log_dir) / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("timescale/Adam/pg1")]
    lrs = [CosineAnnealingLR(Adam([nn.Parameter(torch.ones(1))], lr=LR), T_max=STEPS).get_last_lr()[0]]
    sched_opt = Adam([nn.Parameter(torch.ones(1))], lr=LR)
    sched = CosineAnnealingLR(sched_opt, T_max=STEPS)
    lrs = []
    for _ in range(STEPS):
        lrs.append(sched_opt.param_groups[0]["lr"])
        sched_opt.step()
        sched.step()
    assert [float(r["timescale/Adam/pg1"]) for r in rows] == pytest.approx([1 / (lr * WD0) for lr in lrs])
    assert [float(r["timescale_fraction/Adam/pg1"]) for r in rows] == pytest.approx(
        [1 / (lr * WD0 * STEPS) for lr in lrs])


def test_timescale_refuses_coupled_and_an_explicit_weight_decay():
    with pytest.raises(ValueError, match="coupled"):
        WeightDecay("coupled", timescale=0.2)
    with pytest.raises(ValueError, match="either `weight_decay` or `timescale`"):
        WeightDecay(weight_decay=0.1, timescale=0.2)
    with pytest.raises(ValueError, match="`timescale_unit`"):
        WeightDecay(timescale=0.2, timescale_unit="steps")


# ---------------------------------------------------------------------------------------------------------------------
# 5. every rule resumes exactly
# ---------------------------------------------------------------------------------------------------------------------
RULES = {
    "cosine-schedule": lambda: WeightDecay(schedule="cosine", weight_decay_end=WD_END),
    "corrected": lambda: WeightDecay("corrected", uncorrected=["net.4.*"]),
    "cautious": lambda: WeightDecay(cautious=True),
    "timescale": lambda: WeightDecay(timescale=0.3),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_every_rule_resumes_bit_for_bit(rule, tmp_path):
    loader = make_repeated_loader(5)
    ckpt = str(tmp_path / "step5.ckpt")

    def module(seed=0):
        return tiny_module(lambda m: cosine_lr(Adam(m.parameters(), lr=LR, weight_decay=WD0)), seed=seed)

    full = module()
    fit(full, [RULES[rule](), SaveCheckpointAtStep(ckpt, 5)], loader=loader, max_steps=STEPS)
    resumed = module(seed=123)
    t = trainer([RULES[rule]()], max_steps=STEPS)
    t.fit(resumed, loader, ckpt_path=ckpt)
    assert t.global_step == STEPS
    assert_same_weights(resumed, full)
