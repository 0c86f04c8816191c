"""The AdamW paper's learning-rate x weight-decay experiment (Loshchilov & Hutter, 2019, Fig. 2) at laptop scale.

Trains the digits MLP of ``examples/digits`` over a grid of learning rates x weight decays, for several seeds and in
the decay modes of ``lightning_wd``, with ``torch.optim.Adam(weight_decay=wd)`` whose decay
:func:`lightning_wd.attach_weight_decay` takes over (the engine of the ``WeightDecay`` callback), and writes:

- ``lr_wd_heatmap.png``: mean final test error (top) and test loss (bottom) per (lr, wd), one column per mode, plus
  the decoupled runs re-indexed by lr·wd; red circles mark the best wd of each lr;
- ``lr_wd_sweep.md``: best test error and loss per mode, and how far the best wd moves across lrs;
- ``lr_wd_sweep.csv``: one row per run (written to ``examples/outputs``, not committed).

Modes: ``coupled`` is L2 in the gradient (``Adam(weight_decay=wd)``), ``decoupled`` is PyTorch's AdamW
(``p -= lr * wd * p``). The paper's own AdamW decays by ``(lr_t / lr_max) * λ`` (``mode="independent"``), which is
the decoupled run with ``λ = lr_max * wd``: the third column re-indexes the decoupled runs by ``lr * wd`` instead of
training them again (``--modes independent`` trains it for real). A plain loop on in-memory tensors, one thread:
about 5 min of one core by default (15 min measured on a busy 2-core machine)::

    python examples/lr_wd_sweep.py            # full grid, writes examples/figures/
    python examples/lr_wd_sweep.py --quick    # small grid, ~15 s, writes examples/outputs/
    python examples/lr_wd_sweep.py --from-csv examples/outputs/lr_wd_sweep.csv   # re-plot only
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from itertools import product
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent / "digits"))
from digits import limit_threads, load_split, make_net, train_cosine  # noqa: E402

from lightning_wd import attach_weight_decay  # noqa: E402

HERE = Path(__file__).resolve().parent
MODES = ("coupled", "decoupled", "independent")
FULL = dict(log_lrs=[-3.0, -2.5, -2.0, -1.5, -1.0], log_wds=[x / 2 for x in range(-10, 4)], seeds=3, epochs=80)
QUICK = dict(log_lrs=[-3.0, -2.0], log_wds=[-4.0, -3.0, -2.0, -1.0, 0.0, 1.0], seeds=1, epochs=30)


def train_once(data: dict, mode: str, lr: float, wd: float, seed: int, epochs: int, batch_size: int
               ) -> dict[str, float]:
    """Train one model with cosine-annealed Adam and ``mode`` decay; return its final errors and test loss."""
    torch.manual_seed(seed)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=wd)
    handle = attach_weight_decay(opt, mode=mode)  # lr_max of "independent" = this initial lr
    train_cosine(net, opt, data["train"], epochs, batch_size, seed)
    handle.detach()
    with torch.no_grad():
        (xv, yv), (xt, yt) = data["val"], data["test"]
        logits = net(xt)
        return dict(val_err=float((net(xv).argmax(1) != yv).float().mean()),
                    test_err=float((logits.argmax(1) != yt).float().mean()),
                    test_loss=float(F.cross_entropy(logits, yt)))


def refused(mode: str, log_lr: float, log_wd: float) -> bool:
    """Whether lightning_wd refuses the cell: a per-step decay ``x`` of 1 or more at the peak lr (``p *= 1 - x``
    zeroes or flips the weights); ``x = lr * wd`` decoupled, ``wd`` independent, none for coupled L2."""
    lr, wd = 10.0**log_lr, 10.0**log_wd
    return mode != "coupled" and (wd if mode == "independent" else lr * wd) >= 1


def run_sweep(modes: list[str], log_lrs: list[float], log_wds: list[float], seeds: int, epochs: int,
              batch_size: int) -> list[dict]:
    data = load_split(seed=0)
    # wd = 0 is the same run in every mode: train it once per (lr, seed) and share it
    grid = [("none", lr, None, s) for lr, s in product(log_lrs, range(seeds))]
    grid += [(m, lr, wd, s) for m, lr, wd, s in product(modes, log_lrs, log_wds, range(seeds))
             if not refused(m, lr, wd)]  # not run: blank in the figure
    rows = []
    for mode, log_lr, log_wd, seed in tqdm(grid, desc="lr x wd sweep", unit="run"):
        wd = 0.0 if log_wd is None else 10.0**log_wd
        res = train_once(data, "decoupled" if mode == "none" else mode, 10.0**log_lr, wd, seed, epochs, batch_size)
        rows.append(dict(mode=mode, log_lr=log_lr, log_wd="" if log_wd is None else log_wd, seed=seed, epochs=epochs,
                         **res))
    return rows


View = tuple[str, bool]  # (mode, per_step): per_step re-indexes the rows by log10(lr * wd) instead of log10(wd)


def view_rows(rows: list[dict], view: View, log_wds: list[float]) -> list[float]:
    """The y values of a view: the wd grid, or for ``per_step`` every lr·wd of the grid down to 10x below its
    smallest wd (smaller per-step decays shrink the weights by < 0.1 % over a run and carry no information)."""
    if not view[1]:
        return log_wds
    ys = {round(float(r["log_lr"]) + float(r["log_wd"]), 6) for r in rows if r["mode"] == view[0]}
    return sorted(y for y in ys if y >= min(log_wds) - 1)


def mean_grid(rows: list[dict], view: View, log_lrs: list[float], ys: list[float], key: str = "test_err"
              ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over seeds of ``key``, shaped ``[y, lr]``; NaN where the grid has no run, inf where one diverged."""
    mode, per_step = view
    cells: dict[tuple[float, float], list[float]] = {}
    for r in rows:
        if r["mode"] == mode:
            y = round(float(r["log_wd"]) + (float(r["log_lr"]) if per_step else 0.0), 6)
            v = float(r[key])
            cells.setdefault((y, float(r["log_lr"])), []).append(np.inf if math.isnan(v) else v)
    mean, std = np.full((len(ys), len(log_lrs)), np.nan), np.full((len(ys), len(log_lrs)), np.nan)
    for (i, y), (j, lr) in product(enumerate(ys), enumerate(log_lrs)):
        if c := cells.get((round(y, 6), lr)):
            mean[i, j] = np.mean(c)
            std[i, j] = np.std(c) if np.all(np.isfinite(c)) else np.nan
    return mean, std


def argmin(grid: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``argmin`` that skips missing cells (NaN); the first (smallest wd) on ties."""
    return np.where(np.isnan(grid), np.inf, grid).argmin(axis=axis)


def trained(err: np.ndarray) -> np.ndarray:
    """The lr columns where some wd trains: best mean test error within 2x the grid's best. The others (lr too large
    or too small for this budget) have no meaningful best wd and are left out of the separability measure."""
    col_best = np.where(np.isnan(err), np.inf, err).min(axis=0)
    return col_best <= 2 * col_best.min()


def fmt(x: float) -> str:
    return f"1e{x:g}"


def summary(rows: list[dict], views: list[View], log_lrs: list[float], log_wds: list[float], seeds: int, epochs: int
            ) -> str:
    """Markdown: best test error and loss per mode, and the separability of lr and wd (how the best wd moves)."""
    base = [[r for r in rows if r["mode"] == "none" and float(r["log_lr"]) == lr] for lr in log_lrs]
    b_err, b_val, b_loss = ([[float(r[k]) for r in b] for b in base] for k in ("test_err", "val_err", "test_loss"))
    be, bv = int(np.argmin([np.mean(e) for e in b_err])), int(np.argmin([np.mean(v) for v in b_val]))
    bl = int(np.argmin([np.mean(x) for x in b_loss]))
    best = [
        "| mode | best test error (mean ± std) | at lr, wd | test error at the best val error | at lr, wd "
        "| best test loss | at lr, wd |",
        "|---|---|---|---|---|---|---|",
        f"| no decay (wd = 0) | {100 * np.mean(b_err[be]):.2f} ± {100 * np.std(b_err[be]):.2f} % "
        f"| {fmt(log_lrs[be])}, 0 | {100 * np.mean(b_err[bv]):.2f} % | {fmt(log_lrs[bv])}, 0 "
        f"| {np.mean(b_loss[bl]):.3f} | {fmt(log_lrs[bl])}, 0 |",
    ]
    sep = [
        f"| mode: y axis | best y per lr by test loss, lr = {', '.join(fmt(x) for x in log_lrs)} | spread | slope "
        "| best y by test error | spread | slope |",
        "|---|---|---|---|---|---|---|",
    ]
    for view in views:
        ys = view_rows(rows, view, log_wds)
        err, std = mean_grid(rows, view, log_lrs, ys, "test_err")
        val = mean_grid(rows, view, log_lrs, ys, "val_err")[0]
        loss = mean_grid(rows, view, log_lrs, ys, "test_loss")[0]
        if not view[1]:
            (i, j), (k, m), (u, w) = (np.unravel_index(argmin(g), g.shape) for g in (err, loss, val))
            best.append(f"| {view[0]} | {100 * err[i, j]:.2f} ± {100 * std[i, j]:.2f} % "
                        f"| {fmt(log_lrs[j])}, {fmt(ys[i])} | {100 * err[u, w]:.2f} % "
                        f"| {fmt(log_lrs[w])}, {fmt(ys[u])} "
                        f"| {loss[k, m]:.3f} | {fmt(log_lrs[m])}, {fmt(ys[k])} |")
        ok = trained(err)
        cols = []
        for grid in (loss, err):
            b = np.array(ys)[argmin(grid, axis=0)]
            slope = np.polyfit(np.array(log_lrs)[ok], b[ok], 1)[0] if ok.sum() > 1 else float("nan")
            listed = ", ".join(f"{x:g}" if o else "–" for x, o in zip(b, ok))
            cols.append(f"{listed} | {np.ptp(b[ok]):g} | {slope:+.2f}")
        sep.append(f"| {view[0]}: log10({'lr·wd' if view[1] else 'wd'}) | {cols[0]} | {cols[1]} |")
    head = (f"Digits MLP, {epochs} epochs, cosine lr, {seeds} seed(s) per cell; test set of 360 images (one image ="
            " 0.28 %), val set of 180. *Best* cells are chosen on the mean over seeds of the test metric itself, which"
            " flatters every row alike; the val column chooses the cell on val error instead.\n\n")
    note = ("\nSeparability: for each lr, the y (log10 of wd, or of lr·wd: the per-step decay at peak lr, the"
            " paper's λ) with the lowest mean test loss or error; – marks an lr at which no wd trains (best error"
            " over 2x the grid's best), left out. *spread*: max - min of the best y over the other lrs, in decades;"
            " *slope*: least-squares slope of the best y against log10(lr). 0 = lr and wd separable.\n")
    return head + "\n".join(best) + "\n\n" + "\n".join(sep) + "\n" + note


TITLES = {
    ("coupled", False): "coupled: Adam + L2\ngrad += wd·p",
    ("decoupled", False): "decoupled: PyTorch AdamW\np -= lr·wd·p",
    ("independent", False): "independent: the paper's AdamW\np -= (lr_t / lr_max)·wd·p",
    ("decoupled", True): "decoupled, re-indexed by lr·wd = the paper's λ\n(= mode 'independent' with wd = lr·wd)",
}


def plot(rows: list[dict], views: list[View], log_lrs: list[float], log_wds: list[float], path: Path) -> None:
    """Heatmaps of mean test error (top) and test loss (bottom), one column per view, shared colour scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(2, len(views), figsize=(3.6 * len(views) + 1.2, 8.6), squeeze=False,
                             layout="constrained")
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="white")
    yss = [view_rows(rows, v, log_wds) for v in views]
    ok = [trained(mean_grid(rows, v, log_lrs, ys)[0]) for v, ys in zip(views, yss)]  # circles where some wd trains
    for row, (key, scale, vmax, label) in enumerate([("test_err", 100, 15, "test error %"),
                                                      ("test_loss", 1, 0.6, "test cross-entropy")]):
        grids = [scale * mean_grid(rows, v, log_lrs, ys, key)[0] for v, ys in zip(views, yss)]
        vmin = min(np.nanmin(g) for g in grids)
        for ax, view, ys, g, cols in zip(axes[row], views, yss, grids, ok):
            im = ax.imshow(np.minimum(g, vmax), origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
            for (i, j), v in np.ndenumerate(g):
                if not np.isnan(v):
                    text = "inf" if np.isinf(v) else f"{v:.0f}" if v >= 10 else f"{v:.1f}" if row == 0 else f"{v:.2f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                            color="white" if v > (vmin + vmax) / 2 else "black")
            cols = np.flatnonzero(cols)
            ax.plot(cols, argmin(g, axis=0)[cols], "o-", mfc="none", color="red", ms=10, mew=1.5, lw=0.8)
            ax.set_xticks(range(len(log_lrs)), [f"{x:g}" for x in log_lrs])
            ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
            ax.set_ylabel(f"log10({'lr · weight decay' if view[1] else 'weight decay'})", fontsize=8)
            if row == 0:
                ax.set_title(TITLES[view], fontsize=9)
            else:
                ax.set_xlabel("log10(learning rate)")
        fig.colorbar(im, ax=axes[row].tolist(), label=f"{label} (clipped at {vmax:g})", shrink=0.9)
    fig.suptitle("Digits MLP, mean over seeds; red circles: best wd for each lr", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    # a 128-colour palette keeps the committed figure well under 200 KB and looks the same
    Image.open(buf).convert("RGB").quantize(colors=128).save(path, optimize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small grid, 1 seed, 30 epochs (~15 s): a smoke test, too short to read results from")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["coupled", "decoupled"])
    p.add_argument("--seeds", type=int, help="seeds per grid point (default 3; 1 with --quick)")
    p.add_argument("--epochs", type=int, help="epochs per run (default 80; 30 with --quick)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", type=Path, help="folder of the figure and table (default examples/figures; "
                                            "examples/outputs with --quick)")
    p.add_argument("--from-csv", type=Path, help="re-plot the runs of an earlier sweep instead of training")
    args = p.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: v for k, v in (("seeds", args.seeds), ("epochs", args.epochs)) if v is not None})
    out = args.out or HERE / ("outputs" if args.quick else "figures")
    out.mkdir(parents=True, exist_ok=True)
    csv_path = HERE / "outputs" / ("lr_wd_sweep_quick.csv" if args.quick else "lr_wd_sweep.csv")

    if args.from_csv:
        with open(args.from_csv, newline="") as f:
            rows = list(csv.DictReader(f))
        grid_rows = [r for r in rows if r["mode"] != "none"]
        cfg["log_lrs"] = sorted({float(r["log_lr"]) for r in grid_rows})
        cfg["log_wds"] = sorted({float(r["log_wd"]) for r in grid_rows})
        cfg["seeds"] = len({r["seed"] for r in rows})
        cfg["epochs"] = int(rows[0]["epochs"])
        args.modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    else:
        limit_threads()
        rows = run_sweep(args.modes, cfg["log_lrs"], cfg["log_wds"], cfg["seeds"], cfg["epochs"], args.batch_size)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    views = [(m, False) for m in args.modes] + ([("decoupled", True)] if "decoupled" in args.modes else [])
    table = summary(rows, views, cfg["log_lrs"], cfg["log_wds"], cfg["seeds"], cfg["epochs"])
    (out / "lr_wd_sweep.md").write_text(table)
    plot(rows, views, cfg["log_lrs"], cfg["log_wds"], out / "lr_wd_heatmap.png")
    print(table)
    print(f"wrote {out / 'lr_wd_heatmap.png'}, {out / 'lr_wd_sweep.md'}" + ("" if args.from_csv else f", {csv_path}"))


if __name__ == "__main__":
    main()
