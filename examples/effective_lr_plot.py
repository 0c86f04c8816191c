"""Adam vs AMSGrad vs RMSprop: the effective learning rate that each really applies, as logged by
``EffectiveLRMonitor``.

Trains the digits MLP of ``examples/digits`` three times with the Lightning ``Trainer`` (constant lr, so that what
moves is the optimizer's second-moment estimate, not a schedule): with ``torch.optim.Adam``, ``Adam(amsgrad=True)``
and ``torch.optim.RMSprop``, all at the same lr. ``EffectiveLRMonitor`` logs each one's per-element rate (Adam's
``lr / (sqrt(v_hat) + eps)``, RMSprop's ``lr / (sqrt(square_avg) + eps)``) to a ``CSVLogger`` every few steps. The
script then reads the monitor's ``metrics.csv`` back and plots, on a log scale, one panel per optimizer: the
param-group min / median / mean / max and the median of each weight matrix over the steps::

    python examples/effective_lr_plot.py              # writes examples/figures/effective_lr_adam_vs_amsgrad.png
    python examples/effective_lr_plot.py --epochs 20  # quicker (AMSGrad and Adam still look alike)
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import lightning.pytorch as pl
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
        enable_model_summary=False, callbacks=[EffectiveLRMonitor(log_every_n_steps=every)],
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


def plot(csvs: dict[str, Path], lr: float, path: Path) -> None:
    """One panel per optimizer: the param group's min/median/mean/max, and the median of each weight matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(csvs), figsize=(5 * len(csvs), 4.2), sharey=True)
    for ax, (name, csv_path) in zip(axes, csvs.items()):
        cls, title = OPTIMIZERS[name]
        g = {k.rsplit("/", 1)[1]: v for k, v in read_series(csv_path, f"effective_lr/{cls}/pg0/").items()}
        steps = g["min"][0]
        ax.fill_between(steps, g["min"][1], g["max"][1], color="grey", alpha=0.12, lw=0, label="group min to max")
        for stat, ls, lw in (("max", ":", 1), ("mean", "-.", 1), ("median", "-", 2.5), ("min", ":", 1)):
            ax.plot(steps, g[stat][1], color="black", ls=ls, lw=lw, label=f"group {stat}")
        params = read_series(csv_path, "effective_lr/net.")
        for i, key in enumerate(k for k in sorted(params) if k.endswith("weight/median")):
            ax.plot(*params[key], color=f"C{i}", lw=1.5, label=f"{key.split('/')[1]} median")
        ax.set_yscale("log")
        ax.axhline(lr, color="tab:red", lw=0.8, label=f"lr = {lr:g}")
        ax.set_xlabel("optimizer step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both", lw=0.4)
    axes[0].set_ylabel("effective lr (per element)")
    axes[0].legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle("Digits MLP, constant lr: the effective lr of each element, logged by lightning_wd.EffectiveLRMonitor",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=5, help="log the effective lr every this many steps")
    p.add_argument("--out", type=Path, default=HERE / "figures" / "effective_lr_adam_vs_amsgrad.png")
    args = p.parse_args()
    limit_threads()
    csvs = {opt: train(opt, args.epochs, args.lr, args.every, HERE / "outputs") for opt in OPTIMIZERS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(csvs, args.lr, args.out)
    print(f"wrote {args.out} from {', '.join(str(c) for c in csvs.values())}")


if __name__ == "__main__":
    main()
