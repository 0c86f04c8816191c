"""The digits example's CLI configs train exactly as their references.

``examples/digits/{decoupled,coupled}.yaml`` build ``torch.optim.Adam(weight_decay=wd)`` (``wd``: the config's
``model.weight_decay``) and let ``lightning_wd.WeightDecay`` (the configs' top-level ``weight_decay`` section, of
``lightning_wd.cli.WeightDecayCLI``) take the decay over. Each config runs in a subprocess (a few short epochs via CLI
overrides) next to a reference run of the same config without any callback:

- ``mode: decoupled`` must give the final weights of ``torch.optim.AdamW(weight_decay=wd)``;
- ``mode: coupled`` must give the final weights of ``torch.optim.Adam(weight_decay=wd)`` (its own L2).

Same seed, same data order, same cosine schedule, so the weights must be bit-identical (``torch.equal``). The two
references differ from each other, so the test can tell the modes apart.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "digits" / "train.py"
# short runs: 3 epochs x 5 batches; log every 5 steps so EffectiveLRMonitor writes something
SHORT = ["--trainer.max_epochs=3", "--trainer.limit_train_batches=5", "--trainer.log_every_n_steps=5",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
REFERENCE_OPTIMIZER = {"decoupled": "adamw", "coupled": "adam"}

_runs: dict[tuple[str, str], tuple[dict[str, torch.Tensor], Path]] = {}


def run_cli(config: str, tmp: Path, extra: list[str]) -> tuple[dict[str, torch.Tensor], Path]:
    """Run ``train.py fit`` on ``examples/digits/{config}.yaml``; return the final weights and the log dir."""
    pytest.importorskip("jsonargparse")  # LightningCLI's (the `examples` extra)
    pytest.importorskip("sklearn")  # the digits data
    cmd = [sys.executable, str(TRAIN), "fit", "--config", str(TRAIN.parent / f"{config}.yaml"), *SHORT,
           f"--trainer.logger.init_args.save_dir={tmp}", f"--trainer.default_root_dir={tmp}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (ckpt,) = tmp.glob("digits/version_0/checkpoints/*.ckpt")  # saved after the last epoch
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"], ckpt.parents[1]


def cached_run(tmp_path_factory: pytest.TempPathFactory, config: str, kind: str) -> tuple[dict, Path]:
    """One run per (config, kind), shared by the tests of this module. ``kind``: "callback", "reference" (no
    callback at all: neither ``trainer.callbacks`` nor the ``weight_decay`` section; and the optimizer that the mode
    must reproduce) or "override-coupled" (the config with the mode overridden on the command line, as the README
    shows, with a ModelCheckpoint appended to the callbacks, which has a ``mode`` of its own)."""
    if (config, kind) not in _runs:
        extra = []
        if kind == "reference":
            extra = ["--trainer.callbacks=[]", "--weight_decay=null",
                     f"--model.optimizer={REFERENCE_OPTIMIZER[config]}"]
        elif kind == "override-coupled":
            extra = ["--weight_decay.mode=coupled", "--trainer.callbacks+=ModelCheckpoint",
                     "--trainer.callbacks.mode=max"]
        _runs[config, kind] = run_cli(config, tmp_path_factory.mktemp(f"{config}_{kind}"), extra)
    return _runs[config, kind]


def test_configs_differ_by_one_line() -> None:
    decoupled = (TRAIN.parent / "decoupled.yaml").read_text().splitlines()
    coupled = (TRAIN.parent / "coupled.yaml").read_text().splitlines()
    diff = [(a.strip(), b.strip()) for a, b in zip(decoupled, coupled) if a != b]
    assert len(decoupled) == len(coupled) and diff == [("mode: decoupled", "mode: coupled")]
    # the line is in the top-level `weight_decay` section, not in `trainer.callbacks`
    import yaml

    config = yaml.safe_load((TRAIN.parent / "coupled.yaml").read_text())
    assert config["weight_decay"] == {"mode": "coupled"}
    assert not any("WeightDecay" in cb["class_path"] for cb in config["trainer"]["callbacks"])


@pytest.mark.parametrize("config", ["decoupled", "coupled"])
def test_config_trains_as_reference(config: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    weights, log_dir = cached_run(tmp_path_factory, config, "callback")
    reference, _ = cached_run(tmp_path_factory, config, "reference")
    assert weights.keys() == reference.keys()
    for name in weights:
        assert torch.equal(weights[name], reference[name]), f"{config}: {name} differs from the reference"
    # the config also wires EffectiveLRMonitor to the TensorBoard logger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(log_dir)).Reload().Tags()["scalars"]
    assert {"effective_lr/Adam/pg1/median", "effective_lr/net.0.weight/max", "test/err"} <= set(tags)
    # and the decay's timescale beside LearningRateMonitor's columns; the decay itself once, by LearningRateMonitor
    assert {"lr-Adam", "lr-Adam-weight_decay"} <= set(tags) and "weight_decay/Adam/pg1" not in tags
    assert ("timescale/Adam/pg1" in tags) == (config == "decoupled")  # coupled decay shrinks nothing: no timescale


def test_the_mode_can_be_overridden_on_the_command_line(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``--weight_decay.mode=coupled`` on decoupled.yaml reaches WeightDecay and trains as Adam's own L2, like
    coupled.yaml, with a ModelCheckpoint appended to the config's callbacks whose own ``mode`` is set on the same
    command line (``--trainer.callbacks.mode=max``: the last callback of the list)."""
    import yaml

    weights, log_dir = cached_run(tmp_path_factory, "decoupled", "override-coupled")
    reference, _ = cached_run(tmp_path_factory, "coupled", "reference")
    for name in weights:
        assert torch.equal(weights[name], reference[name]), f"override: {name} differs from Adam's own L2"
    # the run's config, as LightningCLI saved it: each `mode` went where it was meant to
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["weight_decay"]["init_args"]["mode"] == "coupled"
    callbacks = {cb["class_path"].rsplit(".", 1)[-1]: cb["init_args"] for cb in saved["trainer"]["callbacks"]}
    assert list(callbacks) == ["LearningRateMonitor", "EffectiveLRMonitor", "ModelCheckpoint"]
    assert callbacks["ModelCheckpoint"]["mode"] == "max"


def test_modes_are_told_apart(tmp_path_factory: pytest.TempPathFactory) -> None:
    """AdamW and Adam+L2 end in different weights, so the equalities above are not trivially true."""
    adamw, _ = cached_run(tmp_path_factory, "decoupled", "reference")
    adam_l2, _ = cached_run(tmp_path_factory, "coupled", "reference")
    assert not torch.equal(adamw["net.0.weight"], adam_l2["net.0.weight"])


# --- examples/decay_rules_sweep.py: the decay rules on a network with normalization layers -------------------------
SWEEP = ROOT / "examples" / "decay_rules_sweep.py"
SWEEP_MODES = ("none", "coupled", "decoupled", "independent", "corrected", "cautious")


_sweep: dict = {}


def _sweep_module():
    """The script as a module (for its network and its grids; the training is checked against loops of our own)."""
    import importlib.util

    if not _sweep:
        spec = importlib.util.spec_from_file_location("decay_rules_sweep", SWEEP)
        _sweep["module"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_sweep["module"])
    return _sweep["module"]


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict]]:
    """``decay_rules_sweep.py --quick`` run as a user runs it (one thread); its table and the rows of its CSV."""
    pytest.importorskip("sklearn")  # the digits data (the `examples` extra)
    import csv
    import os

    out = tmp_path_factory.mktemp("decay_rules")
    proc = subprocess.run([sys.executable, str(SWEEP), "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "decay_rules_heatmap.png").stat().st_size > 10_000
    with open(out / "decay_rules_sweep_quick.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return (out / "decay_rules_sweep.md").read_text(), rows


def _cell(rows: list[dict], mode: str, log_lr: float, log_wd: float | None) -> dict:
    (row,) = [r for r in rows if r["mode"] == mode and float(r["log_lr"]) == log_lr
              and (log_wd is None or float(r["log_wd"]) == log_wd)]
    return row


def test_the_quick_sweep_reports_every_mode_with_finite_numbers(quick_sweep) -> None:
    import math
    import re

    table, rows = quick_sweep
    grids = _sweep_module().QUICK
    n_lrs = len(grids["log_lrs"])
    for mode in SWEEP_MODES:
        n = n_lrs * (1 if mode == "none" else len(grids["grids"][mode]))
        assert sum(r["mode"] == mode for r in rows) == n, mode
        # its rows in the first two tables: the chosen cells, and the best test loss at each lr (mean ± std over seeds)
        chosen, per_lr = [ln for ln in table.splitlines() if ln.startswith(f"| {mode} |")][:2]
        num, cell = r"\d+\.\d+ ± \d+\.\d+", r" \(1e-?[\d.]+, (0|1e-?[\d.]+)\)"
        cells = [c.strip() for c in chosen.strip("|").split("|")]
        for on_val in cells[2:4]:
            assert re.fullmatch(f"{num} %, {num}{cell}", on_val), chosen
        assert re.fullmatch(f"{num} %{cell}", cells[4]) and re.fullmatch(f"{num}{cell}", cells[5]), chosen
        cells = [c.strip() for c in per_lr.strip("|").split("|")]
        assert len(cells) == 1 + n_lrs and all(re.fullmatch(num, c) for c in cells[1:]), per_lr
    for r in rows:
        for key in ("val_err", "val_loss", "test_err", "test_loss", "hidden_norm", "out_norm"):
            assert math.isfinite(float(r[key])), (r, key)
    assert "nan" not in table and "inf" not in table


def test_the_quick_sweep_modes_differ(quick_sweep) -> None:
    """At the same (lr, AdamW wd), decoupled, corrected and cautious decay end in different models; every mode
    differs from no decay, and coupled L2 from decoupled."""
    _, rows = quick_sweep
    grids = _sweep_module().QUICK
    for log_lr in grids["log_lrs"]:
        none = float(_cell(rows, "none", log_lr, None)["test_loss"])
        for mode in SWEEP_MODES[1:]:
            assert all(float(_cell(rows, mode, log_lr, wd)["test_loss"]) != none for wd in grids["grids"][mode]), mode
        for wd in grids["grids"]["decoupled"]:
            losses = {float(_cell(rows, m, log_lr, wd)["test_loss"]) for m in ("decoupled", "corrected", "cautious")}
            assert len(losses) == 3, (log_lr, wd)
        coupled = {float(_cell(rows, "coupled", log_lr, wd)["test_loss"]) for wd in grids["grids"]["coupled"]}
        assert coupled.isdisjoint(float(_cell(rows, "decoupled", log_lr, wd)["test_loss"])
                                  for wd in grids["grids"]["decoupled"])


def test_the_quick_sweep_independent_is_decoupled_at_wd_lambda_over_lr(quick_sweep) -> None:
    """``mode="independent"`` with λ is AdamW with wd = λ / lr (lr = the peak): the runs the grids share agree."""
    _, rows = quick_sweep
    grids = _sweep_module().QUICK
    pairs = [(lr, wd) for lr in grids["log_lrs"] for wd in grids["grids"]["decoupled"]
             if lr + wd in grids["grids"]["independent"]]
    assert len(pairs) >= 2
    for lr, wd in pairs:
        a = float(_cell(rows, "decoupled", lr, wd)["test_loss"])
        b = float(_cell(rows, "independent", lr, lr + wd)["test_loss"])
        assert abs(a - b) <= 1e-5 * a, (lr, wd, a, b)


def _reference_run(mode: str, log_lr: float, log_wd: float, seed: int, epochs: int, batch_size: int = 128) -> float:
    """The test loss of a hand-written run of ``mode`` on the script's network: torch.optim.AdamW (decoupled),
    Adam's own L2 (coupled), AdamW whose weight_decay follows lr_t / lr_max on the hidden layers (corrected, AdamC:
    lr_t**2 / lr_max * wd; the output layer plain lr_t * wd), or Adam with the sign mask applied by hand before each
    step (cautious). Biases and LayerNorm parameters are in a group without decay."""
    import math

    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    from digits import load_split

    data = load_split(seed=0)
    lr, wd = 10.0**log_lr, 10.0**log_wd
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs
    try:
        torch.manual_seed(seed)
        net = _sweep_module().make_norm_net()
        hidden, out_w = [net[0].weight, net[3].weight], net[6].weight
        plain = [net[1].weight, net[1].bias, net[4].weight, net[4].bias, net[6].bias]  # norms and biases
        assert {id(p) for p in [*hidden, out_w, *plain]} == {id(p) for p in net.parameters()}
        opt_cls = torch.optim.AdamW if mode in ("decoupled", "corrected") else torch.optim.Adam
        own_wd = 0.0 if mode == "cautious" else wd
        opt = opt_cls([{"params": hidden, "weight_decay": own_wd}, {"params": [out_w], "weight_decay": own_wd},
                       {"params": plain, "weight_decay": 0.0}], lr=lr)
        x, y = data["train"]
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(len(x) / batch_size))
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lr_t = opt.param_groups[0]["lr"]
                if mode == "corrected":
                    opt.param_groups[0]["weight_decay"] = wd * lr_t / lr
                if mode == "cautious":
                    with torch.no_grad():
                        for p in [*hidden, out_w]:
                            m = opt.state[p].get("exp_avg")
                            u = p.grad if m is None else torch.lerp(m, p.grad, 1 - 0.9)  # Adam's new first moment
                            p.mul_(torch.where(u * p >= 0, 1 - lr_t * wd, 1.0))
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            xt, yt = data["test"]
            return float(F.cross_entropy(net(xt), yt))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["decoupled", "coupled", "corrected", "cautious"])
def test_a_quick_sweep_cell_equals_a_hand_written_run(quick_sweep, mode: str) -> None:
    """The script's cell (its CSV row) is the run of a loop that uses no lightning_wd: bit for bit for decoupled
    (torch.optim.AdamW) and coupled (Adam's own L2); within rounding for corrected and cautious, whose per-step factor
    the hand loop computes in another order."""
    _, rows = quick_sweep
    grids = _sweep_module().QUICK
    log_lr, log_wd = grids["log_lrs"][0], grids["grids"][mode][-1]
    row = _cell(rows, mode, log_lr, log_wd)
    got = float(row["test_loss"])
    want = _reference_run(mode, log_lr, log_wd, int(row["seed"]), int(row["epochs"]))
    if mode in ("decoupled", "coupled"):
        assert got == want
    else:
        assert abs(got - want) <= 1e-6 * want, (got, want)


# --- examples/lr_wd_sweep.py: its full grid runs only cells that lightning_wd accepts ------------------------------
def test_lr_wd_sweep_skips_exactly_the_cells_that_lightning_wd_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """lightning_wd refuses a per-step decay of 1 or more; the full sweep's grid reaches it (lr 0.1 x wd 10), so the
    script must leave those cells out instead of stopping there, and train every other cell."""
    import importlib.util
    import math
    from itertools import product

    from lightning_wd import attach_weight_decay

    spec = importlib.util.spec_from_file_location("lr_wd_sweep", ROOT / "examples" / "lr_wd_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    log_lrs, log_wds = sweep.FULL["log_lrs"], sweep.FULL["log_wds"]
    for mode, lr, wd in product(("coupled", "decoupled", "independent"), log_lrs, log_wds):
        p = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.Adam([p], lr=10.0**lr, weight_decay=10.0**wd)
        handle = attach_weight_decay(opt, mode=mode)
        p.grad = torch.ones(2)
        try:
            opt.step()
            accepted = True
        except ValueError:
            accepted = False
        finally:
            handle.detach()
        assert accepted != sweep.refused(mode, lr, wd), (mode, lr, wd)

    trained = []
    monkeypatch.setattr(sweep, "train_once", lambda data, mode, lr, wd, *rest: trained.append((mode, lr, wd)) or
                        dict(val_err=0.0, test_err=0.0, test_loss=0.0))
    sweep.run_sweep(list(sweep.MODES), log_lrs, log_wds, seeds=1, epochs=1, batch_size=128)
    cells = {(m, lr, wd) for m, lr, wd in product(sweep.MODES, log_lrs, log_wds)}
    refused = {(m, lr, wd) for m, lr, wd in cells if sweep.refused(m, lr, wd)}
    assert refused and len(trained) == len(log_lrs) + len(cells) - len(refused)  # + the no-decay runs
    assert not any(sweep.refused(m, round(math.log10(lr), 6), round(math.log10(wd), 6))
                   for m, lr, wd in trained if wd > 0)
