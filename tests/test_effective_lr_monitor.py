"""EffectiveLRMonitor against an independent reference computed from the optimizer's state in the test."""

from __future__ import annotations

import contextlib
import csv
import glob
import logging
import os
from collections import defaultdict
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

import lightning_wd.effective_lr as el
from lightning_wd import EffectiveLRMonitor, WeightDecay
from lightning_wd.effective_lr import effective_lr, histogram_median_rel_error
from lightning_wd.optimizers import formula_for


class Net(L.LightningModule):
    def __init__(self, make_opt, scheduler: bool = False) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 16)
        self.head = torch.nn.Linear(16, 1)
        self.make_opt = make_opt
        self.scheduler = scheduler

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.head(torch.tanh(self.body(x))), y)

    def configure_optimizers(self):
        opt = self.make_opt(self)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.3)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(n: int = 96, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x[:, :1] * 3 + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class RateRecorder(Callback):
    """Records, after every step, ``rate_of(optimizer, group, param)`` (a float64 tensor) of every parameter, by
    name, and of every param group, all its parameters' rates together, under ``{optimizer}/pg{i}``."""

    def __init__(self, rate_of) -> None:
        self.rate_of = rate_of
        self.per_step: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)

    def on_fit_start(self, trainer, pl_module):
        names = {id(p): n for n, p in pl_module.named_parameters()}

        def hook(opt, args, kwargs):
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for gi, group in enumerate(opt.param_groups):
                rates = [self.rate_of(opt, group, p) for p in group["params"]]
                self.per_step[step].update({names[id(p)]: r for p, r in zip(group["params"], rates)})
                self.per_step[step][f"{type(opt).__name__}/pg{gi + 1}"] = torch.cat([r.flatten() for r in rates])

        for opt in trainer.optimizers:
            opt.register_step_post_hook(hook)


def adam_reference_rate(opt, group, p) -> torch.Tensor:
    """``lr / (sqrt(v / (1 - beta2^t)) + eps)`` in float64 from Adam's state, as the README states it."""
    s = opt.state[p]
    v = (s["max_exp_avg_sq"] if group["amsgrad"] else s["exp_avg_sq"]).double()
    return group["lr"] / (torch.sqrt(v / (1 - group["betas"][1] ** float(s["step"]))) + group["eps"])


def formula_rate(opt, group, p) -> torch.Tensor:
    """The library's formula for the optimizer (each checked against its real update in test_effective_lr.py)."""
    return effective_lr(formula_for(opt)[1].spec(opt.state[p], group, p)).double()


def make_trainer(logger, callbacks: list, max_steps: int, log_every_n_steps: int) -> L.Trainer:
    """helpers' quiet Trainer with the given logger and callbacks."""
    return trainer(callbacks, logger=logger, max_steps=max_steps, log_every_n_steps=log_every_n_steps)


def read_metrics(log_dir: str) -> dict[int, dict[str, float]]:
    paths = glob.glob(os.path.join(log_dir, "**", "metrics.csv"), recursive=True)
    rows: dict[int, dict[str, float]] = defaultdict(dict)
    if not paths:  # CSVLogger writes no file when nothing was logged
        return rows
    (path,) = paths
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            rows[step].update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def lower_median(x: torch.Tensor) -> float:
    s, _ = torch.sort(x.flatten())
    return s[(s.numel() - 1) // 2].item()


CONFIGS = {
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, amsgrad=True),
    "two_groups": lambda m: torch.optim.AdamW(
        [{"params": m.body.parameters(), "lr": 3e-2}, {"params": m.head.parameters(), "lr": 1e-3, "eps": 1e-6}]
    ),
}


def statistics_pass_of(name: str, monkeypatch: pytest.MonkeyPatch) -> contextlib.AbstractContextManager:
    """``"eager"``: the torch pass; ``"triton"``: the fused Triton pass, in Triton's interpreter on a CPU."""
    if name == "eager":
        return el.fused_kernel_disabled()
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton pass runs on a CPU only in Triton's interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setattr(el, "_TRITON_DEVICES", ("cuda", "cpu"))
    return contextlib.nullcontext()


@pytest.mark.parametrize("statistics_pass", ["triton", "eager"])
@pytest.mark.parametrize("scheduler", [False, True], ids=["const_lr", "steplr"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_logged_statistics_match_reference_at_every_logged_step(tmp_path, config, scheduler, statistics_pass,
                                                                  monkeypatch):
    """With the eager torch pass and with the fused Triton pass (in its interpreter here)."""
    ref = RateRecorder(adam_reference_rate)
    trainer = make_trainer(CSVLogger(tmp_path), [EffectiveLRMonitor(per_parameter=True), ref], max_steps=12,
                           log_every_n_steps=3)
    with statistics_pass_of(statistics_pass, monkeypatch):
        trainer.fit(Net(CONFIGS[config], scheduler), loader())
    logged = read_metrics(str(tmp_path))
    steps = sorted(s for s in logged if any(k.startswith("effective_lr/") for k in logged[s]))
    assert steps == [2, 5, 8, 11]
    for step in steps:
        for name, ref_values in ref.per_step[step].items():
            key = f"effective_lr/{name}"
            expected = {
                "min": ref_values.min().item(),
                "max": ref_values.max().item(),
                "mean": ref_values.mean().item(),
                "median": lower_median(ref_values),
            }
            for stat, value in expected.items():
                # the monitor computes in fp32, the reference in fp64: a few ulps of fp32 apart; the median comes
                # from a histogram of v_hat, within its documented bound
                rel = histogram_median_rel_error() if stat == "median" else 1e-5
                assert logged[step][f"{key}/{stat}"] == pytest.approx(value, rel=rel), (step, key, stat)
    if scheduler:  # the logged value follows the lr of the step it describes, not the next step's lr
        lrs = [ref.per_step[s]["AdamW/pg1" if config != "adam" and config != "amsgrad" else "Adam/pg1"] for s in steps]
        assert lrs[0].max() > lrs[-1].max()


OTHER_OPTIMIZERS = {
    "nadam": lambda m: torch.optim.NAdam(m.parameters(), lr=1e-2),
    "radam": lambda m: torch.optim.RAdam(m.parameters(), lr=1e-2, betas=(0.9, 0.95)),  # rectified from step 6
    "adamax": lambda m: torch.optim.Adamax(m.parameters(), lr=1e-2),
    "rmsprop_centered": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3, centered=True, momentum=0.9),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=1e-2, lr_decay=0.01),
    "adafactor": lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-2),
}


@pytest.mark.parametrize("config", list(OTHER_OPTIMIZERS))
def test_every_adaptive_optimizer_is_logged_with_exact_statistics_of_its_rate(tmp_path, config):
    """The logged statistics of each parameter and group equal the exact ones (sorted median, fp64 mean) of the
    per-element rate at the step they describe, for the optimizers beyond Adam."""
    ref = RateRecorder(formula_rate)
    trainer = make_trainer(CSVLogger(tmp_path), [EffectiveLRMonitor(per_parameter=True), ref], max_steps=8,
                           log_every_n_steps=4)
    trainer.fit(Net(OTHER_OPTIMIZERS[config]), loader())
    logged = read_metrics(str(tmp_path))
    for step in (3, 7):
        assert len(ref.per_step[step]) == 5  # 4 parameters and the group
        for name, rate in ref.per_step[step].items():
            for stat, value in zip(("min", "max", "mean"), (rate.min(), rate.max(), rate.mean())):
                assert logged[step][f"effective_lr/{name}/{stat}"] == pytest.approx(value.item(), rel=1e-6)
            median = logged[step][f"effective_lr/{name}/median"]
            assert abs(median / lower_median(rate) - 1) <= histogram_median_rel_error(), (step, name)


def test_no_host_read_but_the_step_counters_on_a_logging_step():
    """The CPU stand-in for CUDA's sync check: ``_local_scalar_dense`` (what ``.item()`` and ``float(t)`` dispatch)
    runs, during a logging step's statistics, only on the optimizer's step counters, which torch keeps on the host
    (torch's own step reads them the same way); no statistic is read back before the one transfer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads: list[torch.Tensor] = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append(args[0])
            return func(*args, **(kwargs or {}))

    model = Net(None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y in loader(16):
        torch.nn.functional.mse_loss(model.head(torch.tanh(model.body(x))), y).backward()
        opt.step()
    monitor = EffectiveLRMonitor(per_parameter=True)
    formula = formula_for(opt)[1]
    with Reads():
        monitor._collect(opt, formula)
    steps = {opt.state[p]["step"].data_ptr() for p in model.parameters()}
    assert reads and all(t.data_ptr() in steps for t in reads)
    assert len(monitor._pending) == 1 and monitor._pending[0][1].numel() == 5 * 4


def test_amsgrad_rate_never_increases_while_adams_does():
    """With a constant lr, AMSGrad's per-element ``lr / sqrt(max_exp_avg_sq)`` never rises; Adam's does."""
    torch.manual_seed(0)
    rates = {}
    for amsgrad in (False, True):
        w = torch.nn.Parameter(torch.zeros(100))
        opt = torch.optim.Adam([w], lr=1e-2, amsgrad=amsgrad)
        g = torch.Generator().manual_seed(1)
        history = []
        for t in range(60):
            scale = 10.0 if t < 20 else 0.1  # large gradients first, then small ones
            w.grad = torch.randn(100, generator=g) * scale
            opt.step()
            v = opt.state[w]["max_exp_avg_sq" if amsgrad else "exp_avg_sq"]
            history.append(1e-2 / v.sqrt())
        rates[amsgrad] = torch.stack(history)
    assert (rates[True][1:] <= rates[True][:-1]).all()
    assert (rates[False][1:] > rates[False][:-1]).any()


def test_nothing_is_computed_on_steps_that_do_not_log(tmp_path, monkeypatch):
    import lightning_wd.effective_lr_monitor as mod

    calls = []
    real = mod.rate_statistics
    monkeypatch.setattr(mod, "rate_statistics", lambda specs, *a, **k: calls.append(len(specs)) or real(specs, *a, **k))
    monitor = EffectiveLRMonitor(log_every_n_steps=5, per_parameter=True)
    trainer = make_trainer(CSVLogger(tmp_path), [monitor], max_steps=10, log_every_n_steps=50)
    trainer.fit(Net(CONFIGS["adam"]), loader())
    assert calls == [4, 4]  # steps 4 and 9 only, each with the 4 parameters of the one param group
    assert sorted(s for s, r in read_metrics(str(tmp_path)).items() if r) == [4, 9]


def test_one_host_transfer_per_logging_step(tmp_path, monkeypatch):
    """All numbers of a logging step reach the host through one ``tolist()`` and no ``item()``."""
    counts = {"tolist": 0, "item": 0}
    real_tolist, real_item = torch.Tensor.tolist, torch.Tensor.item

    class Spy(EffectiveLRMonitor):
        def on_train_batch_end(self, *args, **kwargs):
            def tolist(t):
                counts["tolist"] += 1
                return real_tolist(t)

            def item(t):
                counts["item"] += 1
                return real_item(t)

            with monkeypatch.context() as m:
                m.setattr(torch.Tensor, "tolist", tolist)
                m.setattr(torch.Tensor, "item", item)
                super().on_train_batch_end(*args, **kwargs)

    trainer = make_trainer(CSVLogger(tmp_path), [Spy()], max_steps=6, log_every_n_steps=3)
    trainer.fit(Net(CONFIGS["two_groups"]), loader())
    assert counts == {"tolist": 2, "item": 0}


def test_unsupported_optimizer_warns_once_and_training_goes_on(tmp_path):
    trainer = make_trainer(CSVLogger(tmp_path), [EffectiveLRMonitor(per_parameter=True)], max_steps=4,
                           log_every_n_steps=1)
    expected = r"EffectiveLRMonitor skips SGD \(its rate is .*: use LearningRateMonitor\)\.$"
    with pytest.warns(UserWarning, match=expected) as record:
        trainer.fit(Net(lambda m: torch.optim.SGD(m.parameters(), lr=0.1)), loader())
    assert sum("EffectiveLRMonitor" in str(w.message) for w in record) == 1
    assert trainer.global_step == 4
    assert not any(k.startswith("effective_lr/") for r in read_metrics(str(tmp_path)).values() for k in r)


class ManualSteps(Net):
    """One optimizer per layer, stepped by hand: ``make_opts(module) -> (opt_body, opt_head)``."""

    def __init__(self, make_opts):
        super().__init__(None)
        self.automatic_optimization = False
        self.make_opts = make_opts

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers():
            opt.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        return self.make_opts(self)


def test_optimizers_without_a_rate_and_unknown_ones_are_named_in_one_warning(tmp_path):
    class Unknown(torch.optim.SGD):  # a subclass of a known class takes its entry: this one is SGD's
        pass

    class Homemade(torch.optim.Optimizer):
        def step(self, closure=None):
            pass

    def make_opts(m):
        return Unknown(m.body.parameters(), lr=0.1), Homemade(m.head.parameters(), {})

    trainer = make_trainer(CSVLogger(tmp_path), [EffectiveLRMonitor(per_parameter=True)], max_steps=4,
                           log_every_n_steps=1)
    with pytest.warns(UserWarning, match="EffectiveLRMonitor skips") as record:
        trainer.fit(ManualSteps(make_opts), loader())
    (message,) = [str(w.message) for w in record if "EffectiveLRMonitor" in str(w.message)]
    assert message.startswith("EffectiveLRMonitor skips Homemade (no effective-lr formula is known for it")
    assert "; Unknown (its rate is the lr itself for every element: use LearningRateMonitor)." in message


def test_no_optimizer_at_all_gives_no_warning(tmp_path):
    """``configure_optimizers`` returning None: Lightning steps a stand-in optimizer with no param groups."""
    import warnings

    trainer = make_trainer(CSVLogger(tmp_path), [EffectiveLRMonitor(per_parameter=True)], max_steps=2,
                           log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(Net(lambda m: None), loader())
    assert trainer.global_step == 2
    assert not [w for w in record if "EffectiveLRMonitor" in str(w.message)]


def test_several_optimizers_are_named_by_class_and_repeat(tmp_path):
    def make_opts(m):
        return torch.optim.Adam(m.body.parameters(), lr=1e-2), torch.optim.Adam(m.head.parameters(), lr=1e-3)

    # max_steps counts optimizer steps: two per batch in manual optimization
    trainer = make_trainer(CSVLogger(tmp_path), [EffectiveLRMonitor(per_parameter=True)], max_steps=4,
                           log_every_n_steps=2)
    trainer.fit(ManualSteps(make_opts), loader())
    row = read_metrics(str(tmp_path))[1]
    assert {"effective_lr/Adam/pg1/median", "effective_lr/Adam-1/pg1/median"} <= set(row)
    assert {"effective_lr/body.weight/max", "effective_lr/head.weight/max"} <= set(row)


def test_histogram_of_log10_effective_lr_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    """The histogram of the last logging step (the last step: the optimizer's state is still that step's) holds
    log10 of each of body.weight's 64 rates, its ends those of Adam's rate computed by hand from that state."""
    callbacks = [EffectiveLRMonitor(log_histogram=True, per_parameter=True), WeightDecay(weight_decay=0.01)]
    trainer = make_trainer(TensorBoardLogger(tmp_path), callbacks, max_steps=4, log_every_n_steps=2)
    net = Net(CONFIGS["adam"])
    trainer.fit(net, loader())
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    assert "effective_lr/body.weight/log10" in acc.Tags()["histograms"]
    events = acc.Histograms("effective_lr/body.weight/log10")
    assert [e.step for e in events] == [1, 3]
    h = events[-1].histogram_value
    opt = trainer.optimizers[0]
    state, group = opt.state[net.body.weight], opt.param_groups[0]
    bc2 = 1 - group["betas"][1] ** float(state["step"])
    rates = group["lr"] / (state["exp_avg_sq"].double() / bc2).sqrt().add(group["eps"])
    assert h.num == 64 == rates.numel()
    assert h.min == pytest.approx(rates.min().log10().item(), abs=1e-5)
    assert h.max == pytest.approx(rates.max().log10().item(), abs=1e-5)


@pytest.mark.parametrize("kwargs, match", [({"log_every_n_steps": 0}, "log_every_n_steps"),
                                           ({"per_parameter": False, "per_group": False}, "per_parameter")])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EffectiveLRMonitor(**kwargs)


def test_a_cpu_run_says_nothing_of_the_gpu_kernel(tmp_path, caplog):
    """On a CPU the eager pass is the statistics pass, not a fallback: nothing to say (test_gpu.py checks the
    message a GPU run without the Triton pass gives)."""
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        make_trainer(CSVLogger(tmp_path), [EffectiveLRMonitor()], max_steps=2, log_every_n_steps=1).fit(
            Net(CONFIGS["adam"]), loader())
    assert not [r for r in caplog.records if "Triton" in r.getMessage()]


@pytest.mark.parametrize("config", ["adafactor", "centered_rmsprop"])
def test_formulas_that_compute_their_root_take_the_fused_pass_staged(tmp_path, caplog, monkeypatch, config):
    """Adafactor's factored second moment and centered RMSprop's ``sq - avg**2`` are not stored: the fused pass
    (here the CPU, under Triton's interpreter) stages them through a scratch buffer, and logs what the eager pass
    logs (min, max and median exactly, the mean summed in another order), with nothing said."""
    make_opt = {"adafactor": lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-2),
                "centered_rmsprop": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3, centered=True)}[config]
    logged = {}
    for name in ("eager", "triton"):
        if name == "triton":  # staged, not sent to the eager pass
            monkeypatch.setattr(el, "_eager_rate_statistics", lambda *a: pytest.fail("the eager pass ran"))
        with statistics_pass_of(name, monkeypatch), caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            torch.manual_seed(0)
            make_trainer(CSVLogger(tmp_path / name), [EffectiveLRMonitor(per_parameter=True)], max_steps=4,
                         log_every_n_steps=2).fit(Net(make_opt), loader())
        logged[name] = read_metrics(str(tmp_path / name))
    assert not [r for r in caplog.records if "EffectiveLRMonitor:" in r.getMessage()]  # nothing to say of the pass
    keys = [k for k in logged["eager"][3] if k.startswith("effective_lr/")]
    assert len(keys) == 4 * 5  # 4 parameters and the group, 4 statistics each
    for step in (1, 3):
        for k in keys:
            rel = 1e-6 if k.endswith("/mean") else 0
            assert logged["triton"][step][k] == pytest.approx(logged["eager"][step][k], rel=rel, abs=0), (step, k)


def test_a_group_the_fused_kernel_cannot_take_is_said_once(tmp_path, caplog, monkeypatch):
    """Where the fused pass runs (here the CPU, under Triton's interpreter), a group whose formula gives a scale it
    cannot read (an int64 tensor) takes the eager pass: a GPU user is told so once per group, at its first logging
    step, with the count of such parameters."""
    from lightning_wd.optimizers import OptimizerRule, register_optimizer
    from lightning_wd.rates import Formula, root_rate

    class IntScaleAdam(torch.optim.Adam):
        pass

    def int_scale_rate(state, group, param):
        return root_rate(state["exp_avg_sq"], torch.tensor(1), group["eps"]) if "exp_avg_sq" in state else None

    register_optimizer(IntScaleAdam, OptimizerRule(own="coupled", effective_lr=Formula(int_scale_rate)))
    with statistics_pass_of("triton", monkeypatch), caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        make_trainer(CSVLogger(tmp_path), [EffectiveLRMonitor()], max_steps=3, log_every_n_steps=1).fit(
            Net(lambda m: IntScaleAdam(m.parameters(), lr=1e-2)), loader())
    said = [r.getMessage() for r in caplog.records if "cannot take the rates" in r.getMessage()]
    assert len(said) == 1, said  # three logging steps, one group: said once
    assert "4 of the 4 parameters of IntScaleAdam/pg1" in said[0] and "log_every_n_steps" in said[0]


def test_a_group_on_several_devices_is_said_once(caplog, monkeypatch):
    """The kernels work on one device per call: a group whose parameters a user spread over two GPUs by hand takes
    the eager pass, and is told so once, with the reason (not a scale the kernel cannot read)."""
    import lightning_wd.effective_lr_monitor as elm

    monkeypatch.setattr(elm, "fused_kernel_available", lambda device=None: True)
    monkeypatch.setattr(elm, "fused_kernel_takes", lambda spec: True)
    specs = [SimpleNamespace(device=torch.device("cuda", i)) for i in (0, 1, 1)]
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    monitor = EffectiveLRMonitor()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        for _ in range(2):
            monitor._say_if_eager(opt, 0, specs)
    said = [r.getMessage() for r in caplog.records if "EffectiveLRMonitor:" in r.getMessage()]
    assert len(said) == 1, said
    assert "3 parameters of Adam/pg1 are on 2 devices" in said[0], said[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        EffectiveLRMonitor()._say_if_eager(opt, 0, specs[1:])  # one device, every spec taken: nothing to say
    assert not [r for r in caplog.records if "EffectiveLRMonitor:" in r.getMessage()]
