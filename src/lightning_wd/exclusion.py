"""Which parameters get no decay: glob patterns on names, and biases and normalization weights by module type."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

#: module types whose parameters are normalization weights (found by type, not by name)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

#: the segment ``torch.compile`` adds to the names of a compiled module's parameters
COMPILED_SEGMENT = "_orig_mod."

__all__ = ["NORM_TYPES", "check_patterns", "excluded_parameters", "format_exclusions", "matches", "unmatched_patterns"]


def check_patterns(patterns: Any, name: str = "exclude") -> list[str]:
    """``patterns`` as a list of glob patterns (``None``: none), or a ``TypeError``/``ValueError`` that names the
    argument ``name``."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        raise ValueError(f"`{name}` must be a list of glob patterns, got the string {patterns!r}:"
                         f" write [{patterns!r}].")
    try:
        checked = list(patterns)
    except TypeError:
        raise TypeError(f"`{name}` must be a list of glob patterns (strings), got {patterns!r}.") from None
    bad = [p for p in checked if not isinstance(p, str)]
    if bad:
        raise TypeError(
            f"`{name}` must hold glob patterns (strings) matched against `named_parameters()` names, got {bad!r}."
            f" To select parameters themselves use `attach_weight_decay(..., {name}=[...])`."
        )
    return checked


def _is_bias(p_name: str) -> bool:
    # `bias`, and the biases registered under other names: MultiheadAttention's `in_proj_bias`, `bias_k`, `bias_v`
    return p_name == "bias" or p_name.endswith("_bias") or p_name.startswith("bias_")


def matches(name: str, pattern: str) -> bool:
    """Whether parameter ``name`` matches the glob ``pattern``, with or without compile's ``_orig_mod.``."""
    # a pattern written for the model also matches it compiled, where names gain `_orig_mod.`
    return fnmatchcase(name, pattern) or fnmatchcase(name.replace(COMPILED_SEGMENT, ""), pattern)


def _scan(module: nn.Module, exclude: Iterable[str], exclude_bias_and_norm: bool):
    """``(name, parameter, reason)`` for every excluded parameter, in ``named_modules()`` order; a tensor shared by
    several modules (tied weights) once, under its first name."""
    patterns = list(exclude)
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        norm = type(mod).__name__ if isinstance(mod, NORM_TYPES) else None
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if exclude_bias_and_norm and norm:
                yield name, p, norm
            elif exclude_bias_and_norm and _is_bias(p_name):
                yield name, p, "bias"
            else:
                matched = next((pat for pat in patterns if matches(name, pat)), None)
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
        exclude: ``fnmatch`` patterns matched against the full parameter names (``"*.bias"``, ``"embed.*"``); under
            ``torch.compile`` also against the names without the ``_orig_mod.`` it adds.
        exclude_bias_and_norm: also exclude every bias (a parameter registered as ``bias``, ``*_bias`` or ``bias_*``,
            e.g. ``MultiheadAttention``'s ``in_proj_bias``), and every parameter of a normalization layer (BatchNorm,
            InstanceNorm, LayerNorm, GroupNorm, RMSNorm).

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> sorted(excluded_parameters(net, exclude_bias_and_norm=True))
        ['0.bias', '1.bias', '1.weight']
    """
    return {name: p for name, p, _ in _scan(module, exclude, exclude_bias_and_norm)}


def unmatched_patterns(module: nn.Module, exclude: Iterable[str]) -> list[str]:
    """The patterns of ``exclude`` that match no parameter name of ``module`` (with or without ``_orig_mod.``).

    Example::

        >>> unmatched_patterns(nn.Linear(2, 2), ["*.bias", "bias"])
        ['*.bias']
    """
    names = [name for name, _ in module.named_parameters()]
    return [pat for pat in exclude if not any(matches(name, pat) for name in names)]


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
