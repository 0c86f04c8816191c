"""Exclusion by glob pattern and by module type."""

from __future__ import annotations

import torch
from helpers import trainer
from torch import nn

from lightning_wd.exclusion import excluded_parameters, format_exclusions


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.rms = nn.RMSNorm(4)
        self.embed = nn.Embedding(10, 4)
        self.gain = nn.Parameter(torch.ones(4))  # named like nothing special: decayed unless a pattern says so


def test_bias_and_norm_found_by_module_type_not_name():
    net = nn.Sequential(Block())
    names = set(excluded_parameters(net, exclude_bias_and_norm=True))
    assert names == {
        "0.proj.bias", "0.norm.weight", "0.norm.bias", "0.bn.weight", "0.bn.bias",
        "0.gn.weight", "0.gn.bias", "0.rms.weight",
    }


def test_glob_patterns_on_full_names():
    net = nn.Sequential(Block())
    assert set(excluded_parameters(net, ["*.embed.*", "*gain"])) == {"0.embed.weight", "0.gain"}
    assert excluded_parameters(net) == {}


def test_report_counts_and_names():
    net = nn.Sequential(Block())
    text = format_exclusions(net, ["*.embed.*"], exclude_bias_and_norm=True)
    lines = text.splitlines()
    assert lines[0] == "WeightDecay: no decay for 9 of 11 parameter tensors (72 of 92 elements)"
    assert lines[1].split() == ["parameter", "elements", "excluded", "as"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows["0.proj.bias"] == ["4", "bias"]
    assert rows["0.bn.weight"] == ["4", "BatchNorm1d"]
    assert rows["0.embed.weight"] == ["40", "'*.embed.*'"]
    assert "0.proj.weight" not in rows and "0.gain" not in rows
    empty = "WeightDecay: no decay for 0 of 11 parameter tensors (0 of 92 elements)"
    assert format_exclusions(net, max_rows=2) == empty
    assert format_exclusions(net, ["*"], max_rows=2).splitlines()[-1] == "  ... and 9 more"


def test_report_is_logged_once_at_fit_start(caplog):
    import logging

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_wd import WeightDecay

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), weight_decay=0.1)

    t = trainer([WeightDecay(exclude_bias_and_norm=True)], max_steps=3)
    with caplog.at_level(logging.INFO):
        t.fit(Model(), DataLoader(TensorDataset(torch.randn(12, 3)), batch_size=4))
    reports = [r.getMessage() for r in caplog.records if "WeightDecay: no decay" in r.getMessage()]
    assert len(reports) == 1
    assert reports[0].startswith("WeightDecay: no decay for 3 of 4 parameter tensors (9 of 18 elements)")
