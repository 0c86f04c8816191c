"""Which parameters get no decay: glob patterns on names, and biases and normalization weights by module type."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from torch import nn

#: module types whose parameters are normalization weights (found by type, not by name)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

__all__ = ["NORM_TYPES", "excluded_parameters", "format_exclusions"]


def excluded_parameters(
    module: nn.Module,
    exclude: Iterable[str] = (),
    exclude_bias_and_norm: bool = False,
) -> dict[str, nn.Parameter]:
    """The parameters of ``module`` that must not be decayed, by their ``named_parameters()`` name.

    Args:
        module: the model.
        exclude: ``fnmatch`` patterns matched against the full parameter names (``"*.bias"``, ``"embed.*"``).
        exclude_bias_and_norm: also exclude every parameter registered as ``bias`` on any module, and every
            parameter of a normalization layer (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm).

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> sorted(excluded_parameters(net, exclude_bias_and_norm=True))
        ['0.bias', '1.bias', '1.weight']
    """
    patterns = list(exclude)
    out: dict[str, nn.Parameter] = {}
    for mod_name, mod in module.named_modules():
        is_norm = isinstance(mod, NORM_TYPES)
        for p_name, p in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            by_type = exclude_bias_and_norm and (is_norm or p_name == "bias")
            if by_type or any(fnmatchcase(name, pat) for pat in patterns):
                out[name] = p
    return out


def format_exclusions(excluded: dict[str, nn.Parameter], total: int, max_names: int = 20) -> str:
    """A short report of what is excluded: counts and names, for the log at fit start."""
    n_elems = sum(p.numel() for p in excluded.values())
    names = sorted(excluded)
    shown = ", ".join(names[:max_names]) + (f", ... ({len(names) - max_names} more)" if len(names) > max_names else "")
    return (
        f"WeightDecay: {len(excluded)} of {total} parameter tensors excluded from decay"
        f" ({n_elems:,} elements): {shown or 'none'}"
    )
