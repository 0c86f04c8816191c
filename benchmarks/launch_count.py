"""What EffectiveLRMonitor's statistics launch on a GPU per logging step, counted on a CPU: the torch ops that run a
kernel (views aside) and the Triton launches, for one param group of AdamW whose step counts are device tensors (as a
fused AdamW keeps them on a GPU).

On the GPU machine a launch costs host time whatever its size (~5 us for a torch op, ~18 us for a Triton kernel on
the H200 machine), so for a model of many small parameters these counts, not the kernels, bound a logging step. The
Triton kernels run in Triton's interpreter here, stubbed (only their launches are counted), so the count takes a
second whatever the sizes.

    python benchmarks/launch_count.py --layers 8              # 8 x Linear(64): 16 parameters
    PYTHONPATH=/path/to/old/src python benchmarks/launch_count.py   # the same count for another version
"""

from __future__ import annotations

import argparse
import collections
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernels are defined for the interpreter

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import lightning_wd.effective_lr as el  # noqa: E402
from lightning_wd import rate_triton as rt  # noqa: E402
from lightning_wd.optimizers import formula_for  # noqa: E402

try:  # torch.optim's formulas; before 2026-12-05 they lived in effective_lr (the PYTHONPATH line above)
    from lightning_wd.optimizers import torch_rates as formulas  # noqa: E402
except ImportError:  # pragma: no cover - an older tree
    formulas = el

#: ops that make a view or read metadata: no kernel
VIEWS = {"select", "view", "detach", "alias", "unsqueeze", "squeeze", "reshape", "slice", "lift_fresh", "expand",
         "split", "split_with_sizes", "_local_scalar_dense"}


class Launches(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in VIEWS:
            self.counts["torch ops"] += 1
        return func(*args, **(kwargs or {}))


class _Stub:
    """A kernel whose launches are counted and not run."""

    def __init__(self, counts: collections.Counter[str], name: str) -> None:
        self.counts, self.name = counts, name

    def __getitem__(self, grid):
        self.counts[f"Triton {self.name}"] += 1
        return lambda *args, **kwargs: None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="Linear(64, 64) layers: 2 parameters each")
    args = ap.parse_args()
    el._TRITON_DEVICES = ("cuda", "cpu")  # the Triton pass on the CPU, as on a GPU
    # the step counts as device tensors, as a fused AdamW's (the formulas' step reader: step_count, once _step)
    setattr(formulas, "step_count" if hasattr(formulas, "step_count") else "_step", lambda state: state["step"])
    counter = Launches()
    rt._coarse_kernel, rt._fine_kernel = _Stub(counter.counts, "phase 1"), _Stub(counter.counts, "phase 2")
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(args.layers)])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 64)).sum().backward()
    opt.step()
    formula = formula_for(opt)[1]
    group = opt.param_groups[0]
    params = list(group["params"])
    states = [opt.state[p] for p in params]
    with counter:
        if hasattr(formula, "specs"):
            specs = formula.specs(states, group, params)
        else:  # versions before Formula.specs
            specs = [formula.spec(s, group, p) for s, p in zip(states, params)]
        el.rate_statistics(specs, per_parameter=False, per_group=True)
    counts = dict(counter.counts)
    print(f"{len(params)} parameters, one group: {counts}, {sum(counts.values())} launches in all")


if __name__ == "__main__":
    main()
