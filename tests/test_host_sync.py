"""No host read on a non-logging step: the CPU stand-in for CUDA's sync check.

On a GPU, reading a device tensor on the host (``.item()``, ``float(t)``, ``bool(t)``) stalls until the device
catches up. ``aten._local_scalar_dense`` is the op every such read goes through, on any device, so counting it on
the CPU finds the reads that a CUDA run would sync on. torch's own CPU optimizers read their step counter that way,
so each run is compared with the same run without lightning_wd: on steps that do not log, the callbacks must add no
read at all.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import make_loader, tiny_module, trainer
from lightning.pytorch.loggers import CSVLogger
from torch.optim import SGD, Adam
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_wd import EffectiveLRMonitor, WeightDecay


class HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class CountDuringSteps(pl.Callback):
    """Counts the host reads from the start to the end of every training batch (forward, backward, the optimizer
    step and every hook of the callbacks in between); fit start, where the callbacks check their set-up, is not
    counted."""

    def __init__(self) -> None:
        self.mode = HostReads()

    def on_train_batch_start(self, *args) -> None:
        self.mode.__enter__()

    def on_train_batch_end(self, *args) -> None:
        self.mode.__exit__(None, None, None)


def host_reads(make_opt, callbacks, logger=False) -> int:
    counter = CountDuringSteps()
    t = trainer([*callbacks, counter], max_steps=6, log_every_n_steps=1000, logger=logger)  # no step logs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(tiny_module(make_opt), make_loader())
    return counter.mode.count


def adam(lr=1e-2):
    return lambda m: Adam(m.parameters(), lr=lr, weight_decay=0.1)


CONFIGS = {
    "decoupled (native)": (adam(), dict()),
    "decoupled (generic)": (adam(), dict(native=False)),
    "coupled on SGD (generic)": (lambda m: SGD(m.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1),
                                 dict(mode="coupled", native=False)),
    "independent": (adam(), dict(mode="independent")),
    "corrected with a schedule": (adam(), dict(mode="corrected", schedule="cosine", weight_decay_end=0.4)),
    "cautious": (adam(), dict(cautious=True)),
    "independent, tensor lr": (adam(torch.tensor(1e-2)), dict(mode="independent", native=False)),
    "excluded biases, logging on": (adam(), dict(exclude=["*.bias"], log_weight_decay=True)),
    "tensor weight_decay, coupled (native)": (
        lambda m: SGD(m.parameters(), lr=1e-2, weight_decay=torch.tensor(0.1)), dict(mode="coupled")),
    "tensor weight_decay, decoupled (generic)": (
        lambda m: SGD(m.parameters(), lr=1e-2, weight_decay=torch.tensor(0.1)), dict()),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_weight_decay_adds_no_host_read_on_a_step(name):
    make_opt, kwargs = CONFIGS[name]
    reference = host_reads(make_opt, [])
    # no more than the optimizer alone (fewer where the step takes the decay over from an optimizer that reads its
    # own tensor weight_decay on the host: SGD's `weight_decay != 0`)
    assert host_reads(make_opt, [WeightDecay(**kwargs)]) <= reference


def test_the_monitor_adds_no_host_read_on_a_non_logging_step(tmp_path):
    logger = CSVLogger(tmp_path)
    reference = host_reads(adam(), [], logger)
    assert reference > 0  # the count sees host reads: Adam's own, of its step counter on the CPU
    assert host_reads(adam(), [EffectiveLRMonitor()], logger) == reference
