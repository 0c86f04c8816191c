"""Bandwidth of the decay pass over a transformer's parameter list, against one ``mul_`` over a flat tensor.

The decay reads and writes every weight once: it is bound by memory bandwidth, and a single ``mul_`` over one flat
tensor of the same size is that bound. Reported as a ratio measured in the same run.

    python benchmarks/decay_pass.py                 # CPU (or --device cuda)
"""

from __future__ import annotations

import argparse

import torch
from _common import gpt2_small_shapes, interleaved_medians

from lightning_wd.decay import decay_weights_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    params = [torch.randn(s, device=device, dtype=dtype) for s in gpt2_small_shapes()]
    numel = sum(p.numel() for p in params)
    flat = torch.randn(numel, device=device, dtype=dtype)
    bytes_moved = 2 * numel * flat.element_size()  # one read and one write per element

    fns = {
        "flat mul_ (bound)": lambda: flat.mul_(1 - 1e-7),
        "decay_weights_ (foreach)": lambda: decay_weights_(params, 1e-3, 1e-4),
        "per-tensor mul_ loop": lambda: [p.mul_(1 - 1e-7) for p in params],
    }
    if device.type == "cuda":
        copy_dst = torch.empty_like(flat)
        fns["flat copy_ (card's copy bandwidth)"] = lambda: copy_dst.copy_(flat)
    t = interleaved_medians(fns, args.repeats, device)
    print(f"device={device} dtype={dtype} params={len(params)} tensors, {numel / 1e6:.1f}M elements")
    print(f"{'pass':36s} {'ms':>8s} {'GB/s':>8s} {'speed vs flat mul_':>20s}")
    base = t["flat mul_ (bound)"]
    for name, sec in t.items():
        print(f"{name:36s} {sec * 1e3:8.2f} {bytes_moved / sec / 1e9:8.1f} {base / sec:19.1%}")


if __name__ == "__main__":
    main()
