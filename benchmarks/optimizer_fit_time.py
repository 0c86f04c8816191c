"""``Trainer.fit`` step time with WeightDecay on other optimizers, against the same optimizer's own decay.

For each optimizer: its own ``weight_decay`` alone (the reference), then ``WeightDecay`` in the mode the optimizer
implements itself (native handoff: its own kernel, so the goal is <= 1.01x), and in a mode it does not (the separate
pass; e.g. decoupled on SGD, compared with SGD's own L2, which is other math of about the same cost). Same
optimizer-bound model as ``fit_time.py`` (Muon on narrower layers: its Newton-Schulz iterations are matmuls), every
configuration in the same process, shuffled per round, median of per-round ratios.

    OMP_NUM_THREADS=1 python benchmarks/optimizer_fit_time.py --rounds 5     # --quick for a short run
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import tempfile
import warnings

import torch
from _common import fit_wide
from fit_time import StepTimer

from lightning_wd import WeightDecay


def optimizers() -> dict[str, tuple[callable, int, list[tuple[str, str]]]]:
    """name -> (factory, width, [(label, mode), ...]); the first label is the optimizer alone."""
    lion = importlib.import_module("pytorch_optimizer").Lion
    return {
        "Lion (pytorch_optimizer)": (lambda p: lion(p, lr=1e-4, weight_decay=0.1), 1024,
                                     [("own", None), ("WeightDecay('decoupled') [native]", "decoupled"),
                                      ("WeightDecay('coupled') [generic]", "coupled")]),
        "Muon (torch)": (lambda p: torch.optim.Muon([q for q in p if q.ndim == 2], lr=1e-3, weight_decay=0.1), 256,
                         [("own", None), ("WeightDecay('decoupled') [native]", "decoupled"),
                          ("WeightDecay('coupled') [generic]", "coupled")]),
        "NAdam (torch, foreach)": (lambda p: torch.optim.NAdam(p, lr=1e-4, weight_decay=0.01, foreach=True), 1024,
                                   [("own", None), ("WeightDecay('coupled') [native]", "coupled"),
                                    ("WeightDecay('decoupled') [native switch]", "decoupled")]),
        "Adafactor (torch)": (lambda p: torch.optim.Adafactor(p, lr=1e-3, weight_decay=0.01), 1024,
                              [("own", None), ("WeightDecay('decoupled') [native]", "decoupled"),
                               ("WeightDecay('coupled') [generic]", "coupled")]),
        "SGD (torch, momentum, foreach)": (
            lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, weight_decay=1e-4, foreach=True), 1024,
            [("own", None), ("WeightDecay('coupled') [native]", "coupled"),
             ("WeightDecay('decoupled') [generic]", "decoupled")]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 30 steps")
    ap.add_argument("--only", nargs="+", default=[], metavar="TEXT", help="optimizers whose name contains these")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 30
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"device={args.device} {args.depth} x Linear(width), batch 4, {args.steps} steps ({args.warmup} warm-up),"
          f" {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as log_dir:
        for name, (make, width, variants) in optimizers().items():
            if args.only and not any(t in name for t in args.only):
                continue
            times: dict[str, list[float]] = {label: [] for label, _ in variants}
            for r in range(args.rounds):
                order = list(variants)
                random.Random(r).shuffle(order)
                for label, mode in order:
                    timer = StepTimer(args.warmup)
                    callbacks = [WeightDecay(mode)] if mode else []
                    fit_wide(make, [*callbacks, timer], args.device, args.steps, width, args.depth, log_dir)
                    times[label].append(timer.mean_step)
            n = width * (width + 1) * args.depth
            print(f"\n{name}: {args.depth} x Linear({width}) = {n:,} params")
            own = times["own"]
            for label, _ in variants:
                ratio = statistics.median(t / o for t, o in zip(times[label], own))
                print(f"  {label:42s} {statistics.median(times[label]) * 1e3:8.2f} ms/step  {ratio:6.3f}x own")


if __name__ == "__main__":
    main()
