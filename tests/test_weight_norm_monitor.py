"""WeightNormMonitor against references computed in the test, in float64, from the weights and gradients it saw."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import lightning as L
import pytest
import torch
from helpers import Recording, fit, tiny_module
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from reference import decoupled
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_wd import EffectiveLRMonitor, WeightDecay, WeightNormMonitor
from lightning_wd.optimizers import Equilibrium, OptimizerRule, register_optimizer
from lightning_wd.weight_norm import squared_norms
from lightning_wd.weight_norm_monitor import sum_over_shards_

LR, WD, CLIP = 1e-2, 0.1, 0.05  # CLIP is below the gradient norm of every step here: clipping changes the gradient


#: the keys WeightNormMonitor logs (and the timescale it logs unless WeightDecay does)
NORM_KEYS = ("weight_norm/", "grad_to_weight/", "equilibrium_norm/", "equilibrium_ratio/", "timescale/",
             "timescale_fraction/")


class Reference(Callback):
    """The weights before the step, the gradient the step used and the weights after it, in float64.

    ``on_before_optimizer_step`` sees the gradient before clipping (and before any L2 term a decay adds); the
    reference clips it itself, as ``torch.nn.utils.clip_grad_norm_`` does: ``g * min(1, clip / (|g| + 1e-6))`` with
    ``|g|`` the norm over all gradients.
    """

    def __init__(self, clip: float | None) -> None:
        self.clip = clip
        self.steps: dict[int, dict[str, Any]] = {}
        self.clipped = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        params = dict(pl_module.named_parameters())
        grads = {n: p.grad.double().clone() for n, p in params.items() if p.grad is not None}
        total = math.sqrt(sum(g.square().sum().item() for g in grads.values()))
        coef = min(1.0, self.clip / (total + 1e-6)) if self.clip else 1.0
        self.clipped |= coef < 1
        self.steps[step] = {
            "before": {n: p.detach().double().clone() for n, p in params.items()},
            "grad": {n: g * coef for n, g in grads.items()},
            "lr": [float(g["lr"]) for g in optimizer.param_groups],
        }

    def on_train_batch_end(self, trainer, pl_module, *args):
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.steps[step]["after"] = {n: p.detach().double().clone() for n, p in pl_module.named_parameters()}


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023), as lion-pytorch writes it: ``p *= 1 - lr*wd; p -= lr * sign(lerp(m, g, 1 - b1))``."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                decoupled(p, group["lr"], group["weight_decay"])
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.add_(torch.sign(torch.lerp(m, p.grad, 1 - b1)), alpha=-group["lr"])
                m.lerp_(p.grad, 1 - b2)
        return loss


# a Lion of one's own: the registry is where the library learns its decay rule and its update form
register_optimizer(Lion, OptimizerRule(own="decoupled", equilibrium=lambda o, g: Equilibrium("lion"),
                                       description="`p *= 1 - lr*wd` before a sign update"))


class NestedAdam(torch.optim.Adam):
    """A subclass whose step() calls Adam's, then changes the weights (as a Lookahead-style wrapper would): with
    Adam's own step hooked too, the step hooks run twice, nested, and the weights after the step are the outer's."""

    def step(self, closure=None):
        loss = super().step(closure)
        with torch.no_grad():
            torch._foreach_mul_([p for g in self.param_groups for p in g["params"]], 0.999)
        return loss


def nested_adam(params, **kwargs) -> NestedAdam:
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch hooks the step() of each class it builds
    return NestedAdam(params, **kwargs)


def norm(t: torch.Tensor) -> float:
    return t.norm().item()


def adamw_eq(lr: float, x: float, w: torch.Tensor) -> float:
    return lr * math.sqrt(w.numel() / (2 * x))  # sqrt(lr C / (2 wd)) per neuron, times sqrt(rows), for x = lr wd


def adam_l2_eq(lr: float, wd: float, w: torch.Tensor, g: torch.Tensor) -> float:
    return (lr * math.sqrt(w.numel()) * norm(g) * norm(w) / (2 * wd)) ** (1 / 3)


def sgdm_eq(lr_eff: float, x: float, w: torch.Tensor, g: torch.Tensor) -> float:
    return (lr_eff**2 * (norm(g) * norm(w)) ** 2 / (2 * x)) ** 0.25


MOMENTUM, DAMPENING = 0.9, 0.1
LR_EFF = LR * (1 - DAMPENING) / (1 - MOMENTUM)

# name -> (optimizer factory, callbacks, the decay of the step: (kind, x or wd as a function of the step's lr), and
#          the equilibrium as a function of (lr, decay value, weight before, gradient); None: none expected)
CONFIGS: dict[str, tuple[Any, Any, Any, Any]] = {
    "adamw_own": (lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD), list,
                  lambda lr: ("shrink", lr * WD), lambda lr, x, w, g: adamw_eq(lr, x, w)),
    "adam_l2_own": (lambda m: torch.optim.Adam(m.parameters(), lr=LR, weight_decay=WD), list,
                    lambda lr: ("l2", WD), adam_l2_eq),
    "sgdm_l2_own": (lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, dampening=DAMPENING,
                                              weight_decay=WD), list,
                    lambda lr: ("l2", WD), lambda lr, wd, w, g: sgdm_eq(LR_EFF, LR_EFF * wd, w, g)),
    # corrected decay, wd lr^2 / lr_max, under a schedule that moves the lr
    "corrected_steplr": (lambda m: torch.optim.Adam(m.parameters(), lr=LR, weight_decay=WD),
                         lambda: [WeightDecay(mode="corrected")],
                         lambda lr: ("shrink", WD * lr**2 / LR), lambda lr, x, w, g: adamw_eq(lr, x, w)),
    # the generic pass adds wd * p to the gradient: the monitor reports the loss's gradient
    "coupled_generic": (lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD),
                        lambda: [WeightDecay(mode="coupled", native=False)], lambda lr: ("l2", WD), adam_l2_eq),
    # the generic pass decays the weights before the update: the monitor reports the weights before that
    "sgdm_decoupled_excluded": (lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM,
                                                          dampening=DAMPENING, weight_decay=WD),
                                lambda: [WeightDecay(mode="decoupled", exclude=["net.4.weight"])],
                                lambda lr: ("shrink", lr * WD), lambda lr, x, w, g: sgdm_eq(LR_EFF, x, w, g)),
    "lion_named": (lambda m: Lion(m.parameters(), lr=LR, weight_decay=WD), lambda: [WeightDecay()],
                   lambda lr: ("shrink", lr * WD), lambda lr, x, w, g: adamw_eq(lr, x, w)),
    "nested_step": (lambda m: nested_adam(m.parameters(), lr=LR, weight_decay=WD, decoupled_weight_decay=True), list,
                    lambda lr: ("shrink", lr * WD), lambda lr, x, w, g: adamw_eq(lr, x, w)),
    "rmsprop": (lambda m: torch.optim.RMSprop(m.parameters(), lr=LR, weight_decay=WD), list,
                lambda lr: ("l2", WD), None),
    # a tensor lr (read with the norms, at the end of the batch, not in the step) in AdamW's own decay
    "tensor_lr": (lambda m: torch.optim.AdamW(m.parameters(), lr=torch.tensor(LR), weight_decay=WD, foreach=False),
                  list, lambda lr: ("shrink", lr * WD), lambda lr, x, w, g: adamw_eq(lr, x, w)),
}
STEPS, EVERY = 6, 2


def with_scheduler(factory):
    def make(module):
        opt = factory(module)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
    return make


def run(callbacks: list, optimizer_fn, logger: Logger | None = None, **trainer_kwargs: Any) -> L.Trainer:
    kwargs = dict(max_steps=STEPS, log_every_n_steps=EVERY, logger=logger if logger is not None else Recording())
    return fit(tiny_module(optimizer_fn), callbacks, **{**kwargs, **trainer_kwargs})


@pytest.mark.filterwarnings("ignore:lightning_wd.*is not in lightning_wd's optimizer registry")
@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_logged_number_matches_a_float64_reference(config):
    make_opt, extra_callbacks, decay_of, equilibrium = CONFIGS[config]
    if config == "corrected_steplr":
        make_opt = with_scheduler(make_opt)
    ref, logger = Reference(CLIP), Recording()
    # WeightDecay first: its step hooks are registered before the monitor's, the order that would show its L2 term
    # or its decay in what the monitor reads
    trainer = run([*extra_callbacks(), WeightNormMonitor(per_parameter=True), ref], make_opt, logger,
                  gradient_clip_val=CLIP)
    assert ref.clipped  # the gradient the monitor must report is not the one on_before_optimizer_step sees
    logged = logger.merged(NORM_KEYS)
    assert sorted(logged) == [1, 3, 5]
    total = trainer.estimated_stepping_batches
    for step, metrics in logged.items():
        r = ref.steps[step]
        (lr,) = r["lr"]
        kind, x = decay_of(lr)
        expected = {}
        for name, w_after in r["after"].items():
            w, g = r["before"][name], r["grad"][name]
            expected[f"weight_norm/{name}"] = norm(w)  # at the step: the weights its gradient was computed at
            expected[f"grad_to_weight/{name}"] = norm(g) / norm(w)
            excluded = config == "sgdm_decoupled_excluded" and name == "net.4.weight"
            if equilibrium is not None and w.dim() >= 2 and not excluded:
                expected[f"equilibrium_norm/{name}"] = equilibrium(lr, x, w, g)
        opt_name = type(trainer.optimizers[0]).__name__
        # the param group's keys: the same norms over all its parameters together, and how far the matrices with a
        # predicted norm are from it
        ws, gs = (sum(norm(r[k][n]) ** 2 for n in r["before"]) for k in ("before", "grad"))
        expected[f"weight_norm/{opt_name}/pg1"] = ws**0.5
        expected[f"grad_to_weight/{opt_name}/pg1"] = (gs / ws) ** 0.5
        covered = [n for n in r["before"] if f"equilibrium_norm/{n}" in expected]
        if covered:
            expected[f"equilibrium_ratio/{opt_name}/pg1"] = (sum(norm(r["before"][n]) ** 2 for n in covered) / sum(
                expected[f"equilibrium_norm/{n}"] ** 2 for n in covered)) ** 0.5
        if kind == "shrink":  # L2 has no shrink factor, hence no timescale
            expected[f"timescale/{opt_name}/pg1"] = 1 / x
            expected[f"timescale_fraction/{opt_name}/pg1"] = 1 / (x * total)
        assert set(metrics) == set(expected), (step, set(metrics) ^ set(expected))
        for key, value in expected.items():
            # the monitor sums squares in float32: a few ulps of float32 off the float64 reference
            assert metrics[key] == pytest.approx(value, rel=2e-5), (step, key)
    if config == "corrected_steplr":  # the schedule moved the lr, and the corrected decay with its square
        assert logged[5]["timescale/Adam/pg1"] == pytest.approx(16 * logged[1]["timescale/Adam/pg1"])


@pytest.mark.parametrize("fused", [False, True], ids=["unscaled_by_lightning", "fused_scaled"])
def test_gradient_is_unscaled_under_16_mixed(fused):
    """With a GradScaler, Lightning unscales the gradients before the step, except for optimizers that unscale
    inside their own (fused) kernel: those get the scaled gradients and the scale (``optimizer.grad_scale``). Either
    way ``grad_to_weight`` is of the true gradient."""
    from lightning.pytorch.plugins import MixedPrecision

    class Scaled(Reference):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            self.steps[step]["scale"] = trainer.precision_plugin.scaler.get_scale()

    ref, logger = Scaled(None), Recording()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    run([WeightNormMonitor(per_parameter=True), ref], lambda m: torch.optim.Adam(m.parameters(), lr=LR,
                                                                                 fused=fused), logger,
        plugins=[plugin])
    logged = logger.merged(NORM_KEYS)
    assert sorted(logged) == [1, 3, 5]
    for step, metrics in logged.items():
        r = ref.steps[step]
        scale = r["scale"] if fused else 1.0  # what on_before_optimizer_step saw is still scaled for fused Adam
        for name, w in r["before"].items():
            expected = norm(r["grad"][name]) / scale / norm(w)
            assert metrics[f"grad_to_weight/{name}"] == pytest.approx(expected, rel=2e-5), (step, name)


class CountOps(TorchDispatchMode):
    """Counts the ops dispatched while active, by name: ``aten._local_scalar_dense`` is what ``.item()``,
    ``float(t)`` and ``bool(t)`` call, the CPU stand-in for a host-device sync on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def counted_fit(monkeypatch, callbacks: list, lr: Any = LR) -> tuple[dict[str, int], int]:
    """The ops dispatched and the ``Tensor.tolist`` calls of a whole fit (6 steps, Adam with a WeightDecay)."""
    calls = {"tolist": 0}
    real = torch.Tensor.tolist

    def tolist(t):
        calls["tolist"] += 1
        return real(t)

    counter = CountOps()
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", tolist)
        with counter:
            run([*callbacks, WeightDecay()], lambda mod: torch.optim.Adam(
                mod.parameters(), lr=lr() if callable(lr) else lr, weight_decay=WD, foreach=not callable(lr)),
                gradient_clip_val=CLIP)
    return dict(counter.counts), calls["tolist"]


@pytest.mark.parametrize("lr", [LR, lambda: torch.tensor(LR)], ids=["float_lr", "tensor_lr"])
def test_no_host_read_off_logging_steps_and_one_transfer_on_them(monkeypatch, lr):
    """Against the same fit without the monitor: never logging, it adds no op at all; logging at every step, it adds
    no ``.item()``, one ``_foreach_norm`` (weights and gradients,
                                           at the step) and one ``tolist()`` per step. A tensor lr is
    read in that transfer too (on a GPU it may live on the CPU: one ``tolist()`` per device)."""
    base, base_tolist = counted_fit(monkeypatch, [], lr)
    silent, silent_tolist = counted_fit(monkeypatch, [WeightNormMonitor(log_every_n_steps=1000)], lr)
    assert silent == base and silent_tolist == base_tolist
    logging, logging_tolist = counted_fit(monkeypatch, [WeightNormMonitor(log_every_n_steps=1)], lr)
    assert base["_local_scalar_dense"] > 0  # Lightning's own reads are seen, so the count can see ours
    assert logging["_local_scalar_dense"] == base["_local_scalar_dense"]
    # nor a tensor made from host data, which on CUDA is a host-to-device copy that synchronizes
    assert logging.get("lift_fresh", 0) == base.get("lift_fresh", 0)
    assert logging.get("_foreach_norm", 0) - base.get("_foreach_norm", 0) == STEPS  # weights and gradients at once
    assert logging_tolist - base_tolist == STEPS


def test_a_group_whose_parameters_change_is_reported_as_it_now_is():
    """The monitor keeps what it looked up for each parameter from one logging step to the next; a group that loses
    a parameter between two of them is then reported without it, its norm the norm of the parameters it holds."""

    class DropLast(Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 2:
                trainer.optimizers[0].param_groups[0]["params"].pop(0)  # net.0.weight

    logger = Recording()
    run([DropLast(), WeightNormMonitor(log_every_n_steps=1, per_parameter=True)],
        lambda m: torch.optim.SGD(m.parameters(), lr=LR), logger, max_steps=4)
    for step, metrics in logger.calls:
        own = {k: v for k, v in metrics.items() if k.startswith("weight_norm/net.")}
        assert ("weight_norm/net.0.weight" in own) == (step < 2) and len(own) == (6 if step < 2 else 5)
        assert metrics["weight_norm/SGD/pg1"] == pytest.approx(math.sqrt(sum(v**2 for v in own.values())))


def test_timescale_is_left_to_a_weight_decay_that_logs_it():
    """With WeightDecay logging (log_weight_decay=True) the timescale keys come from it alone; without, from the
    monitor."""
    make_opt = lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD)  # noqa: E731
    for log_weight_decay in (True, False):
        logger = Recording()
        run([WeightNormMonitor(per_parameter=True), WeightDecay(log_weight_decay=log_weight_decay)], make_opt, logger)
        mine = [m for _, m in logger.calls if "weight_norm/net.0.weight" in m]
        theirs = [m for _, m in logger.calls if "weight_decay/AdamW/pg1" in m]
        assert len(mine) == 3 and len(theirs) == (3 if log_weight_decay else 0)
        assert all(("timescale/AdamW/pg1" in m) != log_weight_decay for m in mine)
        assert all(m["timescale/AdamW/pg1"] == pytest.approx(1 / (LR * WD)) for m in theirs)


def test_logs_at_the_steps_of_effective_lr_monitor():
    logger = Recording()
    run([WeightNormMonitor(), EffectiveLRMonitor()], lambda m: torch.optim.Adam(m.parameters(), lr=LR), logger,
        log_every_n_steps=4, max_steps=12)
    steps = {prefix: [s for s, m in logger.calls if any(k.startswith(prefix) for k in m)]
             for prefix in ("weight_norm/", "effective_lr/")}
    assert steps["weight_norm/"] == steps["effective_lr/"] == [3, 7, 11]


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10"])
def test_bad_log_every_n_steps_is_refused(value):
    with pytest.raises(ValueError, match="`log_every_n_steps` must be a positive int or None"):
        WeightNormMonitor(log_every_n_steps=value)


def test_squared_norms_of_mixed_dtypes_make_no_tensor_from_host_data():
    counter = CountOps()
    with counter:
        squared_norms([torch.randn(3), torch.randn(2, dtype=torch.float64), torch.randn(4).bfloat16(), torch.randn(5)])
    assert counter.counts["_foreach_norm"] == 3 and not {"lift_fresh", "_local_scalar_dense"} & set(counter.counts)


def test_sum_over_shards_sums_the_sharded_entries_only(monkeypatch):
    """With a stand-in for a 2-rank all_reduce (each rank holding the same squares: the sum doubles them), the
    entries of sharded parameters are summed over the mesh's shard dimension and those of whole ones left alone,
    with one collective per process group, whether every entry is sharded or only some."""
    import types

    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard

    class Mesh:
        def get_group(self, dim: int) -> str:
            return f"group of mesh dim {dim}"

    calls = []

    def all_reduce(t, op=None, group=None):
        calls.append((tuple(t.shape), op, group))
        t.mul_(2)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    sharded = types.SimpleNamespace(placements=(Replicate(), Shard(0)), device_mesh=Mesh())  # HSDP: dim 1 shards
    whole = torch.zeros(3)
    squares = torch.tensor([1.0, 2.0, 3.0, 4.0])
    sum_over_shards_(squares, [sharded, whole, sharded, whole])
    assert squares.tolist() == [2.0, 2.0, 6.0, 4.0]
    assert calls == [((2,), dist.ReduceOp.SUM, "group of mesh dim 1")]
    calls.clear()
    squares = torch.tensor([1.0, 3.0])
    sum_over_shards_(squares, [sharded, sharded])
    assert squares.tolist() == [2.0, 6.0] and calls == [((2,), dist.ReduceOp.SUM, "group of mesh dim 1")]
    squares = torch.tensor([1.0, 3.0])
    sum_over_shards_(squares, [whole, whole])  # DDP: nothing to sum
    assert squares.tolist() == [1.0, 3.0] and len(calls) == 1
