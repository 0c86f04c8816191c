"""The EffectiveLRMonitor's statistics pass (``lightning_wd.effective_lr``) against its earlier versions and its
alternatives.

Prints, on one device, each as a ratio to a reference measured in the same run:
1. the pass over the second moments of a fused AdamW's 8 x Linear(1024) right after its step (v in memory, not in
   cache), ms per million elements: the fused C kernel (the CPU default where the optional extension was built)
   against the eager torch pass (the accelerator path, and the CPU fallback) in three chunk sizes and against the
   earliest one (``_stats_v1.py``: a histogram of ``v_hat``, then a separate division and square root);
2. the fixed cost per parameter: a param group of 2,000 small parameters, the same versions;
3. the histogram kernels tried for the median in the eager pass, on the same int32 bin indices;
4. the eager pass over one large tensor in chunks (the default) against all at once;
5. where the time of the eager pass goes, op by op (torch profiler), over several 1M-element second moments;
6. with ``--compile``, a ``torch.compile``d eager pass that fuses the square root, division, min, max, sum and bin
   index into one kernel (plus the same ``bincount``), against the eager pass; it also prints the compile time.

    OMP_NUM_THREADS=1 python benchmarks/stats_pass.py [--compile]     # CPU (or --device cuda)
"""

from __future__ import annotations

import argparse
import statistics
import time

import _stats_v1 as v1
import torch
from _common import interleaved_medians, sync

import lightning_wd.effective_lr as el


def second_moments(count: int, numel: int, device: torch.device) -> list[torch.Tensor]:
    """Adam-like ``v``: squares of gradients spread over several decades."""
    g = torch.Generator(device=device).manual_seed(0)
    return [(torch.randn(numel, generator=g, device=device) * 10 ** torch.randn(numel, generator=g, device=device))
            .square_().mul_(1e-2) for _ in range(count)]


def spec_of(v: torch.Tensor) -> el.RateSpec:
    """Adam's rate over ``v`` at step 10."""
    return el.adam_rate({"step": torch.tensor(10.0), "exp_avg_sq": v}, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8})


def accumulate(specs: list[el.RateSpec], scratch) -> None:
    partials = el.empty_partials(1, specs[0].device)
    for spec in specs:
        el.accumulate_partials(spec, partials.ext[0], partials.sums[0], scratch)


def fused_adamw_states(device: torch.device):
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    for _ in range(2):
        net(torch.randn(4, 1024, device=device)).pow(2).mean().backward()
        opt.step()
    return net, opt


def against_v1(device: torch.device, repeats: int) -> None:
    """The whole pass of each version over the weights' second moments, after a real optimizer step each time."""
    net, opt = fused_adamw_states(device)
    group = opt.param_groups[0]
    weights = [p for p in group["params"] if p.dim() == 2]
    states = [opt.state[p] for p in weights]
    millions = sum(p.numel() for p in weights) / 1e6
    default = el.chunk_elements(device)
    original = el.chunk_elements
    fused = el.fused_kernel_available() and device.type == "cpu"
    passes = {"earlier pass (v1: histogram of v_hat)": None,
              **{f"eager pass, chunks of {c:,}": c for c in (default // 2, default, default * 2)}}
    if fused:
        passes["fused C kernel (the CPU default)"] = 0
    times: dict[str, list[float]] = {k: [] for k in passes}
    v1_scratch = v1.make_scratch(1 << 30, device)
    scratch = {c: el.make_scratch(c, device) for c in passes.values() if c}
    try:
        for _ in range(repeats):
            for name, chunk in passes.items():
                opt.step()  # the second moments as a logging step finds them: just written, not in cache
                sync(device)
                start = time.perf_counter()
                if chunk is None:
                    for s in states:
                        v1.adam_partial_stats(s, group, v1_scratch)
                elif chunk == 0:
                    accumulate([el.adam_rate(s, group, p) for s, p in zip(states, weights)], None)
                else:
                    el.chunk_elements = lambda d, c=chunk: c
                    with el.fused_kernel_disabled():
                        accumulate([el.adam_rate(s, group, p) for s, p in zip(states, weights)], scratch[chunk])
                sync(device)
                times[name].append(time.perf_counter() - start)
    finally:
        el.chunk_elements = original
    ref_name = "fused C kernel (the CPU default)" if fused else f"eager pass, chunks of {default:,}"
    ref = statistics.median(times[ref_name])
    print(f"\n1. the pass over the 8 x Linear(1024) weights' second moments ({millions:.1f}M elements) of a fused"
          f" AdamW right after its step, {repeats} repeats")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"   {name:46s} {t * 1e3 / millions:8.3f} ms per million  {t / ref:5.2f}x")


def per_parameter_cost(device: torch.device, repeats: int, n: int = 2000) -> None:
    """A param group of ``n`` parameters of 64 elements: what a logging step costs per parameter."""
    params = [torch.nn.Parameter(torch.randn(64, device=device)) for _ in range(n)]
    opt = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn(64, device=device)
    opt.step()
    group = opt.param_groups[0]
    states = [opt.state[p] for p in params]

    def current() -> None:
        el.rate_statistics([el.adam_rate(s, group, p) for s, p in zip(states, params)])

    def eager() -> None:
        with el.fused_kernel_disabled():
            current()

    fns = {"earlier (v1: stacked rows)": lambda: v1.group_statistics(states, group),
           "eager pass (streamed in blocks)": eager}
    if el.fused_kernel_available() and device.type == "cpu":
        fns["fused C kernel (streamed in blocks)"] = current
    times = interleaved_medians(fns, repeats, device)
    ref = times[list(fns)[-1]]
    print(f"\n2. one param group of {n:,} parameters of 64 elements, statistics of each and of the group")
    for name, t in times.items():
        print(f"   {name:46s} {t * 1e6 / n:8.1f} us per parameter  {t / ref:5.2f}x")


def histogram_kernels(v: torch.Tensor, repeats: int) -> None:
    rate = el.effective_lr(spec_of(v))
    idx = torch.bitwise_right_shift(rate.view(torch.int32), el._SHIFT).clamp_(el._FIRST_BIN_BITS, el._LAST_BIN_BITS)
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
    print(f"\n3. histogram of {idx.numel():,} indices into {n_bins:,} bins")
    for name, t in times.items():
        print(f"   {name:46s} {t * 1e3:8.3f} ms  {t / ref:5.2f}x")


def chunks(v: torch.Tensor, repeats: int) -> None:
    spec = spec_of(v)
    default = el._chunk(spec)
    original = el.chunk_elements

    def in_chunks_of(n: int):
        scratch = el.make_scratch(n, v.device)

        def run() -> None:
            el.chunk_elements = lambda d: n
            try:
                accumulate([spec], scratch)
            finally:
                el.chunk_elements = original

        return run

    times = interleaved_medians({f"in chunks of {default:,} (the default)": in_chunks_of(default),
                                 "all at once, scratch as large as the tensor": in_chunks_of(v.numel())},
                                repeats, v.device)
    ref = next(iter(times.values()))
    print(f"\n4. statistics of one {v.numel():,}-element tensor (scratch reused across repeats)")
    for name, t in times.items():
        print(f"   {name:46s} {t * 1e3:8.3f} ms  {t / ref:5.2f}x")


def breakdown(vs: list[torch.Tensor]) -> None:
    specs = [spec_of(v) for v in vs]
    scratch = el.make_scratch(el._chunk(specs[0]), vs[0].device)
    accumulate(specs, scratch)  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU]
    if vs[0].device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        accumulate(specs, scratch)
        sync(vs[0].device)
    millions = sum(v.numel() for v in vs) / 1e6
    key = "self_device_time_total" if vs[0].device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    print(f"\n5. where the time goes, {len(vs)} tensors of {vs[0].numel():,} elements ({key}, per million elements)")
    for e in rows[:12]:
        print(f"   {e.key:46s} {getattr(e, key) / 1e3 / millions:8.3f} ms")


def compiled(vs: list[torch.Tensor], repeats: int) -> None:
    def fused(v: torch.Tensor, scale: float, eps: float):
        rate = scale / (torch.sqrt(v) + eps)
        idx = (rate.view(torch.int32) >> el._SHIFT).clamp(el._FIRST_BIN_BITS, el._LAST_BIN_BITS)
        return rate.min(), rate.max(), rate.sum(), idx

    start = time.perf_counter()
    fused_c = torch.compile(fused, dynamic=True)
    fused_c(vs[0], 1e-3, 1e-8)
    sync(vs[0].device)
    compile_s = time.perf_counter() - start
    specs = [spec_of(v) for v in vs]
    scratch = el.make_scratch(el._chunk(specs[0]), vs[0].device)
    hist = torch.zeros(el.HIST_BINS, dtype=torch.float64, device=vs[0].device)

    def with_compiled() -> None:
        for v in vs:
            for c in v.split(scratch.numel()):
                el._count_bins(fused_c(c, 1e-3, 1e-8)[3], hist)  # the library's histogram

    times = interleaved_medians({"eager pass": lambda: accumulate(specs, scratch),
                                 "compiled fused pass + histogram": with_compiled}, repeats, vs[0].device)
    ref = times["eager pass"]
    print(f"\n6. torch.compile (first call {compile_s:.1f} s), {len(vs)} tensors of {vs[0].numel():,} elements")
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
    against_v1(device, args.repeats)
    per_parameter_cost(device, max(3, args.repeats // 3))
    vs = second_moments(8, 1 << 20, device)
    histogram_kernels(vs[0], args.repeats)
    with el.fused_kernel_disabled():
        chunks(torch.cat(vs) if device.type == "cpu" else torch.cat(vs * 8), args.repeats)
        breakdown(vs)
        if args.compile:
            compiled(vs, args.repeats)


if __name__ == "__main__":
    main()
