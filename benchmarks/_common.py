"""Shared bits of the benchmark scripts: timing by interleaved repeats, a transformer's parameter shapes, and the
optimizer-bound LightningModule of the fit benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset


def gpt2_small_shapes(layers: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    """The parameter shapes of a GPT-2-small-like transformer (~124M parameters with the embeddings)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function, timed round-robin so that machine noise hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class Wide(L.LightningModule):
    """``depth`` wide ``Linear`` layers fed small batches: the optimizer's passes over the weights, not the matmuls,
    dominate a step, so any cost a callback adds to them shows at its largest."""

    def __init__(self, make_opt: Callable, width: int, depth: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
        self.make_opt = make_opt

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return self.make_opt(self.parameters())


def fit_wide(
    make_opt: Callable, callbacks: list, device: str, steps: int, width: int, depth: int, log_dir: str
) -> None:
    """``Trainer.fit`` of a :class:`Wide` model for ``steps`` steps of batch 4, with a CSV logger, Lightning's default
    logging interval (50) and nothing else (no progress bar, model summary or checkpoints)."""
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator=device, devices=1, max_steps=steps, logger=CSVLogger(log_dir), log_every_n_steps=50,
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    data = DataLoader(TensorDataset(torch.randn(steps * 4, width)), batch_size=4)
    trainer.fit(Wide(make_opt, width, depth), data)
