"""Every GPU figure of the project in one run: the monitors' cost per step and in memory, WeightDecay's native handoff
against AdamW, and the generic decay pass's host cost, as one markdown table of ratios measured in the same run.

Rows (each with its target and a pass/fail column):

1. EffectiveLRMonitor on a 268M model (16 x Linear(4096), batch 4, fused AdamW) in ``Trainer.fit``: the extra time
   of a logging step over a non-logging step, and the share of fit time that makes at the default interval 50.
2. EffectiveLRMonitor logging every step, 8M model (8 x Linear(1024)): step time against AdamW without it.
3. Steps that do not log, with EffectiveLRMonitor or WeightNormMonitor attached, 8M model, fused and foreach AdamW.
4. WeightDecay's native handoff: Adam + WeightDecay() against AdamW, fused and foreach, plus diagnostics (Adam with
   ``decoupled_weight_decay=True`` and no callback; ``WeightDecay(native=False)``; AdamW + WeightDecay()).
5. A plain loop over 2,000 tensors: the generic ``_foreach_mul_`` pass's host cost per tensor (SGD + decoupled
   ``attach_weight_decay``), and the native handoff (Adam + attach against AdamW) per tensor.
6. WeightNormMonitor on the 268M model: logging step time over non-logging step time.
7. The peak extra CUDA memory of a logging step of each monitor on the 268M model.

Rows 3 and 4 again, resolved (``3-host-*``, ``4-host-*``): the library's host time per step in one fit per
configuration (those steps add no device work, so it bounds their cost; fit ratios are within run noise there).
Extras, while the time budget lasts: one profiled logging step of each monitor on the 268M model
(``profile_*.txt``) and row 6's norms alone (``6n*``); the Triton pass's tile, warps and programs per SM (``k*``,
CUDA); row 1 with foreach AdamW, and with a bf16 model.

Every step is timed with ``torch.cuda.synchronize()`` at batch start and end (a timer callback first and one last
in the callback list, so the monitors' hooks fall inside); configurations whose ratio to their reference must be
resolved near 1 are fitted round-robin, in a shuffled order per round, and reported as the median over rounds of
the per-round ratio of median step times. Each row is printed as soon as it is measured, and the table
(``gpu_report.md``) and every raw number (``gpu_report.json``) are rewritten to ``--out`` after each row, so a run
cut short still reports. Sections run in their own ``try`` and stop at the global ``--budget-s``.

    PYTHONPATH=src python benchmarks/gpu_report.py --out results/        # CUDA, about 4 minutes on an H200
    PYTHONPATH=src python benchmarks/gpu_report.py --device cpu --quick  # a smoke test of every row, ~1 minute
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts the imports too: the 4 minutes are wall time

import argparse
import contextlib
import datetime
import gc
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run from the repository root
sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))  # the package from source, if not on the path
from _common import Wide, interleaved_medians  # noqa: E402

from lightning_wd import EffectiveLRMonitor, WeightDecay, WeightNormMonitor, attach_weight_decay  # noqa: E402

MiB = 2**20
NEVER = 10**9  # a monitor interval longer than any run here: no step logs


# --- sizes and the time budget ------------------------------------------------------------------------------------
@dataclass
class Sizes:
    big_width: int = 4096  # row 1, 6, 7: 16 x Linear(4096) = 268M parameters
    big_depth: int = 16
    big_steps: int = 130  # per fit, warm-up included
    big_every: int = 10  # the monitors' interval in the big fits: 12 logging steps after the warm-up
    small_width: int = 1024  # rows 2-4: 8 x Linear(1024) = 8M parameters
    small_depth: int = 8
    small_steps: int = 170
    warmup: int = 10  # steps cut from every fit (optimizer state allocation, cuBLAS/allocator warm-up)
    min_rounds: int = 5
    max_rounds: int = 7  # rows 3 and 4 are resolved by the host time (host_rows), not by more rounds
    n_tensors: int = 2000  # row 5
    tensor_numel: int = 4096
    loop_steps: int = 20  # optimizer steps per timed sample of row 5
    loop_rounds: int = 15


QUICK = Sizes(big_width=512, big_depth=4, big_steps=45, big_every=10, small_width=256, small_depth=4, small_steps=40,
              warmup=5, min_rounds=5, max_rounds=5, n_tensors=200, loop_steps=10, loop_rounds=7)


class Budget:
    """The global time budget: sections and rounds check it before they start."""

    def __init__(self, seconds: float, start: float) -> None:
        self.start, self.seconds = start, seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


# --- the report ---------------------------------------------------------------------------------------------------
@dataclass
class Row:
    key: str
    figure: str
    value: float | None
    shown: str  # the value as printed
    target: str  # e.g. "<= 0.5", or "" for a diagnostic
    verdict: str  # PASS, FAIL or info
    detail: str
    raw: dict[str, Any] = field(default_factory=dict)


class Report:
    """Prints each row as it comes and rewrites the markdown table and the JSON of raw numbers after each."""

    HEADER = "| # | figure | value | target | pass | detail |\n|---|---|---|---|---|---|"

    def __init__(self, out: Path, env: dict[str, str]) -> None:
        self.out, self.env, self.rows, self.notes = out, env, [], []
        self.raw: dict[str, Any] = {}

    def start(self) -> None:
        print(self.env_line() + "\n\n" + self.HEADER, flush=True)

    def env_line(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in self.env.items())

    def add(self, key: str, figure: str, value: float | None, fmt: str, limit: float | None = None,
            detail: str = "", raw: dict[str, Any] | None = None) -> None:
        """One row; ``limit`` is the target (value <= limit passes); no limit makes it a diagnostic."""
        shown = "n/a" if value is None else format(value, fmt)
        if limit is None or value is None:
            target, verdict = ("" if limit is None else f"<= {format(limit, fmt)}"), "info"
        else:
            target, verdict = f"<= {format(limit, fmt)}", "PASS" if value <= limit else "FAIL"
        row = Row(key, figure, value, shown, target, verdict, detail, raw or {})
        self.rows.append(row)
        print(self.line(row), flush=True)
        self.save()

    def note(self, text: str) -> None:
        """A line outside the table (a skipped section, an error), kept for the saved report."""
        self.notes.append(text)
        print(f"<!-- {text} -->", flush=True)
        self.save()

    @staticmethod
    def line(r: Row) -> str:
        return f"| {r.key} | {r.figure} | {r.shown} | {r.target} | {r.verdict} | {r.detail} |"

    def table(self) -> str:
        """The rows in the order of their numbers (they are measured in another order)."""
        rows = sorted(self.rows, key=lambda r: int(r.key[0]) if r.key[0].isdigit() else 99)  # stable: variants in order
        return "\n".join([self.HEADER, *(self.line(r) for r in rows)])

    def save(self) -> None:
        table = self.table()
        notes = "".join(f"\n- {n}" for n in self.notes)
        (self.out / "gpu_report.md").write_text(f"{self.env_line()}\n\n{table}\n{notes}\n")
        data = {"env": self.env, "rows": [asdict(r) for r in self.rows], "notes": self.notes, "raw": self.raw}
        (self.out / "gpu_report.json").write_text(json.dumps(data, indent=1, default=float))


@contextlib.contextmanager
def section(report: Report, budget: Budget, name: str, needs_s: float = 0.0) -> Iterator[bool]:
    """Runs a section unless the budget is spent; an error is printed and the report goes on with the next one."""
    if budget.left() < needs_s:
        report.note(f"section '{name}' skipped: {budget.left():.0f} s of the budget left, it needs ~{needs_s:.0f} s")
        yield False
        return
    t0 = time.perf_counter()
    try:
        yield True
    except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
        traceback.print_exc()
        report.note(f"section '{name}' failed: {type(e).__name__}: {e}")
    report.raw.setdefault("section_seconds", {})[name] = time.perf_counter() - t0


# --- timing steps inside Trainer.fit ------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepLog:
    """Per training step: ``window`` from batch start to batch end (synchronized, every callback's batch hooks
    inside), ``cycle`` from the previous batch end (all of a step, Lightning's loop included), ``peak`` the CUDA
    bytes allocated at the step's peak above its start."""

    window: list[float] = field(default_factory=list)
    cycle: list[float] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)


class _ClockStart(Callback):
    def __init__(self, log: StepLog) -> None:
        self.steps, self.t0, self.t_end, self.base = log, 0.0, None, 0

    def on_train_batch_start(self, trainer, pl_module, *args: Any) -> None:
        sync(pl_module.device)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self.t0 = time.perf_counter()


class _ClockEnd(Callback):
    def __init__(self, start: _ClockStart) -> None:
        self.start = start

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        sync(pl_module.device)
        t = time.perf_counter()
        s, log = self.start, self.start.steps
        log.window.append(t - s.t0)
        log.cycle.append(t - (s.t_end if s.t_end is not None else s.t0))
        s.t_end = t
        log.peak.append(torch.cuda.max_memory_allocated() - s.base if pl_module.device.type == "cuda" else 0)


def fit_clocked(make_opt: Callable, callbacks: list[Callback], width: int, depth: int, steps: int,
                device: torch.device, log_dir: str, dtype: torch.dtype = torch.float32) -> StepLog:
    """``Trainer.fit`` of a ``Wide`` model (batch 4, CSV logger, nothing else) for ``steps`` steps, each timed."""
    gc.collect()  # garbage of the previous fit is not collected inside this one's timed steps
    torch.manual_seed(0)
    log = StepLog()
    start = _ClockStart(log)
    # built on the device: initializing 268M parameters on the host would cost seconds per fit
    with torch.device(device):
        model = Wide(make_opt, width, depth).to(dtype)
    data = DataLoader(TensorDataset(torch.randn(steps * 4, width, dtype=dtype)), batch_size=4)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else device.type, devices=1, max_steps=steps,
        logger=CSVLogger(log_dir), log_every_n_steps=50, callbacks=[start, *callbacks, _ClockEnd(start)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(model, data)
    del trainer, model
    return log


def split(values: list, every: int, warmup: int) -> tuple[list, list]:
    """(logging steps, other steps) after the warm-up; step ``i`` (from 0) logs when ``(i + 1) % every == 0``."""
    logging_, plain = [], []
    for i, v in enumerate(values):
        if i >= warmup:
            (logging_ if (i + 1) % every == 0 else plain).append(v)
    return logging_, plain


def millions(n: int) -> str:
    return f"{n / 1e6:.3g}M params"


def small_params(sz: Sizes) -> int:
    return sz.small_width * (sz.small_width + 1) * sz.small_depth


def adam_w(impl: str, **kw: Any) -> Callable:
    return lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.1, **{impl: True}, **kw)


def adam(impl: str, **kw: Any) -> Callable:
    return lambda p: torch.optim.Adam(p, lr=1e-4, weight_decay=0.1, **{impl: True}, **kw)


# --- section: the 268M model (rows 1, 6, 7) -----------------------------------------------------------------------
def monitor_log_cost(log: StepLog, every: int, warmup: int) -> dict[str, float]:
    """The numbers of one monitor fit: non-logging step (mean and median), logging step, extra, memory."""
    logged, plain = split(log.window, every, warmup)
    peak_log, peak_plain = split(log.peak, every, warmup)
    med_log, med_plain = statistics.median(logged), statistics.median(plain)
    return {
        "step_mean_s": statistics.fmean(plain), "step_median_s": med_plain, "log_step_median_s": med_log,
        "log_step_mean_s": statistics.fmean(logged), "n_log": len(logged), "n_plain": len(plain),
        "extra_s": med_log - med_plain,
        "peak_extra_bytes": max(peak_log) - max(peak_plain),
        "peak_plain_bytes": max(peak_plain),
    }


def big_model_rows(report: Report, sz: Sizes, device: torch.device, log_dir: str, impl: str = "fused",
                   dtype: torch.dtype = torch.float32, tag: str = "", with_wnm: bool = True,
                   optimizer: tuple[str, Callable] | None = None) -> None:
    """Rows 1, 6 and 7 (``tag`` names the variants of the extras): one fit per configuration, of AdamW(``impl``)
    or of ``optimizer`` (its name, a function of the parameters), the reference and the monitored fit alike."""
    n = sz.big_width * (sz.big_width + 1) * sz.big_depth
    name, make_opt = optimizer if optimizer is not None else (f"AdamW({impl})", adam_w(impl))
    what = f"{millions(n)}, {name}{', bf16' if dtype == torch.bfloat16 else ''}"
    fit = lambda cbs: fit_clocked(make_opt, cbs, sz.big_width, sz.big_depth, sz.big_steps,  # noqa: E731
                                  device, log_dir, dtype)
    ref = fit([])
    _, ref_plain = split(ref.window, sz.big_every, sz.warmup)
    elr_log = fit([EffectiveLRMonitor(log_every_n_steps=sz.big_every)])
    elr = monitor_log_cost(elr_log, sz.big_every, sz.warmup)
    raw = report.raw[f"big{tag}"] = {"adamw_steps": asdict(ref), "elr_steps": asdict(elr_log), "elr": elr}
    # medians of both: one collector or allocator pause among 12 logging steps would move a mean by milliseconds
    step, extra = elr["step_median_s"], elr["extra_s"]
    report.add(f"1{tag}", f"EffectiveLRMonitor logging step: extra / step ({what})", extra / step, ".3f", 0.5,
               f"step {step * 1e3:.2f} ms (mean {elr['step_mean_s'] * 1e3:.2f}), logging step "
               f"{elr['log_step_median_s'] * 1e3:.2f} ms, extra {extra * 1e3:.2f} ms, {elr['n_log']} logging steps; "
               "aim 0.2", elr)
    report.add(f"1{tag}b", f"EffectiveLRMonitor share of fit time at interval 50 ({what})", extra / (50 * step),
               ".3%", 0.01, f"extra / (50 x {step * 1e3:.2f} ms)")
    report.add(f"1{tag}c", f"EffectiveLRMonitor non-logging step / the optimizer's step, one fit each ({what})",
               elr["step_median_s"] / statistics.median(ref_plain), ".3f", None,
               f"{name} {statistics.median(ref_plain) * 1e3:.2f} ms; single fits, see row 3 for the resolved ratio")
    if not with_wnm:
        return
    wnm_log = fit([WeightNormMonitor(log_every_n_steps=sz.big_every)])
    wnm = monitor_log_cost(wnm_log, sz.big_every, sz.warmup)
    raw.update(wnm_steps=asdict(wnm_log), wnm=wnm)
    report.add(f"6{tag}", f"WeightNormMonitor logging step / non-logging step ({what})",
               wnm["log_step_median_s"] / wnm["step_median_s"], ".3f", 1.1,
               f"{wnm['log_step_median_s'] * 1e3:.2f} / {wnm['step_median_s'] * 1e3:.2f} ms", wnm)
    if device.type != "cuda":
        report.add(f"7{tag}", "peak extra CUDA memory of a logging step", None, ".1f", None, "CUDA only")
        return
    weights = n * torch.finfo(dtype).bits // 8
    for key, name, m in (("a", "EffectiveLRMonitor", elr), ("b", "WeightNormMonitor", wnm)):
        mib = m["peak_extra_bytes"] / MiB
        report.add(f"7{tag}{key}", f"{name} logging step: peak extra CUDA memory, MiB ({what})", mib, ".1f", None,
                   f"{m['peak_extra_bytes'] / weights:.2%} of the weights ({weights / MiB:.0f} MiB); a non-logging "
                   f"step peaks {m['peak_plain_bytes'] / MiB:.0f} MiB above its start")


# --- section: the 8M model, interleaved fits (rows 2, 3, 4) -------------------------------------------------------
@dataclass
class Config:
    make_opt: Callable
    callbacks: Callable[[], list[Callback]]  # built fresh for every fit
    ref: str
    core: bool = True  # a row with a target; diagnostics are dropped first when the budget is short


def small_configs() -> dict[str, Config]:
    cfgs: dict[str, Config] = {}
    for impl in ("fused", "foreach"):
        ref = f"AdamW({impl})"
        cfgs[ref] = Config(adam_w(impl), lambda: [], ref)
        cfgs[f"{ref} + EffectiveLRMonitor, no step logs"] = Config(
            adam_w(impl), lambda: [EffectiveLRMonitor(log_every_n_steps=NEVER)], ref)
        cfgs[f"{ref} + WeightNormMonitor, no step logs"] = Config(
            adam_w(impl), lambda: [WeightNormMonitor(log_every_n_steps=NEVER)], ref)
        cfgs[f"Adam({impl}) + WeightDecay()"] = Config(adam(impl), lambda: [WeightDecay()], ref)
        # where a gap of the handoff comes from: Adam's kernel with the switch, the generic pass, the hooks alone
        cfgs[f"Adam({impl}, decoupled_weight_decay=True), no callback"] = Config(
            adam(impl, decoupled_weight_decay=True), lambda: [], ref, core=False)
        cfgs[f"Adam({impl}) + WeightDecay(native=False)"] = Config(
            adam(impl), lambda: [WeightDecay(native=False)], ref, core=False)
        cfgs[f"AdamW({impl}) + WeightDecay()"] = Config(adam_w(impl), lambda: [WeightDecay()], ref, core=False)
    cfgs["AdamW(fused) + EffectiveLRMonitor, every step"] = Config(
        adam_w("fused"), lambda: [EffectiveLRMonitor(log_every_n_steps=1)], "AdamW(fused)")
    return cfgs


def small_rounds(sz: Sizes, device: torch.device, log_dir: str, budget: Budget, reserve_s: float,
                 report: Report) -> dict[str, list[StepLog]]:
    """Fits every configuration once per round, in a shuffled order, for ``min_rounds`` rounds while the budget
    lasts, then more (up to ``max_rounds``) while it lasts beyond ``reserve_s`` for the sections after. When the
    rounds still needed would not fit, the diagnostics are dropped from the rounds that follow."""
    cfgs = small_configs()
    active = list(cfgs)
    logs: dict[str, list[StepLog]] = {k: [] for k in cfgs}
    fit_s = 0.0  # the slowest round's seconds per fit so far
    for r in range(sz.max_rounds):
        room = budget.left() - (0.0 if r < sz.min_rounds else reserve_s)
        if r and room < max(sz.min_rounds - r, 1) * fit_s * len(active) and any(not cfgs[k].core for k in active):
            active = [k for k in active if cfgs[k].core]
            report.note(f"rows 2-4: diagnostics dropped after round {r} ({fit_s:.1f} s per fit)")
        if r and room < fit_s * len(active) * 1.1:
            if r < sz.min_rounds:
                report.note(f"rows 2-4: only {r} rounds fitted in the budget ({fit_s:.1f} s per fit)")
            break
        t0 = time.perf_counter()
        order = list(active)
        random.Random(r).shuffle(order)  # no configuration always runs first, or after the slowest one
        for name in order:
            cfg = cfgs[name]
            logs[name].append(fit_clocked(cfg.make_opt, cfg.callbacks(), sz.small_width, sz.small_depth,
                                          sz.small_steps, device, log_dir))
        fit_s = max(fit_s, (time.perf_counter() - t0) / len(order))
        print(f"<!-- rows 2-4: round {r + 1}, {len(order)} fits, {time.perf_counter() - t0:.1f} s -->", flush=True)
    return logs


def round_ratios(logs: dict[str, list[StepLog]], name: str, ref: str, warmup: int, stat: Callable,
                 series: str = "cycle") -> list[float]:
    """Per round, ``stat`` of ``name``'s steps over ``stat`` of ``ref``'s (after the warm-up)."""
    pairs = zip(logs[name], logs[ref])  # round i with round i: a dropped diagnostic has the first rounds only
    return [stat(getattr(a, series)[warmup:]) / stat(getattr(b, series)[warmup:]) for a, b in pairs]


def small_model_rows(report: Report, sz: Sizes, device: torch.device, log_dir: str, budget: Budget,
                     reserve_s: float) -> None:
    logs = small_rounds(sz, device, log_dir, budget, reserve_s, report)
    cfgs = small_configs()
    what = millions(small_params(sz))
    med = statistics.median
    report.raw["small"] = {name: [asdict(log) for log in ls] for name, ls in logs.items()}

    def ratio(name: str, stat: Callable = med, series: str = "cycle") -> float:
        return med(round_ratios(logs, name, cfgs[name].ref, sz.warmup, stat, series))

    def detail(name: str) -> str:
        ref = cfgs[name].ref
        ms = lambda k: med([med(log.cycle[sz.warmup:]) for log in logs[k]]) * 1e3  # noqa: E731
        return (f"{ms(name):.3f} vs {ms(ref):.3f} ms per step; mean-based {ratio(name, statistics.fmean):.4f}, "
                f"window-based {ratio(name, series='window'):.4f}; {len(logs[name])} rounds")

    name = "AdamW(fused) + EffectiveLRMonitor, every step"
    # the logging steps are the point here, so the mean (the fit's time) rather than the median of steps
    report.add("2", f"{name} / AdamW(fused), {what}", ratio(name, statistics.fmean), ".3f", 1.5, detail(name))
    for i, impl in enumerate(("fused", "foreach")):
        for j, mon in enumerate(("EffectiveLRMonitor", "WeightNormMonitor")):
            name = f"AdamW({impl}) + {mon}, no step logs"
            report.add(f"3{'abcd'[2 * i + j]}", f"{name} / AdamW({impl}), {what}", ratio(name), ".4f", 1.005,
                       detail(name))
    for impl in ("fused", "foreach"):
        name = f"Adam({impl}) + WeightDecay()"
        report.add(f"4-{impl}", f"{name} / AdamW({impl}), {what}", ratio(name), ".4f", 1.01, detail(name))
        for k, name in enumerate((f"Adam({impl}, decoupled_weight_decay=True), no callback",
                                  f"Adam({impl}) + WeightDecay(native=False)", f"AdamW({impl}) + WeightDecay()")):
            report.add(f"4-{impl}-diag{'abc'[k]}", f"{name} / AdamW({impl}), {what}", ratio(name), ".4f", None,
                       detail(name))


# --- section: our host time on the 8M model (rows 3 and 4, resolved) -----------------------------------------------
class HostTime:
    """The seconds the library's own code takes in a fit's steps: every per-step hook its callbacks define, and the step
    wrapper (``StepHooks._run``, the listeners included, less the optimizer's own step, which it wraps).

    Steps that do not log add no device work (the monitors' listeners are not armed; the native handoff runs the
    optimizer's own kernel), so this host time bounds what they cost: resolved where a ratio of fits is not (the
    spread between fits doing the same work is several per cent on a GPU). The timers' own cost is counted in, so
    the bound errs high."""

    #: the hooks of every training step (set-up and epoch hooks are not steps' costs)
    STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
                  "on_before_zero_grad", "on_train_batch_end")

    def __init__(self) -> None:
        self.seconds = 0.0

    def _timed(self, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed

    @contextlib.contextmanager
    def watching(self, callbacks: list[Callback]) -> Iterator[None]:
        from lightning_wd import stepping

        for cb in callbacks:
            for name in self.STEP_HOOKS:
                if getattr(type(cb), name) is not getattr(Callback, name):
                    setattr(cb, name, self._timed(getattr(cb, name)))
        run, clock = stepping.StepHooks._run, self

        def timed_run(hooks: Any, optimizer: Any, args: tuple, kwargs: dict) -> Any:
            t0, inner, inner_s, listeners_s = time.perf_counter(), hooks._inner, 0.0, 0.0
            call = stepping._call

            def timed_call(*a: Any) -> None:  # the listeners the optimizer's step calls back (on_grads_ready)
                nonlocal listeners_s
                t = time.perf_counter()
                try:
                    call(*a)
                finally:
                    listeners_s += time.perf_counter() - t

            def timed_inner(*a: Any, **k: Any) -> Any:
                nonlocal inner_s
                t = time.perf_counter()
                stepping._call = timed_call
                try:
                    return inner(*a, **k)
                finally:
                    stepping._call = call
                    inner_s += time.perf_counter() - t

            hooks._inner = timed_inner
            try:
                return run(hooks, optimizer, args, kwargs)
            finally:
                hooks._inner = inner
                clock.seconds += time.perf_counter() - t0 - inner_s + listeners_s

        stepping.StepHooks._run = timed_run
        try:
            yield
        finally:
            stepping.StepHooks._run = run


def host_rows(report: Report, sz: Sizes, device: torch.device, log_dir: str) -> None:
    """Rows 3 and 4 resolved: one fit per configuration, the library's host time per step over the reference's step
    (after the warm-up), plus 1."""
    cfgs = {name: cfg for name, cfg in small_configs().items() if cfg.core and cfg.callbacks()
            and "every step" not in name}
    steps = {ref: statistics.median(fit_clocked(adam_w(ref[6:-1]), [], sz.small_width, sz.small_depth,
                                                sz.small_steps, device, log_dir).cycle[sz.warmup:])
             for ref in ("AdamW(fused)", "AdamW(foreach)")}
    raw = report.raw["host"] = {"reference_step_s": steps}
    for k, (name, cfg) in enumerate(cfgs.items()):
        callbacks, clock = cfg.callbacks(), HostTime()
        with clock.watching(callbacks):
            log = fit_clocked(cfg.make_opt, callbacks, sz.small_width, sz.small_depth, sz.small_steps, device,
                              log_dir)
        per_step = clock.seconds / len(log.cycle)
        raw[name] = per_step
        target = 1.01 if "WeightDecay" in name else 1.005
        what = f"{name}: 1 + library host time / step, {millions(small_params(sz))}"
        report.add(f"{'3' if 'Monitor' in name else '4'}-host-{k}", what, 1 + per_step / steps[cfg.ref], ".4f", target,
                   f"{per_step * 1e6:.1f} us per step in lightning_wd's hooks and step wrapper, {cfg.ref} step "
                   f"{steps[cfg.ref] * 1e3:.3f} ms; no device work on these steps, so this bounds their cost")


# --- extra: the Triton pass's tile, warps and grid -----------------------------------------------------------------
def kernel_sweep(report: Report, sz: Sizes, device: torch.device) -> None:
    """The statistics pass alone over 268M Adam-like fp32 states (16 x 4096 x 4096, as row 1's model), per group
    row only (the default), for a few tiles, warps and programs per SM: what to choose for row 1."""
    from lightning_wd import rate_triton as rt
    from lightning_wd.effective_lr import rate_statistics
    from lightning_wd.rates import root_rate

    g = torch.Generator(device=device).manual_seed(0)
    n = sz.big_width
    states = [torch.randn(n, n, device=device, generator=g).square_().mul_(1e-6) for _ in range(sz.big_depth)]
    specs = [root_rate(v, 1e-4 * 0.03, 1e-8 * 0.03) for v in states]
    chosen = (rt.TILE, rt._NUM_WARPS, rt._PROGRAMS_PER_SM)
    times: dict[str, float] = {}
    try:
        for tile, warps, per_sm in (chosen, (1024, 4, 16), (1024, 4, 8), (2048, 8, 4), (4096, 8, 2), (2048, 4, 8)):
            rt.TILE, rt._NUM_WARPS, rt._PROGRAMS_PER_SM = tile, warps, per_sm
            rt._constexprs.cache_clear()  # both read the settings once and keep them
            rt._max_programs.cache_clear()
            rate_statistics(specs, per_parameter=False)  # compiled outside the timing
            sync(device)
            runs = []
            for _ in range(7):
                t0 = time.perf_counter()
                rate_statistics(specs, per_parameter=False)
                sync(device)
                runs.append(time.perf_counter() - t0)
            times[f"{tile}/{warps}/{per_sm}"] = statistics.median(runs)
    finally:
        rt.TILE, rt._NUM_WARPS, rt._PROGRAMS_PER_SM = chosen
        rt._constexprs.cache_clear()
        rt._max_programs.cache_clear()
    report.raw["kernel_sweep_s"] = times
    base = times[f"{chosen[0]}/{chosen[1]}/{chosen[2]}"]
    for k, (name, t) in enumerate(times.items()):
        what = f"statistics pass, tile/warps/programs per SM {name} ({millions(n * n * len(states))}, fp32 states)"
        report.add(f"k{k}", what, t / base, ".3f",
                   None, f"{t * 1e3:.2f} ms per pass (wall, synchronized)")


# --- section: the plain loop (row 5) ------------------------------------------------------------------------------
def loop_fns(sz: Sizes, device: torch.device) -> dict[str, Callable[[], None]]:
    """Each function takes ``loop_steps`` optimizer steps on its own 2,000 tensors with fixed gradients."""
    lr, wd = 1e-2, 0.1

    def tensors() -> list[torch.Tensor]:
        ps = [torch.randn(sz.tensor_numel, device=device, requires_grad=True) for _ in range(sz.n_tensors)]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        return ps

    def stepper(opt: torch.optim.Optimizer) -> Callable[[], None]:
        def steps() -> None:
            for _ in range(sz.loop_steps):
                opt.step()

        return steps

    def decay_pass(tensors: list[torch.Tensor]) -> Callable[[], None]:
        def steps() -> None:
            for _ in range(sz.loop_steps):
                torch._foreach_mul_(tensors, 1 - lr * wd)

        return steps

    ours = torch.optim.SGD(tensors(), lr=lr, weight_decay=wd, foreach=True)
    attach_weight_decay(ours, mode="decoupled")  # SGD's own rule is coupled: the library's separate pass decays
    bare = [p.detach() for p in tensors()]
    fns = {
        "SGD + attach (generic pass)": stepper(ours),
        "SGD, no decay": stepper(torch.optim.SGD(tensors(), lr=lr, weight_decay=0.0, foreach=True)),
        "the pass alone": decay_pass(bare),
    }
    for impl in ("fused", "foreach"):
        fns[f"AdamW({impl})"] = stepper(torch.optim.AdamW(tensors(), lr=1e-4, weight_decay=wd, **{impl: True}))
        native = torch.optim.Adam(tensors(), lr=1e-4, weight_decay=wd, **{impl: True})
        attach_weight_decay(native, mode="decoupled")  # handed to Adam's decoupled_weight_decay switch
        fns[f"Adam({impl}) + attach"] = stepper(native)
    return fns


def loop_rows(report: Report, sz: Sizes, device: torch.device) -> None:
    fns = loop_fns(sz, device)
    t = {k: v / sz.loop_steps for k, v in interleaved_medians(fns, sz.loop_rounds, device).items()}
    report.raw["loop"] = {"seconds_per_step": t, "n_tensors": sz.n_tensors, "numel": sz.tensor_numel}
    n = sz.n_tensors
    host = (t["SGD + attach (generic pass)"] - t["SGD, no decay"] - t["the pass alone"]) / n
    report.add("5", f"generic pass host cost, ns per tensor per step ({n} x {sz.tensor_numel})", host * 1e9, ".0f",
               300, f"SGD+attach {t['SGD + attach (generic pass)'] * 1e3:.3f} ms, SGD {t['SGD, no decay'] * 1e3:.3f}"
               f" ms, pass {t['the pass alone'] * 1e3:.3f} ms per step; median of {sz.loop_rounds} x "
               f"{sz.loop_steps} steps")
    for impl in ("fused", "foreach"):
        ours, ref = t[f"Adam({impl}) + attach"], t[f"AdamW({impl})"]
        report.add(f"5-{impl}", f"native handoff Adam({impl}) + attach vs AdamW({impl}), ns per tensor per step",
                   (ours - ref) / n * 1e9, ".0f", None, f"{ours * 1e3:.3f} vs {ref * 1e3:.3f} ms per step")


# --- extra: where a logging step's time goes -----------------------------------------------------------------------
class _ProfileStep(Callback):
    """Profiles one training step (``step``, from 0) with ``torch.profiler``, CPU and CUDA activity."""

    def __init__(self, step: int) -> None:
        self.step, self.profiler = step, None

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.step:
            sync(pl_module.device)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.step and self.profiler is not None:
            sync(pl_module.device)
            self.profiler.__exit__(None, None, None)


def profile_rows(report: Report, sz: Sizes, device: torch.device, log_dir: str) -> None:
    """One logging step of each monitor on the 268M model, and a step without one, profiled: the ops by device
    time and by host time, into ``profile_*.txt`` beside the report (what rows 1 and 6 spend, op by op); and the
    norms of row 6 alone: ``squared_norms`` of the weights and gradients, against the time to read them once."""
    from lightning_wd.weight_norm import squared_norms

    every = 10
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    for name, make in (("none", list), ("EffectiveLRMonitor", lambda: [EffectiveLRMonitor(log_every_n_steps=every)]),
                       ("WeightNormMonitor", lambda: [WeightNormMonitor(log_every_n_steps=every)])):
        prof = _ProfileStep(2 * every - 1)  # the second logging step: the first compiles the kernels
        fit_clocked(adam_w("fused"), [*make(), prof], sz.big_width, sz.big_depth, 2 * every, device, log_dir)
        averages = prof.profiler.key_averages()
        text = "\n\n".join([averages.table(sort_by=sort, row_limit=25),
                             averages.table(sort_by="self_cpu_time_total", row_limit=25)])
        (report.out / f"profile_{name}.txt").write_text(text)
    report.note(f"profiles of one logging step per monitor (fused AdamW, {sz.big_depth} x Linear({sz.big_width})): "
                "profile_*.txt")

    with torch.device(device):
        weights = [t for _ in range(sz.big_depth) for t in (torch.randn(sz.big_width, sz.big_width),
                                                             torch.randn(sz.big_width))]
    tensors = [*weights, *(torch.randn_like(w) for w in weights)]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    times = {}
    for what, fn in (("squared_norms", lambda: squared_norms(tensors)),
                     ("_foreach_norm", lambda: torch._foreach_norm(tensors)),
                     ("one vector_norm per tensor", lambda: [torch.linalg.vector_norm(t) for t in tensors]),
                     ("sum of each (one read)", lambda: [t.sum() for t in tensors])):
        fn()
        sync(device)
        runs = []
        for _ in range(9):
            t0 = time.perf_counter()
            fn()
            sync(device)
            runs.append(time.perf_counter() - t0)
        times[what] = statistics.median(runs)
    report.raw["norms_s"] = times
    for k, (what, t) in enumerate(times.items()):
        report.add(f"6n{k}", f"{what} over {len(tensors)} tensors ({nbytes / 2**30:.2f} GiB)", t * 1e3, ".3f", None,
                   f"ms (wall, synchronized); {nbytes / t / 1e12:.2f} TB/s")


def extras(report: Report, sz: Sizes, device: torch.device, log_dir: str, budget: Budget, needs_s: float) -> None:
    """The statistics pass's kernel settings (CUDA), row 1 with centered RMSprop (rates staged into the Triton
    pass), with foreach AdamW, then with a bf16 model, each while the budget lasts."""
    with section(report, budget, "extra: profiles of logging steps, the norms of row 6", needs_s / 3) as ok:
        if ok:
            profile_rows(report, sz, device, log_dir)
    with section(report, budget, "extra: row 1 with centered RMSprop (staged)", needs_s / 2) as ok:
        if ok:
            rmsprop = lambda p: torch.optim.RMSprop(p, lr=1e-4, centered=True, foreach=True)  # noqa: E731
            big_model_rows(report, sz, device, log_dir, tag="-staged", with_wnm=False,
                           optimizer=("RMSprop(centered, foreach)", rmsprop))
    if device.type == "cuda":
        with section(report, budget, "extra: the Triton pass's settings", needs_s / 3) as ok:
            if ok:
                kernel_sweep(report, sz, device)
    with section(report, budget, "extra: row 1 with foreach AdamW", needs_s / 2) as ok:
        if ok:
            big_model_rows(report, sz, device, log_dir, impl="foreach", tag="-foreach", with_wnm=False)
    with section(report, budget, "extra: row 1 with a bf16 model", needs_s / 2) as ok:
        if ok:
            big_model_rows(report, sz, device, log_dir, dtype=torch.bfloat16, tag="-bf16", with_wnm=False)


# --- main ---------------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__, "cuda": str(torch.version.cuda), "lightning": L.__version__,
        "triton": triton_version, "python": sys.version.split()[0],
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def quiet() -> None:
    """No warnings or Lightning banners between the table's rows."""
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_wd"):
        logging.getLogger(name).setLevel(logging.ERROR)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke test of every row")
    ap.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for gpu_report.md/.json "
                    "(default: $OUT, else a temporary folder)")
    ap.add_argument("--budget-s", type=float, default=230.0, help="sections that would start later are skipped")
    ap.add_argument("--only", nargs="+", choices=["big", "loop", "small", "host", "extras"],
                    default=["big", "loop", "small", "host", "extras"], help="the sections to run")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    budget = Budget(args.budget_s, T0)
    quiet()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the other benchmarks' OMP_NUM_THREADS=1: threads fighting other loads add noise
    sz = QUICK if args.quick else Sizes()
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_report_"))
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, environment(device))
    report.raw["sizes"] = asdict(sz)
    report.start()
    log_dir = tempfile.mkdtemp(prefix="gpu_report_logs_")
    with section(report, budget, "warm-up fit") as ok:
        if ok:  # the first fit of a process pays for CUDA's context, cuBLAS and Lightning's imports: not a row's
            t0 = time.perf_counter()
            fit_clocked(adam_w("fused"), [], sz.small_width, sz.small_depth, 2 * sz.warmup, device, log_dir)
            report.raw["warmup_fit_s"] = time.perf_counter() - t0
    # rough section costs on the H200 (s): they skip a section that cannot finish, not one that might
    big_s, loop_s, host_s, extras_s = (15.0, 5.0, 15.0, 45.0) if not args.quick else (2.0, 1.0, 1.0, 2.0)
    # what the 8M model's rounds leave for the sections after them
    reserve_s = host_s * ("host" in args.only) + extras_s * ("extras" in args.only)
    if "big" in args.only:
        with section(report, budget, "big model: rows 1, 6, 7", big_s) as ok:
            if ok:
                big_model_rows(report, sz, device, log_dir)
    if "loop" in args.only:
        with section(report, budget, "plain loop: row 5", loop_s) as ok:
            if ok:
                loop_rows(report, sz, device)
    if "small" in args.only:
        with section(report, budget, "8M model fits: rows 2, 3, 4", 10.0 if not args.quick else 1.0) as ok:
            if ok:
                small_model_rows(report, sz, device, log_dir, budget, reserve_s)
    if "host" in args.only:
        with section(report, budget, "8M model, library host time: rows 3, 4 resolved", host_s) as ok:
            if ok:
                host_rows(report, sz, device, log_dir)
    if "extras" in args.only:
        extras(report, sz, device, log_dir, budget, extras_s)
    report.note(f"total {budget.elapsed():.0f} s; table and raw numbers in {out}")
    print(f"\n## lightning-wd GPU report\n\n{report.env_line()}\n\n{report.table()}", flush=True)


if __name__ == "__main__":
    main()
