"""Memory of a training step: Adam + WeightDecay / EffectiveLRMonitor against AdamW alone.

Counts the bytes of every tensor created during one training step (forward, backward, optimizer step and all
callback hooks) with a ``TorchDispatchMode``, on any device; on CUDA also reports the peak allocated memory of the
step (``torch.cuda.max_memory_allocated``). A parameter-sized buffer made by a callback would show up as a
difference of ``4 * n_params`` bytes or more against AdamW. The measured step does not log, except in the last row:
a logging step of EffectiveLRMonitor, whose memory is bounded by its chunk size and its blocks of rows, not by the
parameters' sizes or number (try ``--width 4096 --depth 1``: one 16.8M-element weight; ``--width 16 --depth 1000``:
2,000 small tensors).

    python benchmarks/step_memory.py               # CPU (or --device cuda)
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
import weakref

import lightning as L
import torch
from _common import Wide
from lightning.pytorch.loggers import CSVLogger
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_wd import EffectiveLRMonitor, WeightDecay


class CreatedBytes(TorchDispatchMode):
    """The bytes of the tensors created under the mode (``total``), the largest of them (``largest``), and the most
    of them alive at once (``peak``): a storage's Python object lives exactly as long as the storage, so a finalizer
    on it sees the storage freed."""

    def __init__(self) -> None:
        super().__init__()
        self.total = self.live = self.peak = self.largest = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):  # in-place ops and views create nothing
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor) and t.untyped_storage() not in self._seen:
                    storage = t.untyped_storage()
                    self._seen.add(storage)
                    self.total += storage.nbytes()
                    self.largest = max(self.largest, storage.nbytes())
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, storage.nbytes())
        return out


class MeasureStep(L.Callback):
    """Measures training step ``index`` (a non-logging step) from its start to its end."""

    def __init__(self, index: int) -> None:
        self.index, self.mode, self.created, self.largest, self.live_peak, self.peak = index, None, 0, 0, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.index:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.mode = CreatedBytes()
            self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.index:
            self.mode.__exit__(None, None, None)
            self.created, self.largest, self.live_peak = self.mode.total, self.mode.largest, self.mode.peak
            if pl_module.device.type == "cuda":
                self.peak = torch.cuda.max_memory_allocated()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    configs = {
        "AdamW(foreach)": (torch.optim.AdamW, []),
        "Adam(foreach) + WeightDecay": (torch.optim.Adam, [WeightDecay()]),
        "Adam(foreach) + WeightDecay(native=False)": (torch.optim.Adam, [WeightDecay(native=False)]),
        "AdamW(foreach) + EffectiveLRMonitor": (torch.optim.AdamW, [EffectiveLRMonitor()]),
        # step 5 logs: (5 + 1) % 6 == 0
        "AdamW(foreach) + EffectiveLRMonitor, logging": (torch.optim.AdamW, [EffectiveLRMonitor(log_every_n_steps=6)]),
    }
    n = args.width * (args.width + 1) * args.depth
    print(f"device={args.device} model={args.depth}x Linear({args.width}) = {n:,} params"
          f" ({4 * n / 2**20:.1f} MiB of fp32 weights); step 5 of 8, log_every_n_steps=50 (a non-logging step)")
    print(f"{'configuration':44s} {'created MiB':>12s} {'vs AdamW':>10s} {'largest MiB':>12s} {'peak live MiB':>14s}"
          f" {'vs AdamW':>10s} {'CUDA peak MiB':>14s}")
    ref = ref_peak = None
    log_dir = tempfile.mkdtemp()
    for name, (cls, callbacks) in configs.items():
        measure = MeasureStep(5)
        trainer = L.Trainer(accelerator=args.device, devices=1, max_steps=8, logger=CSVLogger(log_dir),
                            log_every_n_steps=50,
                            callbacks=[*callbacks, measure], enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False)
        make_opt = lambda p, cls=cls: cls(p, lr=1e-4, weight_decay=0.01, foreach=True)  # noqa: E731
        trainer.fit(Wide(make_opt, args.width, args.depth),
                    DataLoader(TensorDataset(torch.randn(32, args.width)), batch_size=4))
        ref = measure.created if ref is None else ref
        ref_peak = measure.live_peak if ref_peak is None else ref_peak
        peak = f"{measure.peak / 2**20:14.1f}" if args.device == "cuda" else f"{'n/a':>14s}"
        print(f"{name:44s} {measure.created / 2**20:12.1f} {(measure.created - ref) / 2**20:+10.1f}"
              f" {measure.largest / 2**20:12.2f} {measure.live_peak / 2**20:14.1f}"
              f" {(measure.live_peak - ref_peak) / 2**20:+10.1f} {peak}")


if __name__ == "__main__":
    main()
