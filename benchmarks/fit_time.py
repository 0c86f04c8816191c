"""``Trainer.fit`` step time on an optimizer-bound model: Adam + WeightDecay against AdamW, foreach and fused.

The model is a stack of wide ``Linear`` layers fed a batch of 4, so the optimizer's passes over the weights, not the
matmuls, dominate a step. Every configuration runs in the same process, several rounds, in a shuffled order per
round. The reported number is each configuration's mean step time (after warm-up steps) as a ratio to its reference
with the same implementation (foreach or fused): AdamW for decoupled decay and the monitor, Adam's own L2 for coupled
decay; median over the rounds. With the default 110 steps (100 timed), the monitor's default interval of 50 logs
twice.

    OMP_NUM_THREADS=1 python benchmarks/fit_time.py     # CPU (or --device cuda); --quick for a short run
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from _common import fit_wide
from lightning.pytorch.callbacks import Callback

from lightning_wd import EffectiveLRMonitor, WeightDecay


class StepTimer(Callback):
    """Mean wall time of the training steps after ``warmup`` steps (device-synchronized)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    @property
    def mean_step(self) -> float:
        s = self.stamps[self.warmup :]
        return (s[-1] - s[0]) / (len(s) - 1)


def configs(fused: bool) -> dict[str, tuple[Callable, list[Callable[[], Callback]], str]]:
    """name -> (optimizer factory, callback factories, name of the configuration it is compared with)."""
    impl = {"fused": True} if fused else {"foreach": True}
    tag = "fused" if fused else "foreach"
    adamw = lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01, **impl)  # noqa: E731
    adam = lambda p: torch.optim.Adam(p, lr=1e-4, weight_decay=0.01, **impl)  # noqa: E731
    ref_w, ref_l2 = f"AdamW({tag})", f"Adam({tag}, weight_decay) [L2]"
    return {
        ref_w: (adamw, [], ref_w),
        f"Adam({tag}) + WeightDecay": (adam, [lambda: WeightDecay()], ref_w),
        f"Adam({tag}) + WeightDecay(native=False)": (adam, [lambda: WeightDecay(native=False)], ref_w),
        ref_l2: (adam, [], ref_l2),
        f"AdamW({tag}) + WeightDecay(mode='coupled')": (adamw, [lambda: WeightDecay(mode="coupled")], ref_l2),
        f"AdamW({tag}) + EffectiveLRMonitor (every 50)": (adamw, [lambda: EffectiveLRMonitor()], ref_w),
        f"AdamW({tag}) + EffectiveLRMonitor (every step)": (
            adamw, [lambda: EffectiveLRMonitor(log_every_n_steps=1)], ref_w
        ),
    }


def run(make_opt, callbacks, args, log_dir: str) -> float:
    timer = StepTimer(args.warmup)
    fit_wide(make_opt, [*(c() for c in callbacks), timer], args.device, args.steps, args.width, args.depth, log_dir)
    return timer.mean_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--steps", type=int, default=110)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 60 steps")
    ap.add_argument("--only", nargs="+", default=[], metavar="TEXT",
                    help="run only the configurations whose name contains one of these (and their references)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 3, 60
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    n = args.width * (args.width + 1) * args.depth
    print(f"device={args.device} model={args.depth}x Linear({args.width}) = {n:,} params, batch 4, "
          f"{args.steps} steps ({args.warmup} warm-up), {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as log_dir:
        for fused in (False, True):
            cfgs = configs(fused)
            if args.only:
                keep = {n for n in cfgs if any(t in n for t in args.only)}
                keep |= {cfgs[n][2] for n in keep}
                cfgs = {n: c for n, c in cfgs.items() if n in keep}
            times: dict[str, list[float]] = {k: [] for k in cfgs}
            for r in range(args.rounds):
                order = list(cfgs)
                random.Random(r).shuffle(order)  # no configuration always runs first, or after the slowest one
                for name in order:
                    make_opt, cbs, _ = cfgs[name]
                    times[name].append(run(make_opt, cbs, args, log_dir))
            print(f"\n{'configuration':48s} {'ms/step':>8s} {'ratio':>6s}  to")
            for name, (_, _, ref) in cfgs.items():
                ratio = statistics.median(t / r for t, r in zip(times[name], times[ref]))
                print(f"{name:48s} {statistics.median(times[name]) * 1e3:8.2f} {ratio:6.3f}  {ref}")


if __name__ == "__main__":
    main()
