"""Shared helpers for the tests: a tiny regression LightningModule, its data, a quiet Trainer, weight comparison, a
logger that records what it is sent.

Everything here is deterministic on CPU: the data come from a seeded generator, every model is built right after
``torch.manual_seed(seed)``, loaders never shuffle and no model uses dropout, so two runs that do the same math give
bit-identical weights.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

D_IN = 8
D_OUT = 2

#: builds the optimizer (or Lightning's optimizer config) from the module
OptimizerFactory = Callable[[pl.LightningModule], Any]


def make_dataset(n: int = 64, d_in: int = D_IN, d_out: int = D_OUT, seed: int = 1234) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, d_out, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, d_out, generator=g)
    return TensorDataset(x, y)


def make_loader(n: int = 64, batch_size: int = 8, **kwargs: Any) -> DataLoader:
    """``n // batch_size`` batches, always in the same order."""
    return DataLoader(make_dataset(n, **kwargs), batch_size=batch_size, shuffle=False)


def mlp(d_in: int = D_IN, hidden: int = 16, d_out: int = D_OUT) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, d_out)
    )


class TinyModule(pl.LightningModule):
    """MSE regression on ``self.net``; the optimizer (and scheduler) come from ``optimizer_fn(self)``.

    ``loss_scale_at``: ``{batch_idx: factor}`` multiplies the loss at those batches (``float("inf")`` makes a step
    whose gradients are not finite). ``l2_in_loss``: adds ``l2_in_loss / 2 * sum(p**2)`` to the loss, i.e. an L2
    gradient term that goes through gradient clipping (used to show that clipping order matters).
    """

    def __init__(
        self,
        optimizer_fn: OptimizerFactory,
        net: nn.Module | None = None,
        loss_scale_at: dict[int, float] | None = None,
        l2_in_loss: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = net if net is not None else mlp()
        self.optimizer_fn = optimizer_fn
        self.loss_scale_at = dict(loss_scale_at or {})
        self.l2_in_loss = l2_in_loss

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        if batch_idx in self.loss_scale_at:
            loss = loss * self.loss_scale_at[batch_idx]
        if self.l2_in_loss:
            loss = loss + self.l2_in_loss / 2 * sum((p.float() ** 2).sum() for p in self.parameters())
        return loss

    def configure_optimizers(self) -> Any:
        return self.optimizer_fn(self)


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``factory()`` built right after ``torch.manual_seed(seed)``: the same initial weights every time."""
    torch.manual_seed(seed)
    return factory()


def tiny_module(optimizer_fn: OptimizerFactory, net_factory: Callable[[], nn.Module] = mlp, seed: int = 0, **kw: Any):
    return TinyModule(optimizer_fn, net=seeded(net_factory, seed), **kw)


def trainer(callbacks: Sequence[pl.Callback] = (), **overrides: Any) -> pl.Trainer:
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=10,
    )
    kwargs.update(overrides)
    return pl.Trainer(callbacks=list(callbacks), **kwargs)


def fit(
    module: pl.LightningModule,
    callbacks: Sequence[pl.Callback] = (),
    loader: DataLoader | None = None,
    **trainer_overrides: Any,
) -> pl.Trainer:
    t = trainer(callbacks, **trainer_overrides)
    t.fit(module, loader if loader is not None else make_loader())
    return t


def flat_parameters(module: nn.Module) -> Tensor:
    """Every parameter of ``module``, detached, in one flat tensor (in ``parameters()`` order)."""
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def group_settings(groups: Any) -> list[dict[str, Any]]:
    """Each param group's settings (all but its ``params``): an optimizer's, or those of a list of groups."""
    groups = groups.param_groups if hasattr(groups, "param_groups") else groups
    return [{k: v for k, v in g.items() if k != "params"} for g in groups]


def weights(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(actual: nn.Module | dict[str, Tensor], expected: nn.Module | dict[str, Tensor]) -> None:
    """Bit-for-bit equality of every parameter and buffer, with the worst difference in the message."""
    a = actual if isinstance(actual, dict) else weights(actual)
    e = expected if isinstance(expected, dict) else weights(expected)
    assert a.keys() == e.keys()
    bad = {k: (a[k].double() - e[k].double()).abs().max().item() for k in a if not torch.equal(a[k], e[k])}
    assert not bad, f"weights differ (max abs diff per tensor): {bad}"


def assert_close_weights(actual: nn.Module, expected: nn.Module, rtol: float, atol: float) -> None:
    a, e = weights(actual), weights(expected)
    assert a.keys() == e.keys()
    for k in a:
        torch.testing.assert_close(a[k], e[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def assert_weights_differ(a: nn.Module | dict[str, Tensor], b: nn.Module | dict[str, Tensor], min_diff: float) -> None:
    """Some parameter differs by more than ``min_diff``: used to show a comparison is sensitive to the decay."""
    wa = a if isinstance(a, dict) else weights(a)
    wb = b if isinstance(b, dict) else weights(b)
    diff = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    assert diff > min_diff, f"runs expected to differ by > {min_diff}, max abs diff is {diff}"


def make_repeated_loader(n_batches: int = 5, batch_size: int = 8) -> DataLoader:
    """``n_batches`` copies of the same batch: the data seen at a step does not depend on where an epoch starts.

    Lightning does not resume a plain (non-stateful) DataLoader mid-epoch, and even a checkpoint saved at the end of
    an epoch (``on_train_epoch_end``, or ``trainer.save_checkpoint`` after ``max_steps`` stopped on an epoch's last
    batch) resumes by fetching one more batch from a fresh iterator before the next epoch. With identical batches a
    resumed run sees the same data as an uninterrupted one, so a resume test checks only the optimizer, scheduler
    and decay state.
    """
    x, y = make_dataset(batch_size).tensors
    data = TensorDataset(x.repeat(n_batches, 1), y.repeat(n_batches, 1))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


class Recording(Logger):
    """A logger that keeps every ``log_metrics`` call: ``calls`` is a list of (step, metrics).

    Not ``rank_zero_only``: in the distributed runs (``_dist_scripts.py``) each rank records what it was sent, and
    the test checks that only rank 0 was sent anything.
    """

    name = "recording"
    version = 0

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def merged(self, prefixes: tuple[str, ...] | None = None) -> dict[int, dict[str, float]]:
        """The metrics of each step, those of all its calls together; only the keys that start with one of
        ``prefixes`` (every key if None), and only the steps that have some."""
        out: dict[int, dict[str, float]] = defaultdict(dict)
        for step, metrics in self.calls:
            out[step].update({k: v for k, v in metrics.items() if prefixes is None or k.startswith(prefixes)})
        return {s: m for s, m in out.items() if m}


class SnapshotWeights(pl.Callback):
    """Records the weights before and after every training batch: ``before[i]``, ``after[i]`` for ``batch_idx`` i."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, Tensor]] = {}
        self.after: dict[int, dict[str, Tensor]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self.before[batch_idx] = {k: v.cpu() for k, v in weights(pl_module).items()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        batch_idx = args[-1]
        self.after[batch_idx] = {k: v.cpu() for k, v in weights(pl_module).items()}


class GradNormProbe(pl.Callback):
    """Total gradient norm and largest |entry| at every optimizer step, as ``on_before_optimizer_step`` sees them.

    That hook runs before gradient clipping, so these are the unclipped values.
    """

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.max_abs: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        self.max_abs.append(max(g.abs().max().item() for g in grads))


class SaveCheckpointAtStep(pl.Callback):
    """``trainer.save_checkpoint(path)`` right after optimizer step ``step`` (as a step-based ModelCheckpoint would)."""

    def __init__(self, path: str, step: int) -> None:
        self.path = path
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class BackboneModule(TinyModule):
    """``head(backbone(x))``, with the ``backbone`` attribute that ``BackboneFinetuning`` needs."""

    def __init__(self, optimizer_fn: OptimizerFactory, seed: int = 0) -> None:
        super().__init__(optimizer_fn, net=nn.Identity())
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, D_OUT))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class PartlyUsedModule(TinyModule):
    """``net(x)``, plus ``sometimes(x)`` on even batches only; ``never`` is never used (its grad stays None)."""

    def __init__(self, optimizer_fn: OptimizerFactory, seed: int = 0) -> None:
        super().__init__(optimizer_fn, net=nn.Identity())
        torch.manual_seed(seed)
        self.net = mlp()
        self.sometimes = nn.Linear(D_IN, D_OUT)
        self.never = nn.Linear(D_IN, D_OUT)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out = self.net(x)
        if batch_idx % 2 == 0:
            out = out + self.sometimes(x)
        return nn.functional.mse_loss(out, y)


class TinyGAN(pl.LightningModule):
    """A GAN-shaped module with manual optimization and two optimizers from ``optimizers_fn(self)`` -> [opt_g, opt_d].

    The "noise" is taken from the batch, so the run is deterministic.
    """

    def __init__(self, optimizers_fn: Callable[[pl.LightningModule], Any], seed: int = 0) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.optimizers_fn = optimizers_fn
        torch.manual_seed(seed)
        self.gen = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, D_IN))
        self.disc = nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        x, _ = batch
        z = x[:, :4].flip(0)
        opt_g, opt_d = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(len(x), 1), torch.zeros(len(x), 1)

        d_loss = bce(self.disc(x), ones) + bce(self.disc(self.gen(z).detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()

        g_loss = bce(self.disc(self.gen(z)), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self) -> Any:
        return self.optimizers_fn(self)


class KernelOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the torch ops that run a kernel (each a launch on a GPU), views and metadata reads aside."""

    VIEWS = frozenset({"select", "view", "detach", "alias", "unsqueeze", "squeeze", "reshape", "slice", "lift_fresh",
                       "expand", "split", "split_with_sizes", "_local_scalar_dense"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in self.VIEWS
        return func(*args, **(kwargs or {}))
