"""What the README shows runs as it says: the Usage snippet trains as AdamW with the exclusions, and the Hydra
config instantiates the callback it describes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block_after(heading: str, language: str) -> str:
    """The first fenced block of ``language`` after ``heading``."""
    start = README.index(heading)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(README, start)
    return match.group(1)


def test_the_usage_snippet_trains_as_adamw_with_the_exclusions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its Trainer writes lightning_logs/ to the working directory
    source = block_after("## Usage", "python")
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(source, "README.md:Usage", "exec"), namespace)  # the documentation's own code
    trainer = namespace["trainer"]
    assert trainer.global_step == 3 * 8  # 3 epochs of 256 / 32 batches

    # the reference: the same data and initial weights (made in the snippet's order), plain AdamW with the biases and
    # the LayerNorm in a group without decay, the same batches in the same order
    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randn(256, 1)
    ref = namespace["Model"]()
    net = ref.net
    opt = torch.optim.AdamW([
        {"params": [net[0].weight, net[2].weight], "weight_decay": 0.05},
        {"params": [net[0].bias, net[1].weight, net[1].bias, net[2].bias], "weight_decay": 0.0},
    ], lr=1e-3)
    for _ in range(3):
        for i in range(0, 256, 32):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
    got = trainer.lightning_module.state_dict()
    for name, value in ref.state_dict().items():
        assert torch.equal(got[name], value), name


def test_the_hydra_config_instantiates_the_callback():
    hydra_utils = pytest.importorskip("hydra.utils")
    from omegaconf import OmegaConf

    from lightning_wd import WeightDecay

    cfg = OmegaConf.create(block_after("With [Hydra]", "yaml"))
    (callback,) = [hydra_utils.instantiate(c) for c in cfg.callbacks]
    assert isinstance(callback, WeightDecay)
    assert (callback.mode, callback.exclude_bias_and_norm, callback.schedule, callback.weight_decay_end) == (
        "decoupled", True, "cosine", 0.4)
