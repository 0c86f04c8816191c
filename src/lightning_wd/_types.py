"""Type aliases shared by the modules of lightning_wd."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

from torch import Tensor

#: a number that may live on a device: a Python float, or a 0-dim tensor (a tensor lr), never read on the host
Scalar = Union[float, Tensor]
#: a param group as the optimizer keeps it
Group = Mapping[str, Any]
