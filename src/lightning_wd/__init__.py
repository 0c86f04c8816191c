"""lightning-wd: weight decay done right, as PyTorch Lightning callbacks."""

from lightning_wd.attach import AttachedWeightDecay, attach_weight_decay
from lightning_wd.decay import add_l2_to_grads_, decay_weights_
from lightning_wd.effective_lr_monitor import EffectiveLRMonitor
from lightning_wd.exclusion import excluded_parameters
from lightning_wd.weight_decay import WeightDecay
from lightning_wd.weight_norm_monitor import WeightNormMonitor

__all__ = [
    "AttachedWeightDecay",
    "EffectiveLRMonitor",
    "WeightDecay",
    "WeightNormMonitor",
    "add_l2_to_grads_",
    "attach_weight_decay",
    "decay_weights_",
    "excluded_parameters",
]
__version__ = "0.1.0"
