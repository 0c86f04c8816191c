"""The decay rules of ``lightning_wd`` on a network with normalization layers: lr x weight decay, over seeds.

The AdamW paper (Loshchilov & Hutter, 2019) found the best weight decay of its AdamW separable from the lr on
BatchNorm ResNets. ``lr_wd_sweep.py`` runs that experiment on a plain MLP, where it did not show. This script runs it
on the same digits MLP with a LayerNorm after each hidden layer (``Linear(bias=False) -> LayerNorm -> ReLU``, so each
hidden weight matrix is scale-invariant, as a conv before BatchNorm is), under a cosine lr schedule, and compares:

- ``none``: no decay;
- ``coupled``: L2 in the gradient, ``g += wd * p`` (``Adam(weight_decay=wd)``);
- ``decoupled``: PyTorch's AdamW, ``p -= lr_t * wd * p``;
- ``independent``: the AdamW paper's own rule, ``p -= (lr_t / lr_max) * wd * p``;
- ``corrected``: AdamC (Defazio 2025), ``p -= (lr_t**2 / lr_max) * wd * p``; the output layer uncorrected (plain
  decoupled decay), as the paper advises: only layers followed by a normalization are corrected;
- ``cautious``: decoupled decay only where the update and the weight have the same sign (Chen et al. 2025).

Every mode runs ``torch.optim.Adam(lr, weight_decay=wd)`` whose decay :func:`lightning_wd.attach_weight_decay` (the
engine of the ``WeightDecay`` callback) takes over, in a plain loop on in-memory tensors. Biases and the LayerNorm
weights and biases get no decay in any mode (``exclude_bias_and_norm``). The weight decays are in each mode's own
units; the grids are chosen so that they cover comparable per-step decays (see ``GRIDS``). Writes:

- ``decay_rules_heatmap.png``: mean test error (top) and test loss (bottom) per (lr, wd), one column per mode, the
  no-decay runs as the bottom row of each; each panel outlines in red what its own metric picks: a thin box on the
  best wd of each lr (where some wd beats no decay by > 10 %), a thick one on its best cell overall;
- ``decay_rules_sweep.md``: per mode, the cell chosen on the validation set (by error, by loss) and on the test set,
  with the std over seeds; the best test loss at each lr; how the best wd moves with the lr;
- ``decay_rules_sweep.csv``: one row per run (in ``examples/outputs``, or in ``--out``; not committed).

720 runs of about 1 s of one core each (80 epochs, 800 steps; 12 CPU-minutes); ``--jobs 2`` runs two at a time::

    python examples/decay_rules_sweep.py --jobs 2         # full grid, writes examples/figures/
    python examples/decay_rules_sweep.py --quick          # small grid, 1 seed, 15 epochs: ~5 s, examples/outputs/
    python examples/decay_rules_sweep.py --norm batch --jobs 2 --out examples/outputs/batchnorm   # BatchNorm instead
    python examples/decay_rules_sweep.py --from-csv examples/outputs/decay_rules_sweep.csv       # re-plot only
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent / "digits"))
from digits import limit_threads, load_split, train_cosine  # noqa: E402

from lightning_wd import attach_weight_decay  # noqa: E402
from lightning_wd.exclusion import excluded_parameters  # noqa: E402

HERE = Path(__file__).resolve().parent
MODES = ("none", "coupled", "decoupled", "independent", "corrected", "cautious")
# Each mode's weight decay is in its own units, and each grid (log10, half-decade steps) covers from "no effect" to
# "too strong" at most lrs (placed by a 1-seed pilot over wider grids):
# - decoupled, cautious: PyTorch AdamW's wd; the per-step decay at the peak lr is lr * wd.
# - corrected: the same units (timm's and the AdamC paper's): lr_t**2 / lr_max * wd is lr * wd at the peak lr. Over
#   a cosine run it applies 3/4 of AdamW's total decay at the same wd (the mean of cos**2 is 3/8, of cos 1/2).
# - independent: the AdamW paper's λ, itself the per-step decay at the peak lr: λ = lr_max * wd_pytorch. Its grid is
#   the AdamW grid times 10**-2.5, the middle lr, so that the two cover the same per-step decays there (at lr
#   10**-2.5 they are the same 8 runs, and at the other lrs they share some: a check that they agree).
# - coupled: L2 has units of its own (a gradient term, divided by Adam's denominator).
# Cells whose per-step decay at the peak would be >= 1 (p *= 1 - x zeroes or flips the weights, and lightning_wd
# refuses it) are not run.
GRIDS = {
    "coupled": [x / 2 for x in range(-8, 0)],  # 1e-4 ... 1e-0.5
    "decoupled": [x / 2 for x in range(-4, 4)],  # 1e-2 ... 1e1.5
    "independent": [x / 2 for x in range(-9, -1)],  # 1e-4.5 ... 1e-1
    "corrected": [x / 2 for x in range(-4, 4)],
    "cautious": [x / 2 for x in range(-4, 4)],
}
UNITS = {"none": "", "coupled": "L2 wd", "decoupled": "AdamW wd", "independent": "λ = lr·wd",
         "corrected": "AdamW wd", "cautious": "AdamW wd"}
FULL = dict(log_lrs=[-3.5, -3.0, -2.5, -2.0, -1.5, -1.0], grids=GRIDS, seeds=3, epochs=80)
QUICK = dict(log_lrs=[-2.5, -1.5], grids={"coupled": [-3.0, -1.0], "decoupled": [-1.0, 0.0],
                                          "independent": [-3.5, -2.5], "corrected": [-1.0, 0.0],
                                          "cautious": [-1.0, 0.0]}, seeds=1, epochs=15)


def make_norm_net(hidden: int = 128, depth: int = 2, norm: str = "layer") -> nn.Sequential:
    """An MLP 64 -> ``hidden`` x ``depth`` -> 10 with ``Linear(bias=False) -> LayerNorm (or BatchNorm1d) -> ReLU``
    hidden layers: the norm's own bias replaces the linear layer's, and each hidden weight matrix is scale-invariant
    (multiplying it by c > 0 changes nothing), the case in which decay acts on the effective lr of the layer."""
    layers: list[nn.Module] = []
    width = 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden, bias=False),
                   nn.LayerNorm(hidden) if norm == "layer" else nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def attach(opt: torch.optim.Optimizer, net: nn.Sequential, mode: str, lr: float):
    """Hand the decay of ``opt`` to lightning_wd in ``mode``: biases and norm parameters excluded in every mode; in
    corrected mode the output layer (not followed by a norm) gets the plain decoupled decay. ``None`` for no decay."""
    if mode == "none":
        return None
    excluded = list(excluded_parameters(net, exclude_bias_and_norm=True).values())
    if mode == "cautious":
        return attach_weight_decay(opt, mode="decoupled", cautious=True, exclude=excluded)
    if mode == "corrected":
        return attach_weight_decay(opt, mode="corrected", exclude=excluded, lr_max=lr, uncorrected=[net[-1].weight])
    return attach_weight_decay(opt, mode=mode, exclude=excluded, lr_max=lr if mode == "independent" else None)


def train(data: dict, mode: str, lr: float, wd: float, seed: int, epochs: int, batch_size: int = 128,
          norm: str = "layer") -> nn.Sequential:
    """Train one network with cosine-annealed Adam and ``mode`` decay; return it (in eval mode)."""
    torch.manual_seed(seed)  # the seed sets the initial weights and the batch order
    net = make_norm_net(norm=norm)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=0.0 if mode == "none" else wd)
    handle = attach(opt, net, mode, lr)
    train_cosine(net, opt, data["train"], epochs, batch_size, seed)
    if handle is not None:
        handle.detach()
    return net.eval()


@torch.no_grad()
def evaluate(net: nn.Sequential, data: dict) -> dict[str, float]:
    """Final val/test error and cross-entropy, and the norms of the hidden (normalized) and output weights."""
    out = {}
    for split in ("val", "test"):
        x, y = data[split]
        logits = net(x)
        out[f"{split}_err"] = float((logits.argmax(1) != y).float().mean())
        out[f"{split}_loss"] = float(F.cross_entropy(logits, y))
    hidden = [m.weight for m in net[:-1] if isinstance(m, nn.Linear)]
    out["hidden_norm"] = float(torch.sqrt(sum(w.square().sum() for w in hidden)))
    out["out_norm"] = float(net[-1].weight.norm())
    return out


def per_step_decay_at_peak(mode: str, lr: float, wd: float) -> float:
    """The ``x`` of ``p *= 1 - x`` at the first step (the peak lr); 0 for no decay and for coupled L2."""
    if mode in ("none", "coupled"):
        return 0.0
    return wd if mode == "independent" else lr * wd


_DATA: dict = {}


def run_one(cell: tuple[str, float, float | None, int, int, int, str]) -> dict:
    mode, log_lr, log_wd, seed, epochs, batch_size, norm = cell
    if not _DATA:  # once per process
        limit_threads()
        _DATA.update(load_split(seed=0))
    lr, wd = 10.0**log_lr, 0.0 if log_wd is None else 10.0**log_wd
    res = evaluate(train(_DATA, mode, lr, wd, seed, epochs, batch_size, norm), _DATA)
    return dict(mode=mode, log_lr=log_lr, log_wd="" if log_wd is None else log_wd, seed=seed, epochs=epochs,
                norm=norm, **res)


def cells(modes: list[str], log_lrs: list[float], grids: dict[str, list[float]], seeds: int) -> list[tuple]:
    """(mode, log_lr, log_wd, seed) of every run: the no-decay runs once per (lr, seed), the others over each mode's
    grid, except where the per-step decay at the peak lr would be >= 1."""
    out = [("none", lr, None, s) for lr, s in product(log_lrs, range(seeds))] if "none" in modes else []
    for m in modes:
        if m != "none":
            out += [(m, lr, wd, s) for lr, wd, s in product(log_lrs, grids[m], range(seeds))
                    if per_step_decay_at_peak(m, 10.0**lr, 10.0**wd) < 1]
    return out


def run_sweep(modes: list[str], log_lrs: list[float], grids: dict[str, list[float]], seeds: int, epochs: int,
              batch_size: int, norm: str, jobs: int) -> list[dict]:
    todo = [(*c, epochs, batch_size, norm) for c in cells(modes, log_lrs, grids, seeds)]
    bar = dict(desc="decay rules sweep", unit="run", total=len(todo))
    if jobs <= 1:
        return [run_one(c) for c in tqdm(todo, **bar)]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(jobs) as pool:  # each worker: one thread (limit_threads)
        return list(tqdm(pool.imap(run_one, todo), **bar))


# --- the results: grids of means, the table, the figure ------------------------------------------------------------
def grid_of(rows: list[dict], mode: str, log_lrs: list[float], ys: list[float], key: str
            ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over seeds of ``key`` for ``mode``, shaped ``[wd, lr]`` (``ys``: the mode's log10 wds; one row
    for "none"); NaN where no run was made, inf where a run diverged."""
    mean, std = np.full((len(ys), len(log_lrs)), np.nan), np.full((len(ys), len(log_lrs)), np.nan)
    for (i, y), (j, lr) in product(enumerate(ys), enumerate(log_lrs)):
        vals = [float(r[key]) for r in rows if r["mode"] == mode and float(r["log_lr"]) == lr
                and (mode == "none" or float(r["log_wd"]) == y)]
        vals = [np.inf if math.isnan(v) else v for v in vals]
        if vals:
            mean[i, j] = np.mean(vals)
            std[i, j] = np.std(vals) if np.all(np.isfinite(vals)) else np.nan
    return mean, std


def seed_cube(rows: list[dict], mode: str, log_lrs: list[float], ys: list[float], key: str) -> np.ndarray:
    """``key`` for ``mode`` per seed, shaped ``[seed, wd, lr]`` (seeds in sorted order); NaN where no run was made."""
    seeds = sorted({int(r["seed"]) for r in rows})
    cube = np.full((len(seeds), len(ys), len(log_lrs)), np.nan)
    index = {(y, lr): (i, j) for (i, y), (j, lr) in product(enumerate(ys), enumerate(log_lrs))}
    for r in rows:
        if r["mode"] == mode:
            cell = index.get((0.0 if mode == "none" else float(r["log_wd"]), float(r["log_lr"])))
            if cell is not None:
                cube[(seeds.index(int(r["seed"])), *cell)] = float(r[key])
    return cube


def slope_range(cube: np.ndarray, ys: list[float], log_lrs: list[float], ok: np.ndarray) -> tuple[float, float]:
    """The 10th and 90th percentiles of the separability slope over every resampling of the seeds with replacement
    (27 for 3 seeds): how much of the slope is seed noise."""
    n = cube.shape[0]
    slopes = []
    for pick in product(range(n), repeat=n):
        b = np.array(ys)[argmin(cube[list(pick)].mean(axis=0), axis=0)]
        slopes.append(np.polyfit(np.array(log_lrs)[ok], b[ok], 1)[0])
    return float(np.percentile(slopes, 10)), float(np.percentile(slopes, 90))


def argmin(grid: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``argmin`` that skips cells not run (NaN); the first (smallest wd) on ties."""
    return np.where(np.isnan(grid), np.inf, grid).argmin(axis=axis)


def chosen_cell(rows: list[dict], mode: str, log_lrs: list[float], ys: list[float], on: str) -> tuple[int, int]:
    """The (wd, lr) index of the cell that tuning on the val set picks: by ``on="val_err"``, the lowest mean val
    error, ties broken by the lower mean val loss (the error moves in steps of one image, so ties are common); by
    ``on="val_loss"``, the lowest mean val loss."""
    loss = grid_of(rows, mode, log_lrs, ys, "val_loss")[0]
    if on == "val_loss":
        return np.unravel_index(argmin(loss), loss.shape)
    err = grid_of(rows, mode, log_lrs, ys, "val_err")[0]
    order = np.lexsort((np.nan_to_num(loss, nan=np.inf).ravel(), np.nan_to_num(err, nan=np.inf).ravel()))
    return np.unravel_index(order[0], err.shape)


#: a column (lr) counts in the separability measure where the mode's best test loss there is this much below the
#: no-decay run's: elsewhere the decay changes little and the best wd is the argmin of a flat column (noise)
MATTERS = 0.9


def decay_matters(loss: np.ndarray, base: np.ndarray | None) -> np.ndarray:
    """The lr columns where some wd lowers the mean test loss to below ``MATTERS`` x the no-decay loss (``base``,
    one row); every column where there are no no-decay runs."""
    best = np.where(np.isnan(loss), np.inf, loss).min(axis=0)
    return np.ones(loss.shape[1], bool) if base is None else best < MATTERS * base[0]


def fmt(x: float) -> str:
    return f"1e{x:g}"


def ys_of(mode: str, grids: dict[str, list[float]]) -> list[float]:
    return [0.0] if mode == "none" else grids[mode]


def shared_runs(rows: list[dict]) -> tuple[int, float]:
    """Decoupled and independent runs that the mapping λ = lr * wd makes the same run (same lr and seed): how many
    pairs, and the largest difference of their test losses."""
    ind = {(float(r["log_lr"]), round(float(r["log_wd"]), 6), r["seed"]): float(r["test_loss"]) for r in rows
           if r["mode"] == "independent"}
    diffs = [abs(float(r["test_loss"]) - ind[k]) for r in rows if r["mode"] == "decoupled"
             and (k := (float(r["log_lr"]), round(float(r["log_lr"]) + float(r["log_wd"]), 6), r["seed"])) in ind]
    return len(diffs), max(diffs, default=float("nan"))


def summary(rows: list[dict], modes: list[str], log_lrs: list[float], grids: dict[str, list[float]], seeds: int,
            epochs: int, norm: str) -> str:
    """Markdown: per mode, the cells chosen on val and on test with their seed std; the best test loss at each lr;
    how the best wd moves with the lr."""
    base = grid_of(rows, "none", log_lrs, [0.0], "test_loss")[0] if "none" in modes else None
    best = [
        "| mode | wd in | chosen on val error: test error, loss (lr, wd) "
        "| chosen on val loss: test error, loss (lr, wd) | best test error, chosen on test (lr, wd) "
        "| best test loss, chosen on test (lr, wd) |",
        "|---|---|---|---|---|---|",
    ]
    per_lr = [f"| mode | {' | '.join(f'lr {fmt(x)}' for x in log_lrs)} |", "|---" * (len(log_lrs) + 1) + "|"]
    sep = [f"| mode: log10 of | best wd per lr by test loss, lr = {', '.join(fmt(x) for x in log_lrs)} | spread "
           "| slope (seed resamples) |", "|---|---|---|---|"]
    for mode in modes:
        ys = ys_of(mode, grids)
        err, err_sd = grid_of(rows, mode, log_lrs, ys, "test_err")
        loss, loss_sd = grid_of(rows, mode, log_lrs, ys, "test_loss")

        def at(i: int, j: int) -> str:
            return f"({fmt(log_lrs[j])}, {'0' if mode == 'none' else fmt(ys[i])})"

        def both(i: int, j: int) -> str:
            return (f"{100 * err[i, j]:.2f} ± {100 * err_sd[i, j]:.2f} %, {loss[i, j]:.3f} ± {loss_sd[i, j]:.3f}"
                    f" {at(i, j)}")

        (k, m), (u, w) = (np.unravel_index(argmin(g), g.shape) for g in (err, loss))
        best.append(f"| {mode} | {UNITS[mode]} | {both(*chosen_cell(rows, mode, log_lrs, ys, 'val_err'))} "
                    f"| {both(*chosen_cell(rows, mode, log_lrs, ys, 'val_loss'))} "
                    f"| {100 * err[k, m]:.2f} ± {100 * err_sd[k, m]:.2f} % {at(k, m)} "
                    f"| {loss[u, w]:.3f} ± {loss_sd[u, w]:.3f} {at(u, w)} |")
        rows_best = argmin(loss, axis=0)
        per_lr.append(f"| {mode} | " + " | ".join(
            f"{loss[i, j]:.3f} ± {loss_sd[i, j]:.3f}" for j, i in enumerate(rows_best)) + " |")
        if mode == "none":
            continue
        ok = decay_matters(loss, base)
        b = np.array(ys)[rows_best]
        slope, spread = "–", "–"
        if ok.sum() > 1:
            lo, hi = slope_range(seed_cube(rows, mode, log_lrs, ys, "test_loss"), ys, log_lrs, ok)
            slope = f"{np.polyfit(np.array(log_lrs)[ok], b[ok], 1)[0]:+.2f} ({lo:+.2f} … {hi:+.2f})"
        if ok.any():
            spread = f"{np.ptp(b[ok]):g}"
        listed = ", ".join(f"{x:g}" if o else f"({x:g})" for x, o in zip(b, ok))
        sep.append(f"| {mode}: {UNITS[mode]} | {listed} | {spread} | {slope} |")
    n_shared, max_diff = shared_runs(rows)
    net = "LayerNorm" if norm == "layer" else "BatchNorm"
    head = (f"Digits MLP with a {net} after each hidden layer, Adam, {epochs} epochs, cosine lr, {seeds} seed(s) per"
            " cell; biases and norm parameters never decayed. Test set: 360 images (one image = 0.28 %; an error"
            " rate of 2 % measured on 360 images has a sampling std of 0.74 %); val set: 180 images (one image ="
            " 0.56 %). ± is the std over seeds of the cell's runs. *Chosen on val*: the cell with the lowest mean val"
            " error (ties: lower val loss), or the lowest mean val loss, as one would tune. *Chosen on test*: the"
            " best cell by the test metric itself, which flatters every row.\n\n")
    mid = ("\n\nThe best mean test loss at each lr (over the mode's wds), ± the std over seeds of that cell:\n\n")
    note = ("\nSeparability: for each lr, the log10 wd (in the mode's own units) with the lowest mean test loss. In"
            f" parentheses: lrs where no wd brings the test loss {100 * (1 - MATTERS):.0f} % below no decay's, so"
            " that the best wd is the argmin of a nearly flat column; they are left out of *spread* (max - min, in"
            " decades) and *slope* (least-squares slope against log10(lr); in parentheses its 10th-90th percentile over"
            " the resamplings of the seeds with replacement, each cell averaged over the resampled seeds; with 3"
            " seeds this understates the noise). Slope 0: the best wd does not move with"
            " the lr (separable in that mode's units); in AdamW units, -1: only the per-step decay lr·wd matters,"
            " which is slope 0 in λ units (independent), where AdamW's slope 0 is +1.\n")
    if n_shared:
        note += (f"\nDecoupled and independent runs that the mapping λ = lr·wd makes the same run: {n_shared} pairs,"
                 f" largest difference in test loss {max_diff:.2g}.\n")
    return head + "\n".join(best) + mid + "\n".join(per_lr) + "\n\n" + "\n".join(sep) + "\n" + note


#: mode -> (its name, its rule per step), the title of its column
TITLES = {
    "coupled": ("coupled (Adam + L2)", "grad += wd·p"),
    "decoupled": ("decoupled (PyTorch AdamW)", "p -= lr_t·wd·p"),
    "independent": ("independent (the AdamW paper's)", "p -= (lr_t / lr_max)·λ·p"),
    "corrected": ("corrected (AdamC; output layer decoupled)", "p -= (lr_t² / lr_max)·wd·p"),
    "cautious": ("cautious (decoupled)", "p -= lr_t·wd·p where sign(update) = sign(p)"),
}


def best_cells(err: np.ndarray, loss: np.ndarray, by: str) -> np.ndarray:
    """Boolean mask of the cells of the lowest mean ``by`` ("test_err" or "test_loss") over a whole grid, all ties
    included (the error moves in steps of one image, so it ties often)."""
    g = np.where(np.isfinite(err if by == "test_err" else loss), err if by == "test_err" else loss, np.nan)
    return np.isclose(g, np.nanmin(g), rtol=1e-9, atol=0)  # means over seeds of equal counts may differ in the ulp


def best_per_lr(err: np.ndarray, loss: np.ndarray, by: str) -> np.ndarray:
    """The row (wd) of the lowest mean ``by`` in each lr column: by test loss as in the table's separability row; by
    test error with ties broken by the lower test loss, as ``chosen_cell`` does on the val set."""
    if by == "test_loss":
        return argmin(loss, axis=0)
    e, lo = (np.where(np.isnan(x), np.inf, x.round(9)) for x in (err, loss))
    return np.array([np.lexsort((lo[:, j], e[:, j]))[0] for j in range(e.shape[1])])


def cell_text(v: float, key: str) -> str:
    """A heatmap label: errors in % to 0.1 (one test image is 0.28 %), losses to two significant digits without the
    leading zero (.081, .15, 1.3)."""
    if np.isnan(v):
        return "–"
    if np.isinf(v):
        return "inf"
    r = round(v, 1) if key == "test_err" else float(f"{v:.2g}")
    if r >= 10:
        return f"{r:.0f}"
    if r >= 1 or key == "test_err":
        return f"{r:.1f}"
    return (f"{r:.2f}" if r >= 0.1 else f"{r:.3f}").removeprefix("0")


def plot(rows: list[dict], modes: list[str], log_lrs: list[float], grids: dict[str, list[float]], path: Path,
         norm: str) -> None:
    """Heatmaps of mean test error (top) and test loss (bottom), one column per mode, the no-decay runs as the
    bottom row ("none") of each, shared colour scales. Each panel outlines what its own metric picks: the best wd
    at each lr where some wd beats no decay by > 10 % (thin red box), and its best cell overall (thick box)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle
    from PIL import Image

    cols = [m for m in modes if m != "none"]
    fig, axes = plt.subplots(2, len(cols), figsize=(3.9 * len(cols) + 1.3, 11.2), squeeze=False,
                             layout="constrained")
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="white")
    for row, (key, scale, vmax, label, what) in enumerate([
            ("test_err", 100, 6, "mean test error % (log scale, clipped at 6)", "test error"),
            ("test_loss", 1, 0.4, "mean test cross-entropy (log scale, clipped at 0.4)", "test loss")]):
        base = scale * grid_of(rows, "none", log_lrs, [0.0], key)[0] if "none" in modes else None
        grids_ = [scale * grid_of(rows, m, log_lrs, grids[m], key)[0] for m in cols]
        vmin = min(np.nanmin(g) for g in grids_ + ([base] if base is not None else []))
        for ax, mode, g in zip(axes[row], cols, grids_):
            ys = grids[mode]
            err = grid_of(rows, mode, log_lrs, ys, "test_err")[0]
            loss = grid_of(rows, mode, log_lrs, ys, "test_loss")[0]
            shown = g if base is None else np.vstack([base, g])
            off = 0 if base is None else 1
            colours = LogNorm(vmin, vmax)  # a log scale spreads the colours over the good cells
            im = ax.imshow(np.minimum(shown, vmax), origin="lower", cmap=cmap, norm=colours, aspect="auto")
            for (i, j), v in np.ndenumerate(shown):
                dark = not np.isnan(v) and colours(min(v, vmax)) > 0.55
                ax.text(j, i, cell_text(v, key), ha="center", va="center", fontsize=10,
                        color="white" if dark else "black")
            if base is not None:
                ax.axhline(0.5, color="black", lw=1.5)
            # what this panel's metric picks: the best wd of each lr where decay matters, and the best cell
            ok = decay_matters(g, base)
            for j, i in enumerate(best_per_lr(err, loss, key)):
                if ok[j]:
                    ax.add_patch(Rectangle((j - 0.44, i + off - 0.42), 0.88, 0.84, fill=False, ec="red", lw=1.6))
            for i, j in zip(*np.nonzero(best_cells(err, loss, key))):
                ax.add_patch(Rectangle((j - 0.47, i + off - 0.45), 0.94, 0.9, fill=False, ec="red", lw=3.8))
            ax.set_xticks(range(len(log_lrs)), [f"{x:g}" for x in log_lrs])
            ax.set_yticks(range(len(ys) + off), (["none"] if off else []) + [f"{y:g}" for y in ys])
            ax.tick_params(labelsize=9.5, length=0)
            ax.set_ylabel(f"log10({UNITS[mode]})", fontsize=10)
            ax.set_xlabel("log10(peak learning rate)", fontsize=10)
            name, rule = TITLES[mode]
            ax.set_title((f"{name}\n{rule}\n" if row == 0 else f"{name}\n")
                         + f"best wd by {what} (thin: at each lr; thick: overall)", fontsize=9.5)
        bar = fig.colorbar(im, ax=axes[row].tolist(), label=label, shrink=0.85, aspect=25)
        ticks = [t for t in (0.05, 0.1, 0.2, 0.3, 0.4, 1, 1.5, 2, 3, 4, 5, 6) if vmin <= t <= vmax]
        bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
        bar.ax.minorticks_off()
    net = "LayerNorm" if norm == "layer" else "BatchNorm"
    key_boxes = [Rectangle((0, 0), 1, 1, fill=False, ec="red", lw=1.6), Rectangle((0, 0), 1, 1, fill=False, ec="red",
                                                                                  lw=3.8)]
    fig.legend(key_boxes, ["thin box: the best wd at each lr, by the panel's own metric (only at lrs where some wd"
                           " beats no decay by more than 10 %; error ties: the lower test loss)",
                           "thick box: the panel's best cell overall (every tie): the table's 'chosen on test' cell"],
               loc="outside lower center", ncol=2, fontsize=10, frameon=False, handlelength=1.4, handleheight=1.2)
    seeds = len({r["seed"] for r in rows})
    fig.suptitle(f"Digits MLP with {net}, Adam, cosine lr: mean over {seeds} seed{'s' * (seeds > 1)} of each"
                 " (lr, wd) cell. Top: test error %, bottom: test loss; row 'none': no decay; –: per-step decay ≥ 1,"
                 " not run", fontsize=12)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    # a 128-colour palette keeps the committed figure small and looks the same
    Image.open(buf).convert("RGB").quantize(colors=128).save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="2 lrs x 2 wds per mode, 1 seed, 15 epochs (a few seconds): a smoke test, too short to read"
                        " results from")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seeds", type=int, help="seeds per cell (default 3; 1 with --quick)")
    p.add_argument("--epochs", type=int, help="epochs per run (default 80; 15 with --quick)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--norm", choices=("layer", "batch"), default="layer", help="LayerNorm (default) or BatchNorm1d")
    p.add_argument("--jobs", type=int, default=1, help="processes (each uses one thread; default 1)")
    p.add_argument("--out", type=Path, help="folder of the figure, the table and the CSV of the runs (default: the"
                                            " figure and table to examples/figures, the CSV to examples/outputs;"
                                            " all to examples/outputs with --quick)")
    p.add_argument("--from-csv", type=Path, help="re-plot the runs of an earlier sweep instead of training")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: v for k, v in (("seeds", args.seeds), ("epochs", args.epochs)) if v is not None})
    out = args.out or HERE / ("outputs" if args.quick else "figures")
    out.mkdir(parents=True, exist_ok=True)
    stem = "decay_rules_sweep" + ("_quick" if args.quick else "") + ("_batchnorm" if args.norm == "batch" else "")
    csv_path = (args.out or HERE / "outputs") / f"{stem}.csv"  # the runs: examples/outputs unless --out

    start = time.perf_counter()
    if not args.from_csv:
        limit_threads()
        rows = run_sweep(args.modes, cfg["log_lrs"], cfg["grids"], cfg["seeds"], cfg["epochs"], args.batch_size,
                         args.norm, args.jobs)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    # the table and the figure are made from the CSV, also right after training: one code path for both
    with open(args.from_csv or csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if args.from_csv:
        modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
        cfg["log_lrs"] = sorted({float(r["log_lr"]) for r in rows})
        cfg["grids"] = {m: sorted({float(r["log_wd"]) for r in rows if r["mode"] == m}) for m in modes if m != "none"}
        cfg["seeds"] = len({r["seed"] for r in rows})
        cfg["epochs"] = int(rows[0]["epochs"])
        args.norm = rows[0]["norm"]
    else:
        modes = args.modes

    table = summary(rows, modes, cfg["log_lrs"], cfg["grids"], cfg["seeds"], cfg["epochs"], args.norm)
    suffix = "_batchnorm" if args.norm == "batch" else ""
    (out / f"decay_rules_sweep{suffix}.md").write_text(table)
    plot(rows, modes, cfg["log_lrs"], cfg["grids"], out / f"decay_rules_heatmap{suffix}.png", args.norm)
    print(table)
    print(f"{len(rows)} runs, {time.perf_counter() - start:.0f} s; wrote {out / f'decay_rules_heatmap{suffix}.png'},"
          f" {out / f'decay_rules_sweep{suffix}.md'}" + ("" if args.from_csv else f", {csv_path}"))


if __name__ == "__main__":
    main()
