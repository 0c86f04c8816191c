"""Exclusion by glob pattern and by module type."""

from __future__ import annotations

import torch
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
    excl = excluded_parameters(net, ["*.bias"])
    text = format_exclusions(excl, total=len(dict(net.named_parameters())))
    assert text.startswith("WeightDecay: 4 of 11 parameter tensors excluded from decay (16 elements)")
    assert "0.proj.bias" in text and "0.embed.weight" not in text
