"""The engine's own cost per ``optimizer.step()``: a step with ``attach_weight_decay`` in the mode the optimizer
implements itself (native handoff, nothing to compute) against the same step without it, in microseconds.

A tiny model (so that the step itself is short and the hooks' Python work shows), timed round-robin over many
repeats; the difference of the medians is what the hooks cost per step, whatever the model's size. With a closure
(Lightning's automatic optimization) the closure is wrapped as well.

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _common import interleaved_medians

from lightning_wd import attach_weight_decay


def make_step(make_opt, mode: str | None, closure: bool, groups: int):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, 16) for _ in range(groups)]
    opt = make_opt([{"params": layer.parameters()} for layer in layers])
    for layer in layers:
        for p in layer.parameters():
            p.grad = torch.zeros_like(p)
    if mode is not None:
        attach_weight_decay(opt, mode=mode)

    def step() -> None:
        if closure:
            opt.step(lambda: None)
        else:
            opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2000)
    ap.add_argument("--groups", type=int, default=4, help="param groups (one Linear(16) each)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    optimizers = {
        "AdamW, decoupled": (lambda g: torch.optim.AdamW(g, lr=1e-3, weight_decay=0.1, foreach=True), "decoupled"),
        "Adam, decoupled (switch)": (lambda g: torch.optim.Adam(g, lr=1e-3, weight_decay=0.1, foreach=True),
                                     "decoupled"),
        "SGD, coupled": (lambda g: torch.optim.SGD(g, lr=1e-3, momentum=0.9, weight_decay=0.1, foreach=True),
                         "coupled"),
    }
    print(f"{args.groups} param groups of a Linear(16); median of {args.repeats} steps, interleaved")
    print(f"{'optimizer, mode':28s} {'closure':>7s} {'alone µs':>9s} {'attached µs':>12s} {'hooks µs':>9s}")
    for name, (make_opt, mode) in optimizers.items():
        for closure in (False, True):
            fns = {"alone": make_step(make_opt, None, closure, args.groups),
                   "attached": make_step(make_opt, mode, closure, args.groups)}
            t = interleaved_medians(fns, args.repeats, torch.device("cpu"))
            print(f"{name:28s} {str(closure):>7s} {t['alone'] * 1e6:9.1f} {t['attached'] * 1e6:12.1f}"
                  f" {(t['attached'] - t['alone']) * 1e6:9.1f}")


if __name__ == "__main__":
    main()
