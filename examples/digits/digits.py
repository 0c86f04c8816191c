"""Data, network and Lightning classes of the digits example, shared by ``train.py`` and the scripts in ``examples/``.

The data are scikit-learn's bundled ``load_digits`` (1,797 8x8 grey images, no download), split once with a fixed
seed and kept as tensors: the whole set is 460 KB, so every loader and the sweep's plain loop index it in memory.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

OptimizerName = Literal["adam", "amsgrad", "adamw"]
SPLITS = ("train", "val", "test")


def limit_threads() -> None:
    """Use one intra-op thread unless ``OMP_NUM_THREADS`` is set: this MLP's ops are too small to gain from more, and
    on a busy machine the threads of each op wait for one another (measured: 7x slower with 2 threads under load)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def load_split(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
               ) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train"|"val"|"test": (x, y)}``: a stratified split of ``load_digits`` fixed by ``seed``; pixels in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    val_size = val_fraction / (1 - test_fraction)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_size, stratify=y_rest, random_state=seed
    )
    return {"train": _tensors(x_train, y_train), "val": _tensors(x_val, y_val), "test": _tensors(x_test, y_test)}


def _tensors(x, y) -> tuple[Tensor, Tensor]:
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def make_net(hidden: int = 128, depth: int = 2) -> nn.Sequential:
    """An MLP 64 -> ``hidden`` x ``depth`` -> 10: big enough (26k weights at the default) to overfit 1.2k images."""
    layers: list[nn.Module] = []
    width = 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def train_cosine(net: nn.Module, opt: torch.optim.Optimizer, train: tuple[Tensor, Tensor], epochs: int,
                 batch_size: int, seed: int) -> None:
    """Cross-entropy training of ``net`` by ``opt`` for ``epochs``, the lr cosine-annealed to 0 over the run and the
    batches shuffled in an order fixed by ``seed``: the plain loop of both sweeps (no Trainer: thousands of short
    runs)."""
    x, y = train
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(len(x) / batch_size))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def make_optimizer(params, optimizer: OptimizerName, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``adam``/``amsgrad``: ``torch.optim.Adam`` with its (coupled L2) ``weight_decay``, which ``WeightDecay`` takes
    over; ``adamw``: ``torch.optim.AdamW``, the reference that ``WeightDecay(mode="decoupled")`` must reproduce."""
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=optimizer == "amsgrad")


class DigitsDataModule(pl.LightningDataModule):
    """``load_digits`` split into train/val/test (70/10/20 %) by ``split_seed``; evaluation runs in one batch."""

    def __init__(self, batch_size: int = 64, split_seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.data:
            split = load_split(self.hparams.split_seed, self.hparams.val_fraction, self.hparams.test_fraction)
            self.data = {k: TensorDataset(*v) for k, v in split.items()}

    def train_dataloader(self) -> DataLoader:
        # shuffled by the global seed that LightningCLI's `seed_everything` sets, so two runs see the same batches
        return DataLoader(self.data["train"], batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data["val"], batch_size=len(self.data["val"]))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.data["test"], batch_size=len(self.data["test"]))


class DigitsClassifier(pl.LightningModule):
    """An MLP on the digits, trained with Adam, AMSGrad or AdamW under a cosine lr schedule (one value per step).

    ``configure_optimizers`` passes ``weight_decay`` to the optimizer itself; a ``lightning_wd.WeightDecay``
    callback in the Trainer then takes it over and applies it in its own ``mode``.

    Args:
        lr: peak learning rate.
        weight_decay: the optimizer's ``weight_decay``.
        optimizer: ``"adam"``, ``"amsgrad"`` or ``"adamw"`` (see :func:`make_optimizer`).
        hidden, depth: width and number of hidden layers.
        cosine: anneal the lr to 0 over the whole run, as in the AdamW paper; ``False`` keeps it constant.
    """

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0, optimizer: OptimizerName = "adam",
                 hidden: int = 128, depth: int = 2, cosine: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_net(hidden, depth)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        acc = (logits.argmax(1) == y).float().mean()
        self.log_dict({f"{stage}/loss": F.cross_entropy(logits, y), f"{stage}/acc": acc, f"{stage}/err": 1 - acc},
                      prog_bar=stage == "val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        opt = make_optimizer(self.parameters(), hp.optimizer, hp.lr, hp.weight_decay)
        if not hp.cosine:
            return opt
        steps = max(1, math.ceil(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
