"""The digits example's CLI configs train exactly as their references.

``examples/digits/{decoupled,coupled}.yaml`` build ``torch.optim.Adam(weight_decay=wd)`` (``wd``: the config's
``model.weight_decay``) and let ``lightning_wd.WeightDecay`` take the decay over. Each config runs in a subprocess
(a few short epochs via CLI overrides) next to a reference run of the same config without any callback:

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
    cmd = [sys.executable, str(TRAIN), "fit", "--config", str(TRAIN.parent / f"{config}.yaml"), *SHORT,
           f"--trainer.logger.init_args.save_dir={tmp}", f"--trainer.default_root_dir={tmp}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (ckpt,) = tmp.glob("digits/version_0/checkpoints/*.ckpt")  # saved after the last epoch
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"], ckpt.parents[1]


def cached_run(tmp_path_factory: pytest.TempPathFactory, config: str, kind: str) -> tuple[dict, Path]:
    """One run per (config, kind), shared by the tests of this module. ``kind``: "callback", "reference" (no
    callback at all, and the optimizer that the mode must reproduce) or "override-coupled" (the config with the mode
    overridden on the command line, as the README shows)."""
    if (config, kind) not in _runs:
        extra = []
        if kind == "reference":
            extra = ["--trainer.callbacks=[]", f"--model.optimizer={REFERENCE_OPTIMIZER[config]}"]
        elif kind == "override-coupled":
            extra = ["--trainer.callbacks.mode=coupled"]
        _runs[config, kind] = run_cli(config, tmp_path_factory.mktemp(f"{config}_{kind}"), extra)
    return _runs[config, kind]


def test_configs_differ_by_one_line() -> None:
    decoupled = (TRAIN.parent / "decoupled.yaml").read_text().splitlines()
    coupled = (TRAIN.parent / "coupled.yaml").read_text().splitlines()
    diff = [(a.strip(), b.strip()) for a, b in zip(decoupled, coupled) if a != b]
    assert len(decoupled) == len(coupled) and diff == [("mode: decoupled", "mode: coupled")]


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
    assert {"effective_lr/Adam/pg0/median", "effective_lr/net.0.weight/max", "test/err"} <= set(tags)
    # and the decay applied, beside LearningRateMonitor's columns
    assert {"weight_decay/Adam/pg0", "lr-Adam", "lr-Adam-weight_decay"} <= set(tags)


def test_the_mode_can_be_overridden_on_the_command_line(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``--trainer.callbacks.mode=coupled`` on decoupled.yaml reaches WeightDecay (the last callback) and trains as
    Adam's own L2, like coupled.yaml."""
    weights, _ = cached_run(tmp_path_factory, "decoupled", "override-coupled")
    reference, _ = cached_run(tmp_path_factory, "coupled", "reference")
    for name in weights:
        assert torch.equal(weights[name], reference[name]), f"override: {name} differs from Adam's own L2"


def test_modes_are_told_apart(tmp_path_factory: pytest.TempPathFactory) -> None:
    """AdamW and Adam+L2 end in different weights, so the equalities above are not trivially true."""
    adamw, _ = cached_run(tmp_path_factory, "decoupled", "reference")
    adam_l2, _ = cached_run(tmp_path_factory, "coupled", "reference")
    assert not torch.equal(adamw["net.0.weight"], adam_l2["net.0.weight"])
