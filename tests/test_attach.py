"""``attach_weight_decay`` in a plain PyTorch loop, against torch's own optimizers."""

from __future__ import annotations

import pytest
import torch
from helpers import flat_parameters, group_settings
from reference import decay_before_step, train_by_hand

from lightning_wd import attach_weight_decay
from lightning_wd.attach import LR_MAX_KEY, MODE_KEY
from lightning_wd.plan import GENERIC, Native


def mean_square(out: torch.Tensor, target=None) -> torch.Tensor:
    """The loss of this file's runs: the output pushed towards zero."""
    return out.pow(2).mean()


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def train(make_opt, mode=None, steps=12, closure_every=2, native=True, **kw):
    m = model()
    opt = make_opt(m.parameters())
    handle = attach_weight_decay(opt, mode=mode, native=native, **kw) if mode else None
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.randn(16, 5, generator=g)

        def closure():
            opt.zero_grad()
            loss = mean_square(m(x))
            loss.backward()
            return loss

        if i % closure_every:
            opt.step(closure)  # the Lightning path: backward runs inside step()
        else:
            closure()
            opt.step()  # the plain-loop path
        sched.step()
    return flat_parameters(m), opt, handle


NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])
FOREACH = pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])


def adam_like(cls, foreach):
    """``cls(params, lr=0.05, weight_decay=0.2, foreach=foreach)``: Adam or AdamW as the tests below configure them."""
    return lambda p: cls(p, lr=0.05, weight_decay=0.2, foreach=foreach)


@NATIVE
@FOREACH
def test_adam_decoupled_is_adamw_bit_for_bit(native, foreach):
    ours, _, _ = train(adam_like(torch.optim.Adam, foreach), "decoupled", native=native)
    ref, _, _ = train(adam_like(torch.optim.AdamW, foreach))
    assert torch.equal(ours, ref)
    plain, _, _ = train(adam_like(torch.optim.Adam, foreach))
    assert not torch.allclose(ours, plain)  # coupled and decoupled really differ here


@NATIVE
@FOREACH
def test_adamw_coupled_is_adam_l2_bit_for_bit(native, foreach):
    ours, _, _ = train(adam_like(torch.optim.AdamW, foreach), "coupled", native=native)
    ref, _, _ = train(adam_like(torch.optim.Adam, foreach))
    assert torch.equal(ours, ref)


@NATIVE
@pytest.mark.parametrize(
    "make_ref",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.2),
        lambda p: torch.optim.RMSprop(p, lr=0.01, weight_decay=0.2),
        lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.2, maximize=True),
    ],
    ids=["sgd_momentum", "rmsprop", "adam_maximize"],
)
def test_coupled_equals_the_optimizers_own_l2(native, make_ref):
    ours, _, _ = train(make_ref, "coupled", native=native)
    ref, _, _ = train(make_ref)
    assert torch.equal(ours, ref)


@NATIVE
def test_independent_mode_matches_hand_written_loop(native):
    wd = 0.1  # independent of lr's size: the hand loop multiplies by 1 - (lr_t / lr_max) * wd
    ours, _, _ = train(lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=wd), "independent", native=native)

    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 5, generator=g), None) for _ in range(12)]
    train_by_hand(m, opt, batches, decay_before_step("independent", wd, 0.05), sched, loss=mean_square)
    ref = flat_parameters(m)
    # the native path computes lr * (wd / lr_max), the loop (lr / lr_max) * wd: equal up to rounding
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_independent_lr_max_converts_to_pytorch_wd():
    """``wd_independent = lr_max * wd_pytorch`` reproduces AdamW."""
    ours, _, _ = train(lambda p: torch.optim.Adam(p, lr=0.05), "independent", weight_decay=0.05 * 0.2, lr_max=0.05)
    ref, _, _ = train(lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.2))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_weights_without_grad_are_not_decayed():
    m = model()
    unused = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([*m.parameters(), unused], lr=0.1, weight_decay=0.5)
    with attach_weight_decay(opt, native=False):
        m(torch.randn(2, 5)).sum().backward()
        opt.step()
    assert torch.equal(unused, torch.ones(4))


def test_between_steps_the_groups_hold_the_users_values_and_a_record_of_the_mode():
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=0.1, weight_decay=0.5)
    configured = group_settings(opt)
    handle = attach_weight_decay(opt, mode="independent")
    seen_in_step = []
    opt.register_step_post_hook(lambda o, a, k: seen_in_step.append(dict(o.param_groups[0])))  # runs after ours
    group = opt.param_groups[0]
    recorded = {MODE_KEY: "independent", LR_MAX_KEY: 0.1}
    assert group_settings(opt) == [{**configured[0], **recorded}]
    m(torch.randn(3, 5)).sum().backward()
    opt.step()
    assert group_settings(opt) == [{**configured[0], **recorded}]  # the step's handoff was put back
    assert opt.state_dict()["param_groups"][0]["weight_decay"] == 0.5
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.25})
    opt.step()  # the new group is taken over at its first step
    assert opt.param_groups[1][MODE_KEY] == "independent" and opt.param_groups[1]["weight_decay"] == 0.25
    handle.detach()
    assert group["weight_decay"] == 0.5 and group["decoupled_weight_decay"] is False
    assert not opt._optimizer_step_pre_hooks and len(opt._optimizer_step_post_hooks) == 1
    assert len(seen_in_step) == 2


def test_an_explicit_weight_decay_is_written_at_attach_and_again_after_a_restore():
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=0.1, weight_decay=0.5)
    attach_weight_decay(opt)
    saved = opt.state_dict()
    other = torch.optim.Adam(m.parameters(), lr=0.1)
    attach_weight_decay(other, weight_decay=0.1)
    assert other.param_groups[0]["weight_decay"] == 0.1
    other.load_state_dict(saved)  # the checkpoint holds 0.5; the explicit argument wins
    assert other.param_groups[0]["weight_decay"] == 0.1
    plain = torch.optim.Adam(m.parameters(), lr=0.1)
    attach_weight_decay(plain)
    plain.load_state_dict(saved)  # no argument: the resumed value
    assert plain.param_groups[0]["weight_decay"] == 0.5


@pytest.mark.parametrize("kwargs, match", [({"mode": "l2"}, "'decoupled', 'coupled', 'independent'"),
                                           ({"weight_decay": -0.1}, "weight_decay"),
                                           ({"lr_max": 0.0}, "lr_max")])
def test_bad_arguments_are_refused(kwargs, match):
    opt = torch.optim.Adam(model().parameters())
    with pytest.raises(ValueError, match=match):
        attach_weight_decay(opt, **kwargs)


def test_lbfgs_is_refused():
    with pytest.raises(ValueError, match="closure several times"):
        attach_weight_decay(torch.optim.LBFGS(model().parameters()))


def test_an_optimizer_that_reevaluates_its_closure_is_stopped():
    class TwoEvaluations(torch.optim.SGD):
        def step(self, closure=None):
            closure()
            closure()
            return super().step()

    m = model()
    opt = TwoEvaluations(m.parameters(), lr=0.1, weight_decay=0.1)
    attach_weight_decay(opt)

    def closure():
        m(torch.randn(2, 5)).sum().backward()

    with pytest.raises(RuntimeError, match="more than once"):
        opt.step(closure)


def _amp_run(make_opt, mode=None, native=True, inf_at=(2,)):
    """A GradScaler loop on CPU in which some steps get inf gradients and are skipped."""
    m = model()
    opt = make_opt(m.parameters())
    if mode:
        attach_weight_decay(opt, mode=mode, native=native)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    g = torch.Generator().manual_seed(1)
    snapshots = []
    for i in range(6):
        x = torch.randn(16, 5, generator=g)
        opt.zero_grad()
        loss = mean_square(m(x)) * (float("inf") if i in inf_at else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        snapshots.append(flat_parameters(m))
    return snapshots


@NATIVE
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_amp_skipped_steps_do_not_decay(native, fused):
    """Non-fused optimizers are not stepped on inf; fused ones are stepped with ``found_inf`` and must not decay."""
    ours = _amp_run(lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.2, fused=fused), "decoupled", native)
    ref = _amp_run(lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.2, fused=fused))
    assert torch.equal(ours[2], ours[1])  # the skipped step left the weights untouched
    for a, b in zip(ours, ref):
        # bit-exact for the foreach path; the fused kernel decays in its own fp arithmetic
        assert torch.equal(a, b)


@NATIVE
def test_amp_fused_coupled_sees_still_scaled_gradients(native):
    ours = _amp_run(lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.2, fused=True), "coupled", native)
    ref = _amp_run(lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.2, fused=True))
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)  # the generic pass unscales, adds and rescales by a power of two: exact


def test_a_group_without_torchs_decoupled_flag_takes_the_generic_pass():
    # torch releases before the `decoupled_weight_decay` group flag: the decay cannot ride in Adam's own kernel there
    opt = torch.optim.Adam(model().parameters(), lr=0.01, weight_decay=0.1)
    handle = attach_weight_decay(opt, mode="decoupled")
    old_style = {k: v for k, v in opt.param_groups[0].items() if k != "decoupled_weight_decay"}
    assert handle.plan(opt.param_groups[0]) == Native({"decoupled_weight_decay": True})  # native handoff
    assert handle.plan(old_style) is GENERIC  # the generic pass


@NATIVE
@pytest.mark.filterwarnings("ignore:lightning_wd.*subclass")
def test_a_subclass_whose_step_calls_super_step_is_decayed_once(native):
    # torch runs the step hooks around each class's step(): here twice, nested; only the outer step takes over
    class Subclassed(torch.optim.Adam):
        def step(self, closure=None):
            return super().step(closure)

    torch.optim.Adam(model().parameters())  # an Adam made first: Adam.step carries torch's hook wrapper too
    ours, _, _ = train(lambda p: Subclassed(p, lr=0.05, weight_decay=0.2), "decoupled", native=native)
    ref, _, _ = train(lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.2))
    assert torch.equal(ours, ref)
