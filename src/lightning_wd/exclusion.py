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


def _scan(module: nn.Module, exclude: Iterable[str], exclude_bias_and_norm: bool):
    """``(name, parameter, reason)`` for every excluded parameter, in ``named_modules()`` order."""
    patterns = list(exclude)
    for mod_name, mod in module.named_modules():
        norm = type(mod).__name__ if isinstance(mod, NORM_TYPES) else None
        for p_name, p in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if exclude_bias_and_norm and norm:
                yield name, p, norm
            elif exclude_bias_and_norm and p_name == "bias":
                yield name, p, "bias"
            else:
                matched = next((pat for pat in patterns if fnmatchcase(name, pat)), None)
                if matched is not None:
                    yield name, p, repr(matched)


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
    return {name: p for name, p, _ in _scan(module, exclude, exclude_bias_and_norm)}


def format_exclusions(
    module: nn.Module,
    exclude: Iterable[str] = (),
    exclude_bias_and_norm: bool = False,
    max_rows: int = 20,
) -> str:
    """A short table of what gets no decay and why, with the counts, for the log at fit start.

    Example::

        >>> print(format_exclusions(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), exclude_bias_and_norm=True))
        WeightDecay: no decay for 3 of 4 parameter tensors (6 of 10 elements)
          parameter  elements  excluded as
          0.bias            2  bias
          1.weight          2  LayerNorm
          1.bias            2  LayerNorm
    """
    rows = [(name, p.numel(), why) for name, p, why in _scan(module, exclude, exclude_bias_and_norm)]
    params = dict(module.named_parameters())
    total = sum(p.numel() for p in params.values())
    head = (
        f"WeightDecay: no decay for {len(rows)} of {len(params)} parameter tensors"
        f" ({sum(n for _, n, _ in rows):,} of {total:,} elements)"
    )
    if not rows:
        return head
    shown = rows[:max_rows]
    w_name = max(len("parameter"), *(len(r[0]) for r in shown))
    w_num = max(len("elements"), *(len(f"{r[1]:,}") for r in shown))
    lines = [head, f"  {'parameter':{w_name}s}  {'elements':>{w_num}s}  excluded as"]
    lines += [f"  {name:{w_name}s}  {f'{n:,}':>{w_num}s}  {why}" for name, n, why in shown]
    if len(rows) > max_rows:
        lines.append(f"  ... and {len(rows) - max_rows} more")
    return "\n".join(lines)
