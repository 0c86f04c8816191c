"""Train the digits MLP with the ``LightningCLI``; weight decay mode and effective-lr logging come from the config.

Usage (from the repository root)::

    python examples/digits/train.py fit --config examples/digits/decoupled.yaml
    python examples/digits/train.py fit --config examples/digits/coupled.yaml
    python examples/digits/train.py test --config examples/digits/decoupled.yaml --ckpt_path <checkpoint>

Both configs build ``torch.optim.Adam(weight_decay=...)``; the ``lightning_wd.WeightDecay`` callback takes that decay
over, so ``mode: decoupled`` trains exactly as AdamW and ``mode: coupled`` exactly as Adam's own L2 decay.

The callback is the config's top-level ``weight_decay`` section (``lightning_wd.cli.WeightDecayCLI``), so the mode can
be toggled on the command line whatever ``trainer.callbacks`` holds::

    python examples/digits/train.py fit --config examples/digits/decoupled.yaml --weight_decay.mode=coupled
    python examples/digits/train.py fit --config examples/digits/decoupled.yaml --weight_decay=null  # no WeightDecay
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning_wd.cli import WeightDecayCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so `digits` imports however the script is started
from digits import DigitsClassifier, DigitsDataModule, limit_threads  # noqa: E402


class DigitsCLI(WeightDecayCLI):
    """``LightningCLI`` with the ``weight_decay`` section of ``WeightDecayCLI``, that also tests the final weights after
    ``fit``."""

    def after_fit(self) -> None:
        # report test error of the final weights (not a "best" checkpoint: the run has no early stopping)
        self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)


def main(args: list[str] | None = None) -> DigitsCLI:
    limit_threads()
    return DigitsCLI(DigitsClassifier, DigitsDataModule, args=args)


if __name__ == "__main__":
    main()
