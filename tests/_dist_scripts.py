"""Two-process training runs for ``tests/test_distributed.py``: ``python _dist_scripts.py {ddp,fsdp2} WORKDIR``.

The test writes ``WORKDIR/inputs.pt`` (initial weights, data, hyperparameters, the list of runs); this script is
started once per scenario and Lightning's launcher re-runs the same command line for rank 1 (``LOCAL_RANK=1``), so both
processes execute every run below in the same order, and the process group made by the first ``Trainer`` serves all
the later ones. Each rank writes what it saw to ``WORKDIR/rank{r}.pt``; the test compares it with a single-process
``torch.optim`` loop. Nothing here asserts: the test does.

Data: Lightning replaces the training loader's sampler with a ``DistributedSampler`` that shuffles even when the loader
does not (lightning 2.6 forces ``shuffle=True`` for training), seeded with ``PL_GLOBAL_SEED`` (0 when unset) plus the
epoch. Rather than re-deriving that permutation, every rank records the sample indices of each of its batches; the
test checks that they form a proper split and trains its reference on the union of both ranks' batches.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PG_TIMEOUT = timedelta(seconds=120)  # a rank stuck in a collective dies instead of hanging the test run


def make_net() -> nn.Sequential:
    """The model of every distributed test (the test builds its single-process reference from it too).

    The sizes are odd on purpose: FSDP2 shards dim 0 over 2 ranks, so ``Linear(4, 5)`` splits 3 + 2 rows and the
    output layer (1 row) leaves rank 1 with an empty shard.
    """
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# --- spying on the generic decay pass (FSDP2) -------------------------------------------------------------------


class _OpRecorder:
    """Records every op dispatched (top level) while active, with the types of its tensor arguments."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        records: list[tuple[str, list[str], list[tuple[int, ...]]]] = []
        self.records = records

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
                records.append((str(func), [type(t).__name__ for t in tensors], [tuple(t.shape) for t in tensors]))
                return func(*args, **kwargs)

        self.mode = Mode()


_COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "barrier",
)


def spied(fn, log: list[dict[str, Any]]):
    """``fn`` wrapped so that each call records the ops it dispatched and any gather or collective it started.

    While ``fn`` runs, ``DTensor.full_tensor`` / ``DTensor.redistribute`` and the ``torch.distributed`` collectives
    are replaced by counting wrappers, and a dispatch mode records every op with its argument types. A decay that
    works on local shards dispatches only ``_foreach_*`` ops on plain tensors and starts no collective.
    """
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    from torch.distributed.tensor import DTensor

    def wrapper(*args, **kwargs):
        calls: list[str] = []
        saved: list[tuple[Any, str, Any]] = []

        def patch(owner: Any, name: str, label: str) -> None:
            original = getattr(owner, name, None)
            if original is None:
                return

            def counting(*a, **k):
                calls.append(label)
                return original(*a, **k)

            saved.append((owner, name, original))
            setattr(owner, name, counting)

        patch(DTensor, "full_tensor", "DTensor.full_tensor")
        patch(DTensor, "redistribute", "DTensor.redistribute")
        for name in _COLLECTIVES:
            patch(dist, name, f"dist.{name}")
            patch(c10d, name, f"c10d.{name}")
        recorder = _OpRecorder()
        try:
            with recorder.mode:
                out = fn(*args, **kwargs)
        finally:
            for owner, name, original in reversed(saved):
                setattr(owner, name, original)
        params = args[0] if args else kwargs["params"]
        args_and_kwargs = (*args[1:], *kwargs.values())
        numbers = [float(a) for a in args_and_kwargs if isinstance(a, (int, float)) and not isinstance(a, bool)]
        log.append({
            "numbers": numbers,  # decay_weights_: [lr, weight_decay]; add_l2_to_grads_: [weight_decay]
            "param_types": [type(p).__name__ for p in params],
            "param_local_shapes": [tuple((p.to_local() if hasattr(p, "to_local") else p).shape) for p in params],
            "ops": recorder.records,
            "collectives": calls,
        })
        return out

    return wrapper


# --- the Lightning side ---------------------------------------------------------------------------------------


def _module_class():
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self, init_state: dict, optimizer: str, lr: float, wd: float, fsdp: bool = False) -> None:
            super().__init__()
            self.net = make_net()
            self.net.load_state_dict(init_state)
            self.optimizer_name = optimizer
            self.lr = lr
            self.wd = wd
            self.fsdp = fsdp
            self.seen: list[tuple[int, list[int]]] = []  # (global_step, sample indices) of every training batch

        def configure_model(self) -> None:
            if not self.fsdp:
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, batch_idx):
            idx, x, y = batch
            self.seen.append((self.global_step, idx.tolist()))
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            cls = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[self.optimizer_name]
            # built from self.parameters() here, i.e. after configure_model has sharded them (FSDP2)
            return cls(self.parameters(), lr=self.lr, weight_decay=self.wd)

    return Module


def _loader(inputs: dict):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = inputs["x"], inputs["y"]
    data = TensorDataset(torch.arange(len(x)), x, y)
    return DataLoader(data, batch_size=inputs["batch_size"], shuffle=False)


def _trainer(strategy, callbacks: list, **limits):
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.environments import LightningEnvironment

    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        # Lightning's own launcher, named: otherwise a machine with mpi4py installed (a GPU box) makes Lightning probe
        # MPI, whose OpenMPI start-up fails without an rsh/ssh agent
        plugins=[LightningEnvironment()],
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **limits,
    )


def _callbacks(run: dict) -> list:
    from lightning_wd import WeightDecay

    if run.get("mode") is None:
        return []
    return [WeightDecay(mode=run["mode"], native=run["native"])]


def _plain_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _fit(run: dict, inputs: dict, workdir: str, make_strategy, collect, fsdp: bool) -> dict:
    """One entry of ``inputs["runs"]``: a fit of ``inputs["steps"]`` steps, or (``"resume"`` in the run) an
    uninterrupted fit of ``resume["epochs"]`` epochs that saves a checkpoint after every epoch, then a fresh Trainer
    and module resumed from the checkpoint of epoch ``resume["from_epoch"]`` up to the same number of epochs."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_wd.generic_pass as attach  # the module whose pass calls the decay functions

    Module = _module_class()
    module = Module(inputs["init"], run["optimizer"], inputs["lr"], inputs["wd"], fsdp=fsdp)
    spy_log: dict[str, list] = {"decay_weights_": [], "add_l2_to_grads_": []}
    originals = (attach.decay_weights_, attach.add_l2_to_grads_)
    attach.decay_weights_ = spied(originals[0], spy_log["decay_weights_"])
    attach.add_l2_to_grads_ = spied(originals[1], spy_log["add_l2_to_grads_"])
    try:
        if "resume" not in run:
            trainer = _trainer(make_strategy(), _callbacks(run), max_steps=inputs["steps"])
            trainer.fit(module, _loader(inputs))
            return {**collect(module), "seen": module.seen, "spy": spy_log}
        ckpt_dir = os.path.join(workdir, f"ckpt_{run['name']}")
        saver = ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        trainer = _trainer(make_strategy(), [*_callbacks(run), saver], max_epochs=run["resume"]["epochs"])
        trainer.fit(module, _loader(inputs))
        result = {**collect(module), "seen": module.seen, "spy": spy_log}
        result["ckpt_path"] = os.path.join(ckpt_dir, f"epoch={run['resume']['from_epoch']}.ckpt")
        resumed = Module(inputs["init"], run["optimizer"], inputs["lr"], inputs["wd"], fsdp=fsdp)
        trainer = _trainer(make_strategy(), _callbacks(run), max_epochs=run["resume"]["epochs"])
        trainer.fit(resumed, _loader(inputs), ckpt_path=result["ckpt_path"])
        result["resumed"] = {**collect(resumed), "seen": resumed.seen}
        return result
    finally:
        attach.decay_weights_, attach.add_l2_to_grads_ = originals


def _collect_ddp(module) -> dict:
    return {"weights": {k: v.detach().clone() for k, v in module.net.state_dict().items()}}


def _collect_fsdp2(module) -> dict:
    params = dict(module.net.named_parameters())
    return {
        # full_tensor() is a collective: both ranks call it, for every parameter, in the same order
        "weights": {n: p.full_tensor().detach().clone() for n, p in params.items()},
        "local_shapes": {n: tuple(p.to_local().shape) for n, p in params.items()},
        "types": {n: type(p).__name__ for n, p in params.items()},
        "placements": {n: [str(pl) for pl in p.placements] for n, p in params.items()},
    }


def run_ddp(inputs: dict, workdir: str) -> dict:
    from lightning.pytorch.strategies import DDPStrategy

    def strategy():
        return DDPStrategy(process_group_backend="gloo", timeout=PG_TIMEOUT)

    return {run["name"]: _fit(run, inputs, workdir, strategy, _collect_ddp, fsdp=False) for run in inputs["runs"]}


def _monitor_run(inputs: dict, make_strategy) -> dict:
    """FSDP2 with EffectiveLRMonitor logging every step, beside an exact reference made from gathered state.

    The reference hook gathers each parameter's full ``exp_avg_sq`` (``full_tensor()``, a collective that both ranks
    make) and computes ``lr / (sqrt(v / (1 - beta2^t)) + eps)`` in float64 with exact statistics; the logger
    records what the monitor sent it on this rank (only rank 0 may send anything).
    """
    import lightning.pytorch as pl
    from helpers import Recording  # not rank_zero_only: the test checks what each rank was sent

    from lightning_wd import EffectiveLRMonitor

    def exact(values: torch.Tensor) -> list[float]:
        flat = values.flatten()
        lower_median = flat.sort().values[(flat.numel() - 1) // 2]
        return [flat.min().item(), flat.max().item(), flat.mean().item(), lower_median.item()]

    class Reference(pl.Callback):
        def __init__(self) -> None:
            self.per_step: dict[int, dict[str, list[float]]] = {}

        def on_fit_start(self, trainer, pl_module):
            names = {id(p): n for n, p in pl_module.named_parameters()}

            def hook(opt, args, kwargs):
                stats, flat = {}, []
                for group in opt.param_groups:
                    for p in group["params"]:
                        st = opt.state[p]
                        v = st["exp_avg_sq"].full_tensor().double()
                        t = float(st["step"].full_tensor() if hasattr(st["step"], "full_tensor") else st["step"])
                        eff = group["lr"] / (torch.sqrt(v / (1 - group["betas"][1] ** t)) + group["eps"])
                        stats[names[id(p)]] = exact(eff)
                        flat.append(eff.flatten())
                stats["Adam/pg1"] = exact(torch.cat(flat))
                # what a monitor that looked at this rank's shard only would report, for the test's contrast
                v_local = opt.state[pl_module.net[0].weight]["exp_avg_sq"].to_local().double()
                t = float(opt.state[pl_module.net[0].weight]["step"])
                group = opt.param_groups[0]
                eff_local = group["lr"] / (torch.sqrt(v_local / (1 - group["betas"][1] ** t)) + group["eps"])
                stats["local:0.weight"] = exact(eff_local)
                self.per_step[trainer.fit_loop.epoch_loop._batches_that_stepped] = stats

            for opt in trainer.optimizers:
                opt.register_step_post_hook(hook)

    import lightning_wd.effective_lr as el
    import lightning_wd.effective_lr_monitor as elm

    Module = _module_class()
    module = Module(inputs["init"], "Adam", inputs["lr"], inputs["wd"], fsdp=True)
    logger, reference = Recording(), Reference()
    trainer = _trainer(make_strategy(), [EffectiveLRMonitor(log_every_n_steps=1, per_parameter=True), reference],
                       max_steps=inputs["steps"])
    trainer.logger = logger
    # blocks of 3 rows: the 4 sharded parameters take two reductions per step, a full block and a partial one
    blocks: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real_reduce, real_rows = elm._all_reduce, el.BLOCK_ROWS

    def recording_reduce(partials, groups):
        blocks.append((tuple(partials.ext.shape), tuple(partials.sums.shape)))
        real_reduce(partials, groups)

    elm._all_reduce, el.BLOCK_ROWS = recording_reduce, 3
    try:
        trainer.fit(module, _loader(inputs))
    finally:
        elm._all_reduce, el.BLOCK_ROWS = real_reduce, real_rows
    return {"logged": logger.calls, "reference": reference.per_step, "blocks": blocks}


def _weight_norm_run(inputs: dict, make_strategy) -> dict:
    """FSDP2 with WeightNormMonitor logging every step, beside the whole weights and gradients of each step, gathered
    with ``full_tensor()`` (a collective that both ranks make), from which the test computes its reference; the
    logger records what the monitor sent it on this rank (only rank 0 may send anything)."""
    import lightning.pytorch as pl
    from helpers import Recording  # not rank_zero_only: the test checks what each rank was sent

    from lightning_wd import WeightNormMonitor

    class Gathered(pl.Callback):
        def __init__(self) -> None:
            self.per_step: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            params = dict(pl_module.named_parameters())
            self.per_step[trainer.fit_loop.epoch_loop._batches_that_stepped] = {
                "before": {n: p.full_tensor().detach().clone() for n, p in params.items()},
                "grad": {n: p.grad.full_tensor().clone() for n, p in params.items()},
                "local_before": {n: p.to_local().detach().clone() for n, p in params.items()},
            }

        def on_train_batch_end(self, trainer, pl_module, *args):
            after = {n: p.full_tensor().detach().clone() for n, p in pl_module.named_parameters()}
            self.per_step[trainer.fit_loop.epoch_loop._batches_that_stepped]["after"] = after

    Module = _module_class()
    module = Module(inputs["init"], "Adam", inputs["lr"], inputs["wd"], fsdp=True)
    logger, gathered = Recording(), Gathered()
    trainer = _trainer(make_strategy(), [WeightNormMonitor(log_every_n_steps=1, per_parameter=True), gathered],
                       max_steps=inputs["steps"])
    trainer.logger = logger
    trainer.fit(module, _loader(inputs))
    return {"logged": logger.calls, "reference": gathered.per_step}


def run_fsdp2(inputs: dict, workdir: str) -> dict:
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    from lightning_wd.decay import add_l2_to_grads_, decay_weights_

    def strategy():
        return ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo", timeout=PG_TIMEOUT
        )

    results: dict[str, Any] = {}
    for run in inputs["runs"]:
        results[run["name"]] = _fit(run, inputs, workdir, strategy, _collect_fsdp2, fsdp=True)
    results["monitor"] = _monitor_run(inputs, strategy)
    results["weight_norm"] = _weight_norm_run(inputs, strategy)

    # Direct calls of the decay functions on freshly sharded parameters.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net = make_net()
    net.load_state_dict(inputs["init"])
    mesh = init_device_mesh("cpu", (2,))
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    params = [p for _, p in net.named_parameters()]
    assert all(isinstance(p, DTensor) for p in params)
    lr, wd = 0.1, 0.5
    direct: dict[str, Any] = {"lr": lr, "wd": wd, "log": {"decay_weights_": [], "add_l2_to_grads_": [], "control": []}}
    with torch.no_grad():
        direct["local_before"] = [p.to_local().clone() for p in params]
        direct["full_before"] = [p.full_tensor().clone() for p in params]
        spied(decay_weights_, direct["log"]["decay_weights_"])(params, lr, wd)
        direct["local_after"] = [p.to_local().clone() for p in params]
        direct["full_after"] = [p.full_tensor().clone() for p in params]
        grads = [torch.zeros_like(p) for p in params]  # DTensors with the parameters' sharding
        direct["grad_types"] = [type(g).__name__ for g in grads]
        spied(add_l2_to_grads_, direct["log"]["add_l2_to_grads_"])(params, grads, wd)
        direct["grad_local_after"] = [g.to_local().clone() for g in grads]
        direct["grad_full_after"] = [g.full_tensor().clone() for g in grads]
        direct["param_local_final"] = [p.to_local().clone() for p in params]

        def gathering_decay(params, lr, weight_decay):
            # control for the spy: a decay that gathers each full parameter first must be caught
            for p in params:
                p.full_tensor()

        spied(gathering_decay, direct["log"]["control"])(params, lr, wd)
    results["direct"] = direct
    return results


def main(argv: list[str]) -> None:
    scenario, workdir = argv
    inputs = torch.load(os.path.join(workdir, "inputs.pt"), weights_only=False)
    torch.set_num_threads(1)
    results = {"ddp": run_ddp, "fsdp2": run_fsdp2}[scenario](inputs, workdir)
    import torch.distributed as dist

    rank = _rank()
    results["rank"] = rank
    results["world_size"] = dist.get_world_size()
    results["master_port"] = os.environ.get("MASTER_PORT")
    path = os.path.join(workdir, f"rank{rank}.pt")
    torch.save(results, path + ".tmp")
    os.replace(path + ".tmp", path)
    dist.barrier()  # rank 0 (the process the test waits for) exits only once rank 1 has written its file
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
