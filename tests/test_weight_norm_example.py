"""``examples/weight_norm_plot.py --quick`` runs, writes its figure, and its logs hold what the monitor predicts.

The script trains the LayerNorm digits MLP twice (``WeightDecay(mode="decoupled")`` and ``"corrected"``) with
``WeightNormMonitor`` and a ``CSVLogger``. Checked by hand here: under the corrected decay ``wd * lr_t**2 / lr_max``
the predicted norm of the first hidden matrix (128 rows of 64 inputs) is ``sqrt(128) * sqrt(lr_max * 64 / (2 wd))``
at every step; under the decoupled decay it starts there and falls with the cosine lr as ``sqrt(lr_t / lr_max)``.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "weight_norm_plot.py"
LR, WD = 3e-3, 1.0  # the script's defaults


def column(path: Path, key: str) -> list[tuple[int, float]]:
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key) not in ("", None)]


def test_quick_run_writes_the_figure_and_the_predicted_norms(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")  # the digits data (the `examples` extra)
    out = tmp_path / "weight_norm.png"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--save-dir", str(tmp_path), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stdout.count("|g|/|w|") == 4  # the summary: 2 modes x 2 hidden matrices

    at_peak = math.sqrt(128) * math.sqrt(LR * 64 / (2 * WD))
    logs = {mode: tmp_path / "weight_norm" / mode / "metrics.csv" for mode in ("decoupled", "corrected")}
    corrected = column(logs["corrected"], "equilibrium_norm/net.0.weight")
    decoupled = column(logs["decoupled"], "equilibrium_norm/net.0.weight")
    assert [s for s, _ in corrected] == [s for s, _ in decoupled] == list(range(4, 100, 5))
    assert all(v == pytest.approx(at_peak, rel=1e-6) for _, v in corrected)
    # lr_t / lr_max of the cosine schedule over 100 steps, as CosineAnnealingLR computes it (before the step's
    # scheduler update): (1 + cos(pi t / 100)) / 2
    for step, value in decoupled:
        assert value == pytest.approx(at_peak * math.sqrt((1 + math.cos(math.pi * step / 100)) / 2), rel=1e-5)
    with open(logs["corrected"], newline="") as f:
        keys = set(csv.DictReader(f).fieldnames)
    assert {"weight_norm/net.0.weight", "grad_to_weight/net.3.weight", "timescale/Adam/pg1"} <= keys
