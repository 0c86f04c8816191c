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
    # the snippet lets the Trainer pick the accelerator; the reference below trains on the CPU, so the snippet must too
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))
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


def test_the_hydra_config_instantiates_the_callback(tmp_path, monkeypatch):
    pytest.importorskip("hydra")
    import hydra.utils
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from omegaconf import OmegaConf

    from lightning_wd import WeightDecay

    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.create(block_after("With [Hydra]", "yaml"))
    callback = hydra.utils.instantiate(cfg.weight_decay)  # the top-level node, on its own
    assert isinstance(callback, WeightDecay)
    assert (callback.mode, callback.exclude_bias_and_norm) == ("decoupled", True)

    # the README's own lines: the node appended to the callbacks, and none without it (`~weight_decay`)
    source = block_after("With [Hydra]", "python")
    for config, expected in ((cfg, 1), (OmegaConf.create({"callbacks": cfg.callbacks}), 0)):
        namespace = {"hydra": hydra, "L": L, "cfg": config}
        exec(compile(source, "README.md:Hydra", "exec"), namespace)
        callbacks = namespace["trainer"].callbacks
        assert sum(isinstance(c, ModelCheckpoint) for c in callbacks) == 1
        assert [c.mode for c in callbacks if isinstance(c, WeightDecay)] == ["decoupled"] * expected
