"""The EffectiveLRMonitor's statistics pass (``lightning_wd.effective_lr.partial_stats``) and its alternatives.

Prints, on one device, each as a ratio to the chosen implementation in the same run:
1. the histogram kernels tried for the median, on the same int32 bin indices;
2. the statistics of one large tensor in chunks (the default) against all at once, and the chunk sizes on the
   second moments of a fused AdamW as its step leaves them (in memory, not in cache);
3. where the time of the pass goes, op by op (torch profiler), over several 1M-element second moments;
4. with ``--compile``, a ``torch.compile``d pass that fuses the division, min, max, sum and bin index into one kernel
   (plus the same ``bincount``), against the eager pass; it also prints the compile time.

    OMP_NUM_THREADS=1 python benchmarks/stats_pass.py [--compile]     # CPU (or --device cuda)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import interleaved_medians, sync

import lightning_wd.effective_lr as el


def second_moments(count: int, numel: int, device: torch.device) -> list[torch.Tensor]:
    """Adam-like ``v``: squares of gradients spread over several decades."""
    g = torch.Generator(device=device).manual_seed(0)
    return [(torch.randn(numel, generator=g, device=device) * 10 ** torch.randn(numel, generator=g, device=device))
            .square_().mul_(1e-2) for _ in range(count)]


def bin_indices(v: torch.Tensor) -> torch.Tensor:
    shifted = torch.bitwise_right_shift(v.view(torch.int32), el._SHIFT)
    return shifted.clamp_(el._FIRST_BIN_BITS, el._LAST_BIN_BITS)


def histogram_kernels(v: torch.Tensor, repeats: int) -> None:
    idx = bin_indices(v)
    idx64 = idx.long()
    n_bins = el._LAST_BIN_BITS + 1
    counts = torch.zeros(n_bins, dtype=torch.float64, device=v.device)
    ones = torch.ones((), dtype=torch.float64, device=v.device).expand(idx.shape)
    fns = {
        "bincount (CPU path)": lambda: torch.bincount(idx, minlength=n_bins),
        "index_add_, int32 indices (accelerator path)": lambda: counts.zero_().index_add_(0, idx, ones),
        "scatter_add_, int64 indices": lambda: counts.zero_().scatter_add_(0, idx64, ones),
        "index_put_(accumulate=True)": lambda: counts.zero_().index_put_((idx64,), ones, accumulate=True),
        "histc on the indices as floats": lambda: torch.histc(idx.float(), bins=n_bins, min=0, max=n_bins),
    }
    times = interleaved_medians(fns, repeats, v.device)
    ref = times["bincount (CPU path)"]
    print(f"\n1. histogram of {idx.numel():,} indices into {n_bins:,} bins")
    for name, t in times.items():
        print(f"   {name:46s} {t * 1e3:8.3f} ms  {t / ref:5.2f}x")


def chunks(v: torch.Tensor, repeats: int) -> None:
    whole = (torch.empty(v.numel(), device=v.device), torch.empty(v.numel(), dtype=torch.int32, device=v.device))
    chunked = el.make_scratch(v.numel(), v.device)
    fns = {
        f"in chunks of {chunked[0].numel():,} (the default)": lambda: el.partial_stats(v, 1e-8, 0.9, chunked),
        "all at once, scratch as large as the tensor": lambda: el.partial_stats(v, 1e-8, 0.9, whole),
    }
    times = interleaved_medians(fns, repeats, v.device)
    ref = next(iter(times.values()))
    print(f"\n2. statistics of one {v.numel():,}-element tensor (scratch reused across repeats)")
    for name, t in times.items():
        print(f"   {name:46s} {t * 1e3:8.3f} ms  {t / ref:5.2f}x")


def chunk_sizes(device: torch.device, repeats: int) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    for _ in range(2):
        net(torch.randn(4, 1024, device=device)).pow(2).mean().backward()
        opt.step()
    group = opt.param_groups[0]
    states = [opt.state[p] for p in group["params"]]
    default = el.chunk_elements(device)
    sizes = [default // 4, default // 2, default, default * 2]
    times: dict[int, list[float]] = {c: [] for c in sizes}
    original = el.chunk_elements
    try:
        for _ in range(repeats):
            for c in sizes:
                el.chunk_elements = lambda d, c=c: c  # what make_scratch sizes the buffers by
                scratch = el.make_scratch(1 << 30, device)
                opt.step()  # the second moments as a logging step finds them
                sync(device)
                start = time.perf_counter()
                for state in states:
                    el.adam_partial_stats(state, group, scratch)
                sync(device)
                times[c].append(time.perf_counter() - start)
    finally:
        el.chunk_elements = original
    ref = statistics.median(times[default])
    print("\n   chunk sizes, the 8 x Linear(1024) second moments of a fused AdamW right after its step")
    for c in sizes:
        t = statistics.median(times[c])
        name = f"chunks of {c:,}" + (" (the default)" if c == default else "")
        print(f"   {name:46s} {t * 1e3:8.3f} ms  {t / ref:5.2f}x")


def breakdown(vs: list[torch.Tensor]) -> None:
    scratch = el.make_scratch(vs[0].numel(), vs[0].device)
    for v in vs:  # warm-up
        el.partial_stats(v, 1e-8, 0.9, scratch)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if vs[0].device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for v in vs:
            el.partial_stats(v, 1e-8, 0.9, scratch)
        sync(vs[0].device)
    millions = sum(v.numel() for v in vs) / 1e6
    key = "self_device_time_total" if vs[0].device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    print(f"\n3. where the time goes, {len(vs)} tensors of {vs[0].numel():,} elements ({key}, per million elements)")
    for e in rows[:10]:
        print(f"   {e.key:46s} {getattr(e, key) / 1e3 / millions:8.3f} ms")


def compiled(vs: list[torch.Tensor], repeats: int) -> None:
    n_bins = el._LAST_BIN_BITS + 1

    def fused(v: torch.Tensor, bias_correction2: float, eps: float):
        v_hat = v / bias_correction2
        idx = (v_hat.view(torch.int32) >> el._SHIFT).clamp(el._FIRST_BIN_BITS, el._LAST_BIN_BITS)
        return v_hat.min(), v_hat.max(), (1.0 / (torch.sqrt(v_hat) + eps)).sum(), idx

    start = time.perf_counter()
    fused_c = torch.compile(fused, dynamic=True)
    fused_c(vs[0], 0.9, 1e-8)
    sync(vs[0].device)
    compile_s = time.perf_counter() - start
    scratch = el.make_scratch(vs[0].numel(), vs[0].device)

    def eager() -> None:
        for v in vs:
            el.partial_stats(v, 1e-8, 0.9, scratch)

    def with_compiled() -> None:
        for v in vs:
            idx = fused_c(v, 0.9, 1e-8)[3]
            el._count_bins(idx, torch.zeros(n_bins, dtype=torch.float64, device=v.device))  # the library's histogram

    times = interleaved_medians({"eager partial_stats": eager, "compiled fused pass + histogram": with_compiled},
                                repeats, vs[0].device)
    ref = times["eager partial_stats"]
    print(f"\n4. torch.compile (first call {compile_s:.1f} s), {len(vs)} tensors of {vs[0].numel():,} elements")
    for name, t in times.items():
        print(f"   {name:46s} {t * 1e3:8.3f} ms  {t / ref:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd fused pass (slow to compile)")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"device={device} chunk={el.chunk_elements(device):,} elements")
    vs = second_moments(8, 1 << 20, device)
    histogram_kernels(vs[0], args.repeats)
    chunks(torch.cat(vs) if device.type == "cpu" else torch.cat(vs * 8), args.repeats)
    chunk_sizes(device, args.repeats)
    breakdown(vs)
    if args.compile:
        compiled(vs, args.repeats)


if __name__ == "__main__":
    main()
