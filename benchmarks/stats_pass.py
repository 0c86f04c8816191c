"""EffectiveLRMonitor's statistics pass (``lightning_wd.effective_lr.rate_statistics``): the eager torch pass and,
on a CUDA GPU with Triton, the fused Triton pass, on the same states, in the same run.

Prints, on one device:
1. the pass over the second moments of a fused AdamW's 8 x Linear(1024) right after its step, ms per million
   elements, each pass as a ratio to the eager one;
2. the fixed cost per parameter: a param group of 2,000 parameters of 4,096 elements.

    OMP_NUM_THREADS=1 python benchmarks/stats_pass.py          # CPU: the eager pass alone
    PYTHONPATH=src python benchmarks/stats_pass.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from _common import interleaved_medians

import lightning_wd.effective_lr as el
from lightning_wd.optimizers.torch_rates import adam_rate
from lightning_wd.rates import RateSpec


def adam_specs(params: list[torch.nn.Parameter], steps: int = 2) -> list[RateSpec]:
    """The rate specs of a fused AdamW over ``params`` after ``steps`` steps."""
    opt = torch.optim.AdamW(params, lr=1e-4, fused=params[0].is_cuda)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p) * 10 ** torch.randn_like(p)
        opt.step()
    group = opt.param_groups[0]
    return [adam_rate(opt.state[p], group, p) for p in params]


def passes(device: torch.device) -> dict[str, contextlib.AbstractContextManager]:
    found = {"eager": el.fused_kernel_disabled}
    if el.fused_kernel_available(device):
        found["triton"] = contextlib.nullcontext
    return found


def time_passes(specs: list[RateSpec], device: torch.device, repeats: int) -> dict[str, float]:
    def run(context) -> None:
        with context():
            el.rate_statistics(specs)

    return interleaved_medians({name: lambda c=c: run(c) for name, c in passes(device).items()}, repeats, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    big = [torch.nn.Parameter(torch.randn(1024, 1024, device=device)) for _ in range(8)]
    n = sum(p.numel() for p in big)
    times = time_passes(adam_specs(big), device, args.repeats)
    print(f"device={device}: {len(big)} x 1M second moments of AdamW")
    for name, t in times.items():
        print(f"  {name:7s} {t * 1e3 / (n / 1e6):8.3f} ms per million  ({t / times['eager']:.3f} of the eager pass)")
    small = [torch.nn.Parameter(torch.randn(4096, device=device)) for _ in range(2000)]
    times = time_passes(adam_specs(small), device, max(2, args.repeats // 5))
    print(f"device={device}: 2,000 parameters of 4,096 elements")
    for name, t in times.items():
        print(f"  {name:7s} {t * 1e6 / 2000:8.1f} us per parameter  ({t / times['eager']:.3f} of the eager pass)")


if __name__ == "__main__":
    main()
