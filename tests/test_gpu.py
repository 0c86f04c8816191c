"""CUDA: the same equivalences as on CPU, no host-device sync on a training step, batched kernel launches.

Skipped without CUDA (CI has none); run them on a CUDA machine: ``python -m pytest -q tests/test_gpu.py``.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import Recording
from torch.utils.data import DataLoader, TensorDataset

from lightning_wd import EffectiveLRMonitor, WeightDecay, WeightNormMonitor, attach_weight_decay
from lightning_wd.decay import decay_weights_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def loop(make_opt, mode=None, native=True, steps=10, scaler=None, inf_at=(), before_step=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()
    opt = make_opt(model.parameters())
    if mode:
        attach_weight_decay(opt, mode=mode, native=native)
    g = torch.Generator(device="cuda").manual_seed(1)
    for i in range(steps):
        x = torch.randn(16, 32, device="cuda", generator=g)
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16, enabled=scaler is not None):
            loss = model(x).float().pow(2).mean() * (float("inf") if i in inf_at else 1.0)
        if scaler is None:
            loss.backward()
            if before_step is not None:
                with torch.no_grad():
                    before_step(model)
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


IMPLS = pytest.mark.parametrize("impl", [{"foreach": True}, {"fused": True}], ids=["foreach", "fused"])
NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "generic"])


@IMPLS
@NATIVE
def test_cuda_decoupled_is_adamw(impl, native):
    ours = loop(lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, **impl), "decoupled", native)
    ref = loop(lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, **impl))
    if "foreach" in impl or native:
        assert torch.equal(ours, ref)
    else:  # a separate decay pass before the fused kernel: the kernel's own decay rounds in its own order
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


@IMPLS
@NATIVE
def test_cuda_coupled_is_adam_l2(impl, native):
    ours = loop(lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, **impl), "coupled", native)
    ref = loop(lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, **impl))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


@IMPLS
@NATIVE
def test_cuda_16_mixed_skipped_step_is_not_decayed(impl, native):
    make = lambda cls: lambda p: cls(p, lr=0.01, weight_decay=0.1, **impl)  # noqa: E731
    ours = loop(make(torch.optim.Adam), "decoupled", native, scaler=torch.amp.GradScaler("cuda"), inf_at=(3,))
    ref = loop(make(torch.optim.AdamW), scaler=torch.amp.GradScaler("cuda"), inf_at=(3,))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


class Tiny(L.LightningModule):
    def __init__(self, cls, **opt_kwargs) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initial weights for every run compared, whatever ran before
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
        self.cls, self.opt_kwargs = cls, opt_kwargs

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).float().pow(2).mean()

    def configure_optimizers(self):
        return self.cls(self.parameters(), lr=0.01, weight_decay=0.1, **self.opt_kwargs)


def fit(module, precision="32-true", callbacks=(), strategy="auto", steps=8, sync_check=False):
    class SyncCheck(L.Callback):
        """Turns any host-device sync into an error from after backward to the batch's end: the window in which
        both callbacks work (decay, optimizer step hooks, the monitor's step hook)."""

        def on_before_optimizer_step(self, trainer, *args):
            if trainer.global_step >= 2:  # after the first steps, which initialise the optimizer state
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, *args):
            torch.cuda.set_sync_debug_mode(0)

    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cuda", devices=1, precision=precision, strategy=strategy, max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[*callbacks, *([SyncCheck()] if sync_check else [])])
    data = DataLoader(TensorDataset(torch.randn(8 * steps, 32)), batch_size=8)
    try:
        trainer.fit(module, data)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return torch.cat([p.detach().float().flatten().cpu() for p in module.parameters()])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_cuda_trainer_decoupled_is_adamw(precision):
    ours = fit(Tiny(torch.optim.Adam, foreach=True), precision, [WeightDecay()])
    ref = fit(Tiny(torch.optim.AdamW, foreach=True), precision)
    assert torch.equal(ours, ref)


def test_fsdp1_single_gpu_decoupled_is_adamw():
    ours = fit(Tiny(torch.optim.Adam), callbacks=[WeightDecay(native=False)], strategy="fsdp")
    ref = fit(Tiny(torch.optim.AdamW), strategy="fsdp")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("native", [True, False])
def test_no_host_sync_on_non_logging_steps(native):
    """``set_sync_debug_mode("error")`` from batch start through the optimizer step: the callbacks never sync."""
    fit(Tiny(torch.optim.Adam, foreach=True), callbacks=[WeightDecay(native=native),
                                                        EffectiveLRMonitor(log_every_n_steps=1000)], sync_check=True)


def test_decay_pass_is_batched_into_few_kernel_launches():
    params = [torch.randn(64, 64, device="cuda") for _ in range(200)]
    decay_weights_(params, 1e-3, 0.1)  # warm-up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decay_weights_(params, 1e-3, 0.1)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # foreach kernels take a bounded number of tensors per launch (a few dozen); one launch per tensor would be 200
    assert 1 <= len(kernels) <= 10, [k.name for k in kernels]


@pytest.mark.parametrize("impl", [{"foreach": True}, {"fused": True}, {"capturable": True}], ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_cuda_monitor_statistics_match_the_cpu_and_do_not_sync(impl, amsgrad):
    """The accelerator path of the statistics (``index_add_`` into fixed bins, a device-side step for fused and
    capturable Adam, chunks, the summary) gives the CPU's, without a host-device sync."""
    import dataclasses

    import lightning_wd.effective_lr as el
    from lightning_wd.optimizers.torch_rates import adam_rate
    from lightning_wd.rates import root_fill

    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=amsgrad, **impl)
    for _ in range(3):
        model(torch.randn(8, 256, device="cuda")).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    group = opt.param_groups[0]
    for p in group["params"]:
        state = opt.state[p]
        torch.cuda.set_sync_debug_mode("error")
        try:
            spec = adam_rate(state, group, p)
            gpu = el.empty_partials(1, p.device)
            el.accumulate_partials(spec, gpu.ext[0], gpu.sums[0], el.make_scratch(1000, p.device))  # several chunks
            gpu_stats = el.summarize_partials(*gpu)
            whole_stats = el.rate_statistics([spec])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        # the same scalars and the same v on the CPU, summarized by the bincount path, whole
        v = state["max_exp_avg_sq" if amsgrad else "exp_avg_sq"].cpu()
        def on_cpu(x):
            return x.cpu() if isinstance(x, torch.Tensor) else x

        cpu_spec = dataclasses.replace(spec, scale=on_cpu(spec.scale), eps=on_cpu(spec.eps),
                                       device=torch.device("cpu"), fill=root_fill(v))
        cpu = el.empty_partials(1, torch.device("cpu"))
        el.accumulate_partials(cpu_spec, cpu.ext[0], cpu.sums[0], el.make_scratch(v.numel(), torch.device("cpu")))
        assert torch.equal(gpu.ext.cpu(), cpu.ext) and torch.equal(gpu.sums[:, 1:].cpu(), cpu.sums[:, 1:])
        torch.testing.assert_close(gpu.sums[:, 0].cpu(), cpu.sums[:, 0])  # a sum in another order
        cpu_stats = el.summarize_partials(*cpu)
        assert torch.equal(gpu_stats.cpu()[:, [0, 1, 3]], cpu_stats[:, [0, 1, 3]])
        assert torch.equal(whole_stats[0].cpu()[[0, 1, 3]], cpu_stats[0, [0, 1, 3]])


LOW_BIT = {
    # name: (package, factory of the optimizer with its own decoupled decay)
    "bitsandbytes AdamW8bit": ("bitsandbytes", lambda p, wd: __import__("bitsandbytes").optim.AdamW8bit(
        p, lr=0.01, weight_decay=wd, min_8bit_size=1)),
    "bitsandbytes PagedAdamW8bit": ("bitsandbytes", lambda p, wd: __import__("bitsandbytes").optim.PagedAdamW8bit(
        p, lr=0.01, weight_decay=wd, min_8bit_size=1)),
    "torchao AdamW8bit": ("torchao.optim", lambda p, wd: __import__("torchao.optim").optim.AdamW8bit(
        p, lr=0.01, weight_decay=wd, block_size=64)),
    "torchao AdamW4bit": ("torchao.optim", lambda p, wd: __import__("torchao.optim").optim.AdamW4bit(
        p, lr=0.01, weight_decay=wd, block_size=64)),
}


@pytest.mark.parametrize("name", list(LOW_BIT))
def test_cuda_low_bit_optimizers_decoupled_native_and_coupled_adapted(name):
    """The CUDA kernels of the 8-bit/4-bit optimizers: decoupled mode hands them their own decay (the result is the
    optimizer alone); coupled mode adds L2 before their step (the result is a hand-written L2 loop)."""
    package, make = LOW_BIT[name]
    pytest.importorskip(package)
    ours = loop(lambda p: make(p, 0.1), "decoupled")
    assert torch.equal(ours, loop(lambda p: make(p, 0.1)))
    coupled = loop(lambda p: make(p, 0.1), "coupled")

    def l2(model):
        for p in model.parameters():
            p.grad.add_(p, alpha=0.1)

    assert torch.equal(coupled, loop(lambda p: make(p, 0.0), before_step=l2))
    assert not torch.equal(coupled, ours)


def logged_fit(callbacks, steps=6, sync_check=False, cls=torch.optim.AdamW, opt_kwargs=None):
    logger = Recording()
    module = Tiny(cls, **(opt_kwargs if opt_kwargs is not None else {"foreach": True}))
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cuda", devices=1, max_steps=steps, logger=logger, log_every_n_steps=2,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)
    data = DataLoader(TensorDataset(torch.randn(8 * steps, 32)), batch_size=8)
    trainer.fit(module, data)
    return {k: v for _, m in logger.calls for k, v in m.items() if k.startswith("effective_lr/")}


def assert_same_statistics(fused, eager):
    """The Triton pass's logged statistics against the eager pass's on the same GPU: min, max and median bit for bit
    (the same correctly rounded rates, the same bins), the mean up to the order of the sums. Four parameters, their
    module and the group, four statistics each."""
    assert fused.keys() == eager.keys() and len(fused) == (4 + 1 + 1) * 4
    for key, value in fused.items():
        if key.endswith("/mean"):
            assert value == pytest.approx(eager[key], rel=1e-6), key
        else:
            assert value == eager[key], key


def test_cuda_monitor_triton_pass_equals_the_eager_pass():
    """The Triton kernels give the eager torch pass's statistics on the same GPU: min, max and median bit for bit
    (the same correctly rounded rates, the same bins), the mean up to the order of the sums."""
    import lightning_wd.effective_lr as el

    assert el.fused_kernel_available("cuda")
    monitor = lambda: EffectiveLRMonitor(per_parameter=True, per_module=1)  # noqa: E731
    fused = logged_fit([monitor()])
    with el.fused_kernel_disabled():
        eager = logged_fit([monitor()])
    assert_same_statistics(fused, eager)


STAGED = {"Adafactor": (torch.optim.Adafactor, {}), "RMSprop centered": (torch.optim.RMSprop, {"centered": True}),
          "RAdam capturable": (torch.optim.RAdam, {"capturable": True})}


@pytest.mark.parametrize("name", list(STAGED))
def test_cuda_staged_formulas_take_the_triton_pass_and_equal_the_eager_pass(name, monkeypatch):
    """Formulas that compute their root from the state (not stored, so not read as stored) are staged through a
    scratch buffer into the same kernels: the eager pass's statistics, as for Adam above, and the eager pass does
    not run."""
    import lightning_wd.effective_lr as el

    cls, kwargs = STAGED[name]
    monitor = lambda: EffectiveLRMonitor(per_parameter=True, per_module=1)  # noqa: E731
    with el.fused_kernel_disabled():
        eager = logged_fit([monitor()], cls=cls, opt_kwargs=kwargs)
    monkeypatch.setattr(el, "_eager_rate_statistics", lambda *a: pytest.fail("the eager pass ran"))
    fused = logged_fit([monitor()], cls=cls, opt_kwargs=kwargs)
    assert_same_statistics(fused, eager)


@pytest.mark.parametrize("name", ["AdamW", "RMSprop centered", "RAdam capturable"])
def test_cuda_logging_steps_do_not_sync_before_the_batch_end(name):
    """Both monitors logging at every step: no host-device sync from after backward until the batch's end, where
    the one transfer of each monitor happens (the sync check is lifted by a callback listed before them); with
    AdamW, and with two optimizers whose rates are staged into the Triton pass (their fills run on the device)."""
    cls, kwargs = (torch.optim.AdamW, None) if name == "AdamW" else STAGED[name]

    class SyncCheck(L.Callback):
        def on_before_optimizer_step(self, trainer, *args):
            if trainer.global_step >= 2:
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, *args):
            torch.cuda.set_sync_debug_mode(0)

    try:
        logged_fit([SyncCheck(), WeightDecay(), EffectiveLRMonitor(log_every_n_steps=1, per_parameter=True),
                    WeightNormMonitor(log_every_n_steps=1, per_parameter=True)], cls=cls, opt_kwargs=kwargs)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_without_the_triton_pass_the_monitor_says_so_once(caplog):
    import logging

    import lightning_wd.effective_lr as el

    with el.fused_kernel_disabled(), caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        logged_fit([EffectiveLRMonitor()])
    said = [r for r in caplog.records if "Triton" in r.getMessage()]
    assert len(said) == 1 and "switched off" in said[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        logged_fit([EffectiveLRMonitor()])
    assert not [r for r in caplog.records if "Triton" in r.getMessage()]
