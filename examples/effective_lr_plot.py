"""Adam vs AMSGrad vs RMSprop: the effective learning rate that each really applies, as logged by
``EffectiveLRMonitor``.

Trains the digits MLP of ``examples/digits`` three times with the Lightning ``Trainer`` (constant lr, so that what
moves is the optimizer's second-moment estimate, not a schedule): with ``torch.optim.Adam``, ``Adam(amsgrad=True)``
and ``torch.optim.RMSprop``, all at the same lr. ``EffectiveLRMonitor`` logs each one's per-element rate (Adam's
``lr / (sqrt(v_hat) + eps)``, RMSprop's ``lr / (sqrt(square_avg) + eps)``) to a ``CSVLogger`` every few steps. The
script then reads the monitor's ``metrics.csv`` back and plots one column per optimizer over the steps, on a log
axis broken in two: below, the param group's median and min and the median of each weight matrix (Adam's median
repeated in the other panels, for comparison; a right axis in multiples of the lr); above, in a strip of its own,
the group's max, ``lr / eps`` (weights that never got a gradient), and its mean, which those weights pull up::

    python examples/effective_lr_plot.py              # writes examples/figures/effective_lr_adam_vs_amsgrad.png
    python examples/effective_lr_plot.py --epochs 20  # quicker (AMSGrad and Adam still look alike)
    python examples/effective_lr_plot.py --from-logs  # re-plot the last runs' metrics.csv without training
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import shutil
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parent / "digits"))
from digits import DigitsClassifier, DigitsDataModule, limit_threads  # noqa: E402

from lightning_wd import EffectiveLRMonitor  # noqa: E402

HERE = Path(__file__).resolve().parent
#: name -> (the optimizer's class name, under which the monitor logs its param groups; the panel's title)
OPTIMIZERS = {"adam": ("Adam", "Adam"), "amsgrad": ("Adam", "AMSGrad (Adam, amsgrad=True)"),
              "rmsprop": ("RMSprop", "RMSprop")}


class RMSpropDigits(DigitsClassifier):
    """The digits classifier with ``torch.optim.RMSprop`` (torch's defaults but the lr: alpha 0.99, eps 1e-8)."""

    def configure_optimizers(self):
        return torch.optim.RMSprop(self.parameters(), lr=self.hparams.lr)


def train(optimizer: str, epochs: int, lr: float, every: int, save_dir: Path) -> Path:
    """Train with ``optimizer`` and return the path of the ``metrics.csv`` that the monitor wrote."""
    shutil.rmtree(save_dir / "effective_lr" / optimizer, ignore_errors=True)  # CSVLogger would append to an old run
    pl.seed_everything(0, verbose=False)
    logger = CSVLogger(save_dir, name="effective_lr", version=optimizer)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=logger, log_every_n_steps=every, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[EffectiveLRMonitor(log_every_n_steps=every, per_parameter=True)],
    )
    if optimizer == "rmsprop":
        model = RMSpropDigits(lr=lr, cosine=False)
    else:
        model = DigitsClassifier(lr=lr, optimizer=optimizer, cosine=False)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    return Path(logger.log_dir) / "metrics.csv"


def read_series(path: Path, prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` for every column of ``metrics.csv`` that starts with ``prefix``."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith(prefix) and value not in ("", None):
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(int(row["step"]))
                    values.append(float(value))
    return series


def short(x: float) -> str:
    """``x`` to one significant digit, as ``6e3``."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def plot(csvs: dict[str, Path], lr: float, path: Path) -> None:
    """One column per optimizer, each on a broken log axis. Bottom (most of the height): the param group's median
    and min and the median of each weight matrix, the curves that move; a right axis reads them as multiples of the
    lr. Top strip: the group's max, which sits at ``lr / eps`` (weights that never got a gradient, ``v = 0``), and
    its mean, which those few weights pull up to thousands. The other panels repeat Adam's median (grey, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    groups, layers = {}, {}
    for name, csv_path in csvs.items():
        cls = OPTIMIZERS[name][0]
        series = read_series(csv_path, f"effective_lr/{cls}/")
        group = min(k.rsplit("/", 1)[0] for k in series if k.endswith("/median"))  # pg1 (pg0 in older logs)
        groups[name] = {k.rsplit("/", 1)[1]: v for k, v in series.items() if k.startswith(f"{group}/")}
        params = read_series(csv_path, "effective_lr/net.")
        layers[name] = {k.split("/")[1]: params[k] for k in sorted(params) if k.endswith("weight/median")}
    # the bottom axis holds every median and min; the strip every mean and max (each with a margin)
    low = [v for g in groups.values() for v in g["min"][1]]
    mid = [v for name in csvs for v in groups[name]["median"][1] + sum((s[1] for s in layers[name].values()), [])]
    high = [v for g in groups.values() for s in ("mean", "max") for v in g[s][1]]
    bottom_lim = (min(low) / 1.6, max(mid) * 2.5)
    top_lim = (min(high) / 4, max(high) * 2.5)
    decades = [math.log10(b / a) for a, b in (bottom_lim, top_lim)]

    fig = plt.figure(figsize=(4.6 * len(csvs) + 0.8, 6.2), layout="constrained")
    grid = fig.add_gridspec(2, len(csvs), height_ratios=[decades[1], decades[0] * 2])
    adam_median = groups["adam"]["median"] if "adam" in groups else None
    handles = {}
    for col, name in enumerate(csvs):
        g, title = groups[name], OPTIMIZERS[name][1]
        top = fig.add_subplot(grid[0, col])
        ax = fig.add_subplot(grid[1, col], sharex=top)
        steps = g["min"][0]
        for a in (top, ax):
            a.set_yscale("log")
            a.grid(alpha=0.3, which="major", lw=0.5)
        top.plot(steps, g["max"][1], color="black", ls=":", lw=1.5, label="group max")
        top.plot(steps, g["mean"][1], color="black", ls="-.", lw=1.2, label="group mean")
        top.set_ylim(*top_lim)
        top.tick_params(labelbottom=False, bottom=False)
        top.spines["bottom"].set_visible(False)
        ax.spines["top"].set_visible(False)
        top.annotate(f"max = lr / eps = {short(g['max'][1][-1])} (weights with no gradient, v = 0)",
                     (0.5, g["max"][1][-1] / 1.3), xycoords=("axes fraction", "data"), ha="center", va="top",
                     fontsize=8.5)
        top.annotate(f"mean ≈ {short(np.median(g['mean'][1]))}, pulled up by those weights",
                     (0.5, min(g["mean"][1]) / 1.3), xycoords=("axes fraction", "data"), ha="center", va="top",
                     fontsize=8.5)
        top.set_title(title, fontsize=11)
        if adam_median is not None and name != "adam":
            ax.plot(*adam_median, color="grey", ls="--", lw=1.5, label="Adam's group median")
        for i, (layer, series) in enumerate(layers[name].items()):
            ax.plot(*series, color=f"C{i}", lw=1.3, label=f"{layer} median")
        ax.plot(steps, g["median"][1], color="black", lw=2.5, label="group median")
        ax.plot(steps, g["min"][1], color="black", ls=(0, (1, 1.5)), lw=1.2, label="group min")
        ax.annotate(f"{g['median'][1][-1]:.2f}", (steps[-1], g["median"][1][-1]), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=9, fontweight="bold")
        ax.set_ylim(*bottom_lim)
        ax.set_xlim(0, steps[-1] * 1.12)
        ax.set_xlabel("optimizer step")
        # break marks between the two axes
        kw = dict(marker=[(-1, -0.5), (1, 0.5)], markersize=10, linestyle="none", color="k", mec="k", mew=1,
                  clip_on=False)
        top.plot([0, 1], [0, 0], transform=top.transAxes, **kw)
        ax.plot([0, 1], [1, 1], transform=ax.transAxes, **kw)
        if col == len(csvs) - 1:
            right = ax.secondary_yaxis("right", functions=(lambda y: y / lr, lambda y: y * lr))
            right.set_ylabel(f"× the lr ({lr:g})")
        for a in (top, ax):
            for h, lab in zip(*a.get_legend_handles_labels()):
                handles.setdefault(lab, h)
    fig.axes[1].set_ylabel("effective lr per element, lr / (sqrt(v) + eps)")
    order = ["group median", "net.0.weight median", "net.2.weight median", "net.4.weight median",
             "Adam's group median", "group min", "group mean", "group max"]
    labels = [k for k in order if k in handles] + [k for k in handles if k not in order]
    fig.legend([handles[k] for k in labels], labels, loc="outside lower center", ncol=len(labels), fontsize=9,
               frameon=False)
    fig.suptitle(f"Digits MLP, constant lr = {lr:g}: the effective lr of each element, logged by "
                 "lightning_wd.EffectiveLRMonitor (log scale; the axis is broken between the two parts)", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    # a 64-colour palette keeps the committed figure small and looks the same
    Image.open(buf).convert("RGB").quantize(colors=64).save(path, optimize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=5, help="log the effective lr every this many steps")
    p.add_argument("--out", type=Path, default=HERE / "figures" / "effective_lr_adam_vs_amsgrad.png")
    p.add_argument("--from-logs", action="store_true",
                   help="re-plot the metrics.csv of the last runs (examples/outputs/effective_lr) without training")
    args = p.parse_args()
    limit_threads()
    if args.from_logs:
        csvs = {opt: HERE / "outputs" / "effective_lr" / opt / "metrics.csv" for opt in OPTIMIZERS}
    else:
        csvs = {opt: train(opt, args.epochs, args.lr, args.every, HERE / "outputs") for opt in OPTIMIZERS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(csvs, args.lr, args.out)
    print(f"wrote {args.out} from {', '.join(str(c) for c in csvs.values())}")


if __name__ == "__main__":
    main()
