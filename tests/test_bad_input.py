"""Input nobody expected: refused early with a message that names the argument, or made to work exactly."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import (
    assert_close_weights,
    assert_same_weights,
    fit,
    group_settings,
    make_loader,
    mlp,
    seeded,
    tiny_module,
    weights,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from reference import decay_before_step, decoupled, train_by_hand
from torch import nn
from torch.optim import Adam
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

from lightning_wd import WeightDecay, attach_weight_decay
from lightning_wd.attach import LR_MAX_KEY
from lightning_wd.exclusion import excluded_parameters, format_exclusions
from lightning_wd.low_precision import fraction_decayed


@pytest.mark.parametrize("name", ["weight_decay", "lr_max"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=f"`{name}` must be a finite number"):
        WeightDecay(**{name: value})
    opt = Adam(seeded(mlp).parameters())
    with pytest.raises(ValueError, match=f"`{name}` must be a finite number"):
        attach_weight_decay(opt, **{name: value})


@pytest.mark.parametrize("mode", ["decoupled", "independent"])
def test_a_per_step_decay_of_one_or_more_is_refused_at_fit_start(mode):
    module = tiny_module(lambda m: Adam(m.parameters(), lr=0.1, weight_decay=1e9))
    before = weights(module)
    with pytest.raises(MisconfigurationException, match=r"decayed by 1e\+0[89] per step .* zeroes or flips the sign"):
        fit(module, [WeightDecay(mode)], max_steps=2)
    assert_same_weights(module, before)  # refused before any step


def test_a_per_step_decay_that_an_lr_change_pushes_past_one_stops_the_step_and_leaves_the_groups_as_configured():
    model = seeded(mlp)
    opt = Adam(model.parameters(), lr=0.1, weight_decay=5.0)  # lr * wd = 0.5: fine
    attach_weight_decay(opt)
    opt.param_groups[0]["lr"] = 0.3  # now 1.5
    model(torch.randn(2, 8)).sum().backward()
    with pytest.raises(ValueError, match="zeroes or flips"):
        opt.step()
    assert opt.param_groups[0]["weight_decay"] == 5.0 and opt.param_groups[0]["decoupled_weight_decay"] is False


@pytest.mark.parametrize("exclude", [[nn.Linear(2, 2).bias], ["*.bias", 3], 5])
def test_exclude_entries_that_are_not_patterns_are_a_type_error(exclude):
    with pytest.raises(TypeError, match="`exclude`"):
        WeightDecay(exclude=exclude)


def test_exclude_as_one_string_is_refused():
    with pytest.raises(ValueError, match=r"`exclude` must be a list .* write \['\*\.bias'\]"):
        WeightDecay(exclude="*.bias")


def test_a_pattern_that_matches_nothing_warns_naming_it():
    module = tiny_module(lambda m: Adam(m.parameters(), lr=1e-2, weight_decay=0.1))
    with pytest.warns(UserWarning, match=r"pattern 'encoder\.\*' matches no parameter"):
        fit(module, [WeightDecay(exclude=["encoder.*", "net.0.bias"])], max_steps=1)


def test_patterns_match_a_compiled_module_without_orig_mod():
    net = nn.Sequential()
    net.add_module("body", torch.compile(mlp()))  # names: body._orig_mod.0.weight, ...
    assert any("_orig_mod." in n for n, _ in net.named_parameters())
    assert set(excluded_parameters(net, ["body.0.*"])) == {"body._orig_mod.0.weight", "body._orig_mod.0.bias"}
    assert set(excluded_parameters(net, ["body._orig_mod.4.bias"])) == {"body._orig_mod.4.bias"}


def test_exclude_bias_and_norm_excludes_multihead_attentions_biases():
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    names = set(excluded_parameters(mha, exclude_bias_and_norm=True))
    assert names == {"in_proj_bias", "bias_k", "bias_v", "out_proj.bias"}  # written out by hand
    assert "in_proj_weight" not in names


def test_the_report_counts_a_tied_tensor_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10)
            self.head.weight = self.embed.weight  # tied, as in language models

    text = format_exclusions(Tied(), ["*weight"])
    # 2 tensors (the tied weight, the head's bias) of 40 + 10 elements; the weight excluded once, under its first name
    assert text.splitlines()[0] == "WeightDecay: no decay for 1 of 2 parameter tensors (40 of 50 elements)"
    assert [line.split()[0] for line in text.splitlines()[2:]] == ["embed.weight"]


# ---------------------------------------------------------------------------------------------------------------------
# SparseAdam
# ---------------------------------------------------------------------------------------------------------------------
class SparseModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 4, sparse=True)

    def loss(self, idx):
        return self.embed(idx).pow(2).sum()


def test_sparse_adam_coupled_is_refused_and_decoupled_decays_the_weights():
    m = SparseModule()
    with pytest.raises(ValueError, match="SparseAdam takes sparse gradients.*mode='decoupled'"):
        attach_weight_decay(torch.optim.SparseAdam(m.parameters(), lr=0.1), mode="coupled", weight_decay=0.1)

    def train(decay_by_hand: bool):
        m = SparseModule()
        opt = torch.optim.SparseAdam(m.parameters(), lr=0.1)
        if not decay_by_hand:
            attach_weight_decay(opt, weight_decay=0.1)
        for i in range(5):
            opt.zero_grad()
            m.loss(torch.tensor([i, i + 1])).backward()
            if decay_by_hand:
                with torch.no_grad():
                    decoupled(m.embed.weight, 0.1, 0.1)  # lr, wd
            opt.step()
        return m.embed.weight.detach()

    assert torch.equal(train(False), train(True))


def test_rprop_decoupled_is_refused_coupled_works():
    params = seeded(mlp).parameters()
    with pytest.raises(ValueError, match="Rprop's step size is per element.*mode='coupled'"):
        attach_weight_decay(torch.optim.Rprop(params), weight_decay=0.1)
    attach_weight_decay(torch.optim.Rprop(seeded(mlp).parameters()), mode="coupled", weight_decay=0.1)


# ---------------------------------------------------------------------------------------------------------------------
# lr_max of mode="independent"
# ---------------------------------------------------------------------------------------------------------------------
def test_independent_takes_onecycle_and_cyclic_peaks_not_their_lowest_initial_lr():
    def lr_max_after_fit(make_scheduler):
        def configure(m):
            opt = Adam(m.parameters(), lr=0.1, weight_decay=1e-4)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": make_scheduler(opt), "interval": "step"}}

        t = fit(tiny_module(configure), [WeightDecay("independent")], max_steps=3)
        return t.optimizers[0].param_groups[0][LR_MAX_KEY], t.optimizers[0].param_groups[0]["initial_lr"]

    onecycle, initial = lr_max_after_fit(lambda o: OneCycleLR(o, max_lr=0.1, total_steps=10))
    assert (onecycle, initial) == (0.1, 0.1 / 25)  # OneCycleLR starts from max_lr / 25
    cyclic, initial = lr_max_after_fit(lambda o: CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=4))
    assert (cyclic, initial) == (0.1, 0.01)


def test_independent_with_onecycle_equals_the_hand_written_loop():
    wd, steps = 1e-3, 10

    def configure(m):
        opt = Adam(m.parameters(), lr=0.1, weight_decay=wd)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": OneCycleLR(opt, max_lr=0.1, total_steps=steps),
                                                   "interval": "step"}}

    got = tiny_module(configure)
    fit(got, [WeightDecay("independent")], loader=make_loader(96), max_steps=steps)
    model = seeded(mlp)
    opt = Adam(model.parameters(), lr=0.1)
    sched = OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    train_by_hand(model, opt, list(make_loader(96))[:steps], decay_before_step("independent", wd, 0.1), sched)
    assert_close_weights(got.net, model, rtol=1e-5, atol=1e-6)


def test_a_tensor_lr_gives_lr_max_its_value_not_the_tensor():
    lr = torch.tensor(0.1)
    opt = Adam(seeded(mlp).parameters(), lr=lr, weight_decay=0.01)
    attach_weight_decay(opt, mode="independent")
    lr_max = opt.param_groups[0][LR_MAX_KEY]
    assert isinstance(lr_max, float) and lr_max == pytest.approx(0.1)
    opt.param_groups[0]["lr"].mul_(0.5)  # a scheduler that works in place on the tensor
    assert opt.param_groups[0]["lr"] / opt.param_groups[0][LR_MAX_KEY] == pytest.approx(0.5)


def test_an_lr_above_lr_max_warns():
    model = seeded(mlp)
    opt = Adam(model.parameters(), lr=0.1, weight_decay=1e-3)
    attach_weight_decay(opt, mode="independent", lr_max=0.05)
    model(torch.randn(2, 8)).sum().backward()
    with pytest.warns(UserWarning, match=r"lr 0\.1, above its lr_max 0\.05"):
        opt.step()


# ---------------------------------------------------------------------------------------------------------------------
# bf16: what the warning says is what happens
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x_over_2pow9", [0.9, 1.0, 1.25, 1.5, 1.9, 2.0, 3.0])
def test_the_fraction_of_bf16_weights_a_decay_step_moves(x_over_2pow9):
    x = x_over_2pow9 * 2**-9
    g = torch.Generator().manual_seed(0)
    log_uniform = (2 ** (torch.rand(200_000, generator=g) * 6 - 3)).to(torch.bfloat16)  # over six powers of two
    gaussian = torch.randn(200_000, generator=g).to(torch.bfloat16)  # as initialized weights are
    for w in (log_uniform, gaussian):
        moved = (w * (1 - x) != w).double().mean().item()
        # a bf16 binade holds 128 mantissas: the formula (for continuous mantissas) is right to about two of them
        assert moved == pytest.approx(fraction_decayed(x, torch.bfloat16), abs=2 / 128)
        if x <= 2**-9:
            assert moved == 0
        if x >= 2**-8:
            assert moved == 1


def test_at_one_and_a_half_times_two_to_the_minus_nine_most_weights_still_move_and_the_warning_says_so():
    x = 1.5 * 2**-9  # 59% of the weights move: "most of the decay rounds away" would be false
    opt = Adam([nn.Parameter(torch.randn(64).to(torch.bfloat16))], lr=x, weight_decay=1.0)
    with pytest.warns(UserWarning, match=r"about 58% of them") as record:
        attach_weight_decay(opt).check_decay()
    assert "no weight decays" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning where every weight moves
        attach_weight_decay(Adam([nn.Parameter(torch.ones(2, dtype=torch.bfloat16))], lr=2**-8, weight_decay=1.0))


def test_a_refusal_at_attach_leaves_the_groups_as_they_were():
    opt = torch.optim.SparseAdam(SparseModule().parameters(), lr=0.1)
    before = group_settings(opt)
    with pytest.raises(ValueError, match="SparseAdam"):
        attach_weight_decay(opt, mode="coupled", weight_decay=0.1)  # the argument would have been written first
    assert group_settings(opt) == before
    assert not opt._optimizer_step_pre_hooks
