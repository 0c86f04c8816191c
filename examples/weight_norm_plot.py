"""Decoupled (AdamW) vs corrected (AdamC) weight decay under a cosine schedule, as ``WeightNormMonitor`` logs it.

Trains the digits MLP of ``examples/digits`` with a LayerNorm (no affine parameters) after each hidden linear layer
(no bias), so that the network's output does not depend on the scale of those weight matrices: the setting of the
rotational equilibrium (Kosson et al., arXiv 2305.17212) and of AdamC (Defazio, arXiv 2506.02285). Both runs use
``torch.optim.Adam(weight_decay=wd)`` with a cosine lr schedule to 0, and ``lightning_wd.WeightDecay`` applies the
decay, once ``mode="decoupled"`` (``p *= 1 - lr_t*wd``, AdamW) and once ``mode="corrected"``
(``p *= 1 - wd*lr_t**2/lr_max``, AdamC). ``WeightNormMonitor`` logs to a ``CSVLogger``; the script reads its
``metrics.csv`` back and plots, for the hidden weight matrices, the measured norm against the predicted equilibrium
norm, and the gradient-to-weight ratio ``|g| / |w|``::

    python examples/weight_norm_plot.py           # writes examples/figures/weight_norm.png (about 25 s)
    python examples/weight_norm_plot.py --quick   # 5 epochs, writes examples/outputs/weight_norm.png
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
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent / "digits"))
from digits import DigitsClassifier, DigitsDataModule, limit_threads  # noqa: E402

from lightning_wd import WeightDecay, WeightNormMonitor  # noqa: E402

HERE = Path(__file__).resolve().parent
MODES = ("decoupled", "corrected")
#: the scale-invariant weight matrices: the hidden layers, each followed by a LayerNorm
HIDDEN = ("net.0.weight", "net.3.weight")


def make_normalized_net(hidden: int = 128, depth: int = 2) -> nn.Sequential:
    """64 -> (Linear without bias, LayerNorm without affine parameters, ReLU) x ``depth`` -> Linear -> 10."""
    layers: list[nn.Module] = []
    width = 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden, bias=False), nn.LayerNorm(hidden, elementwise_affine=False), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class NormalizedDigitsClassifier(DigitsClassifier):
    """``DigitsClassifier`` (Adam with its ``weight_decay``, cosine schedule) on :func:`make_normalized_net`, with
    Gaussian noise of standard deviation ``noise`` added to the training pixels (in [0, 1]) at every step."""

    def __init__(self, lr: float, weight_decay: float, noise: float = 0.0, hidden: int = 128, depth: int = 2) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, optimizer="adam", hidden=hidden, depth=depth, cosine=True)
        self.noise = noise
        self.net = make_normalized_net(hidden, depth)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return super().training_step((x + self.noise * torch.randn_like(x), y), batch_idx)


def train(mode: str, epochs: int, lr: float, wd: float, noise: float, every: int, save_dir: Path) -> Path:
    """Train with ``WeightDecay(mode=mode)`` and return the path of the ``metrics.csv`` that the monitor wrote."""
    shutil.rmtree(save_dir / "weight_norm" / mode, ignore_errors=True)  # CSVLogger would append to an old run
    pl.seed_everything(0, verbose=False)
    logger = CSVLogger(save_dir, name="weight_norm", version=mode)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=logger, log_every_n_steps=every, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False,
        callbacks=[WeightDecay(mode=mode, exclude_bias_and_norm=True), WeightNormMonitor(per_parameter=True)],
    )
    trainer.fit(NormalizedDigitsClassifier(lr=lr, weight_decay=wd, noise=noise), DigitsDataModule(batch_size=64))
    return Path(logger.log_dir) / "metrics.csv"


def read_series(path: Path, prefixes: tuple[str, ...]) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` for every column of ``metrics.csv`` that starts with one of ``prefixes``."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith(prefixes) and value not in ("", None):
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(int(row["step"]))
                    values.append(float(value))
    return series


def smooth(values: list[float], width: int = 9) -> list[float]:
    """Centred running mean over ``width`` logged points (fewer at the ends)."""
    half = width // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def mean_between(series: tuple[list[int], list[float]], start: int, stop: int) -> float:
    values = [v for s, v in zip(*series) if start <= s < stop]
    return sum(values) / len(values)


def summary(csvs: dict[str, Path]) -> list[str]:
    """What the figure shows, in numbers: the ratio in the middle and in the last tenth of the run, and the final
    norm against the final prediction."""
    lines = []
    for mode, csv_path in csvs.items():
        s = read_series(csv_path, ("weight_norm/", "equilibrium_norm/", "grad_to_weight/"))
        last = max(s[f"weight_norm/{HIDDEN[0]}"][0])
        for name in HIDDEN:
            ratio = s[f"grad_to_weight/{name}"]
            mid = mean_between(ratio, int(0.4 * last), int(0.6 * last))
            tail = mean_between(ratio, int(0.9 * last), last + 1)
            norm, predicted = s[f"weight_norm/{name}"][1][-1], s[f"equilibrium_norm/{name}"][1][-1]
            lines.append(f"{mode:9s} {name}: |g|/|w| {mid:.3f} (40-60% of the run) -> {tail:.3f} (last 10%),"
                         f" x{tail / mid:.2f}; final |W| {norm:.2f}, predicted {predicted:.3f}")
    return lines


def plot(csvs: dict[str, Path], lr: float, wd: float, noise: float, path: Path) -> None:
    """Left: measured vs predicted norm of each hidden matrix; right: its gradient-to-weight ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_n, ax_r) = plt.subplots(1, 2, figsize=(11, 4.4))
    colours = {"decoupled": "tab:blue", "corrected": "tab:orange"}
    labels = {"decoupled": "decoupled (AdamW)", "corrected": "corrected (AdamC)"}
    for mode, csv_path in csvs.items():
        s = read_series(csv_path, ("weight_norm/", "equilibrium_norm/", "grad_to_weight/"))
        c = colours[mode]
        for name, lw in zip(HIDDEN, (2.0, 1.0)):
            layer = name.removesuffix(".weight")
            ax_n.plot(*s[f"weight_norm/{name}"], color=c, lw=lw, label=f"{labels[mode]} {layer}: measured")
            ax_n.plot(*s[f"equilibrium_norm/{name}"], color=c, lw=lw, ls="--",
                      label=f"{labels[mode]} {layer}: predicted")
            steps, ratio = s[f"grad_to_weight/{name}"]
            ax_r.plot(steps, ratio, color=c, lw=0.5, alpha=0.3)
            ax_r.plot(steps, smooth(ratio), color=c, lw=lw, label=f"{labels[mode]} {layer}")
    ax_n.set_ylabel("weight norm ||W||")
    ax_n.set_title("weight_norm (solid) vs equilibrium_norm (dashed)", fontsize=9)
    ax_r.set_yscale("log")
    ax_r.set_ylabel("||g|| / ||w||")
    ax_r.set_title("grad_to_weight (thin: as logged; thick: running mean of 9)", fontsize=9)
    for ax in (ax_n, ax_r):
        ax.set_xlabel("optimizer step (cosine lr schedule to 0)")
        ax.grid(alpha=0.3, which="both", lw=0.4)
        ax.legend(fontsize=7)
    fig.suptitle(f"Digits MLP with LayerNorm, Adam, peak lr {lr:g}, weight_decay {wd:g}, input noise {noise:g}:"
                 " logged by lightning_wd.WeightNormMonitor", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--wd", type=float, default=1.0, help="Adam's weight_decay, applied by WeightDecay")
    p.add_argument("--noise", type=float, default=0.5,
                   help="std of the Gaussian noise added to the training pixels (keeps the gradients from vanishing)")
    p.add_argument("--every", type=int, default=10, help="log every this many steps")
    p.add_argument("--quick", action="store_true", help="5 epochs, to check that the script runs")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--save-dir", type=Path, default=HERE / "outputs", help="where the CSV logs go")
    args = p.parse_args(argv)
    limit_threads()
    if args.quick:
        args.epochs, args.every = 5, 5
    out = args.out or (HERE / "outputs" / "weight_norm.png" if args.quick else HERE / "figures" / "weight_norm.png")
    csvs = {m: train(m, args.epochs, args.lr, args.wd, args.noise, args.every, args.save_dir) for m in MODES}
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(csvs, args.lr, args.wd, args.noise, out)
    print("\n".join(summary(csvs)))
    print(f"wrote {out} from {', '.join(str(c) for c in csvs.values())}")


if __name__ == "__main__":
    main()
