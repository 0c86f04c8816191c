"""What EffectiveLRMonitor costs per logging step, and so at any interval, measured step by step in ``Trainer.fit``.

Two fit-time totals that differ by ~1% cannot be told apart on a noisy machine, so this script times every step: in
the same fit, the monitor's logging steps against its other steps (the extra milliseconds of a logging step), and, in
interleaved fits, its other steps against AdamW without the monitor (what a non-logging step costs, which should be
nothing). The cost at an interval ``N`` is then ``extra / (N * step)``. The model is fit_time.py's optimizer-bound
stack of ``Linear`` layers, the monitor's worst case: its step does little but the optimizer's passes, which the
monitor's statistics match in size.

On a CUDA GPU with Triton, each round also fits the monitor with its eager torch pass (the pass of every other
device), so that the two passes are compared in the same run.

    OMP_NUM_THREADS=1 python benchmarks/monitor_cost.py     # CPU (or --device cuda)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings

import torch
from _common import fit_wide
from lightning.pytorch.callbacks import Callback

import lightning_wd.effective_lr as el
from lightning_wd import EffectiveLRMonitor


class StepTimes(Callback):
    """The wall time of every training step, by its index (device-synchronized)."""

    def __init__(self) -> None:
        self.last = 0.0
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.last)


def fit(fused: bool, every: int | None, args, log_dir: str) -> list[float]:
    timer = StepTimes()
    callbacks = [timer] if every is None else [EffectiveLRMonitor(log_every_n_steps=every), timer]
    impl = {"fused": True} if fused else {"foreach": True}
    make_opt = lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01, **impl)  # noqa: E731
    fit_wide(make_opt, callbacks, args.device, args.steps, args.width, args.depth, log_dir)
    return timer.times[args.warmup :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--steps", type=int, default=210)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--every", type=int, default=5, help="the monitor's interval in the timed fits")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    n = args.width * (args.width + 1) * args.depth
    print(f"device={args.device} model={args.depth}x Linear({args.width}) = {n:,} params, batch 4, "
          f"{args.steps} steps ({args.warmup} warm-up), monitor every {args.every} steps, {args.rounds} rounds")
    print(f"\n{'optimizer, statistics pass':32s} {'AdamW ms':>9s} {'non-log ms':>10s} {'vs AdamW':>8s} "
          f"{'log-step extra ms':>17s} {'every step':>10s} {'every 50':>8s}")
    passes = ["eager pass"]
    if el.fused_kernel_available(args.device):
        passes.insert(0, "fused Triton pass")
    with tempfile.TemporaryDirectory() as log_dir:
        for fused in (False, True):
            ref: list[float] = []
            plain: dict[str, list[float]] = {p: [] for p in passes}
            logging_: dict[str, list[float]] = {p: [] for p in passes}
            for _ in range(args.rounds):
                ref += fit(fused, None, args, log_dir)
                for p in passes:
                    with el.fused_kernel_disabled() if p == "eager pass" else contextlib.nullcontext():
                        times = fit(fused, args.every, args, log_dir)
                    # step i (counted from 0 before the warm-up cut) logs when (i + 1) % every == 0
                    for i, t in enumerate(times, start=args.warmup):
                        (logging_[p] if (i + 1) % args.every == 0 else plain[p]).append(t)
            base = statistics.median(ref)
            for p in passes:
                step = statistics.median(plain[p])
                extra = statistics.median(logging_[p]) - step
                name = f"{'AdamW(fused)' if fused else 'AdamW(foreach)'}, {p}"
                print(f"{name:32s} {base * 1e3:9.2f} {step * 1e3:10.2f} {step / base:8.3f} {extra * 1e3:17.2f} "
                      f"{1 + extra / base:9.2f}x {extra / (50 * base):8.2%}")
    print("\nevery step: the step time with a logging step on each step, as a multiple of AdamW's;"
          " every 50: the share of fit time the monitor adds at its default interval (extra / (50 x AdamW step)).")


if __name__ == "__main__":
    main()
