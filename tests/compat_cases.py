"""The optimizer compatibility cases: each optimizer as a user configures it (its own ``weight_decay``), and what each
mode of lightning_wd must give with it. ``tests/test_compat.py`` checks every case; the compatibility table of
``docs/compatibility.md`` is rendered from this list (``python tests/compat_cases.py`` rewrites it; a test checks
that it is current).

What a mode gives, per case:

- ``native``: the optimizer applies the mode itself (its own decay as configured, or one of its switches set for the
  step); the reference is the optimizer configured that way. Bit for bit unless marked ``exact=False`` (the same
  arithmetic in another order: within 1e-6 relative).
- ``adapted``: the mode is not the optimizer's own rule; lightning_wd applies it in its separate pass before the
  step, with the optimizer's real step size. The reference is a hand-written loop: the optimizer without decay, and
  the rule applied by hand before each step.
- ``refused``: an error at attach (and at fit start) that says why.
"""

from __future__ import annotations

import importlib
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MODES = ("decoupled", "coupled", "independent", "corrected")
LR = 1e-2
WD = 0.1


@dataclass(frozen=True)
class Expect:
    status: str  # "native", "adapted" or "refused"
    reference: Callable[..., Any] | None = None  # native: the optimizer doing the mode itself (None: as configured)
    scaled: bool = False  # native: the reference gets weight_decay = the mode's coefficient (wd / lr_max, ...)
    exact: bool = True  # bit for bit, or within 1e-6 relative (the same rule, rounded in another order)
    step_size: Callable[[Any, dict], float] | None = None  # adapted: the step size the hand loop uses (lr if None)
    match: str = ""  # refused: the message, as a regex


def native(reference=None, scaled=False, exact=True) -> Expect:
    return Expect("native", reference, scaled, exact)


def adapted(step_size=None) -> Expect:
    return Expect("adapted", step_size=step_size)


def refused(match: str) -> Expect:
    return Expect("refused", match=match)


@dataclass(frozen=True)
class Case:
    id: str  # as the table shows it
    package: str  # the import name; the case is skipped without it
    make: Callable[..., Any]  # (model, weight_decay, lr) -> the optimizer as the user configures it
    expect: dict[str, Expect]
    lr: float | None = LR
    schedule: bool = True  # halve the lr half-way (so that independent and corrected differ from decoupled)
    closure: bool = False  # step(closure) (schedule-free closure variants, LBFGS)
    create_graph: bool = False  # backward(create_graph=True) (SophiaH)
    prepare: Callable[[Any], None] | None = None  # e.g. schedule-free's opt.train()
    wd_argument: bool = False  # the optimizer has no weight_decay: lightning_wd gets it as its argument
    note: str = ""


def _import(name: str):
    """Import a module; timm's submodules without timm's package __init__ (which needs a working torchvision)."""
    if name.startswith("timm") and "timm.optim" not in sys.modules:
        try:
            import timm.optim  # noqa: F401
        except Exception:  # torchvision missing or broken: register bare packages, import the submodules only
            spec = importlib.util.find_spec("timm")
            if spec is None:
                raise ImportError("timm") from None
            root = Path(list(spec.submodule_search_locations)[0])
            for pkg, path in (("timm", root), ("timm.optim", root / "optim")):
                sys.modules.pop(pkg, None)
                module = types.ModuleType(pkg)
                module.__path__ = [str(path)]
                module.__spec__ = importlib.machinery.ModuleSpec(pkg, None, is_package=True)
                module.__spec__.submodule_search_locations = [str(path)]
                sys.modules[pkg] = module
    return importlib.import_module(name)


def cls(path: str):
    module, _, name = path.rpartition(".")
    return getattr(_import(module), name)


def opt(path: str, **fixed):
    """A factory ``(model, wd, lr) -> cls(params, lr=lr, weight_decay=wd, **fixed)``."""
    return lambda model, wd, lr, params=None: cls(path)(
        model.parameters() if params is None else params, lr=lr, weight_decay=wd, **fixed
    )


def d_lr(optimizer, group) -> float:
    return group["d"] * group["lr"]


def asgd_eta(optimizer, group) -> float:
    """ASGD's decayed step size ``eta`` (its state; the lr before its first step)."""
    return float(optimizer.state.get(group["params"][0], {}).get("eta", group["lr"]))


# --- the cases --------------------------------------------------------------------------------------------------------
L2_NATIVE = {"coupled": native(), "decoupled": adapted(), "independent": adapted(), "corrected": adapted()}


def _flagged(path: str, on: dict, **fixed) -> dict[str, Expect]:
    """An optimizer with an L2 default and a switch ``on`` to decoupled decay."""
    return {
        "coupled": native(),
        "decoupled": native(opt(path, **fixed, **on)),
        "independent": native(opt(path, **fixed, **on), scaled=True),
        "corrected": native(opt(path, **fixed, **on), scaled=True),
    }


def _decoupled_default(path: str, coupled: dict | None, **fixed) -> dict[str, Expect]:
    """A decoupled optimizer (``p *= 1 - lr*wd`` before the update), with an L2 switch ``coupled`` or none."""
    return {
        "decoupled": native(),
        "coupled": native(opt(path, **fixed, **coupled)) if coupled is not None else adapted(),
        "independent": native(scaled=True),
        "corrected": native(scaled=True),
    }


def _po(name: str) -> str:
    return f"pytorch_optimizer.{name}"


def _muon_groups(model):
    two_d = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    return [{"params": two_d, "use_muon": True}, {"params": rest, "use_muon": False}]


DWD = {"decoupled_weight_decay": True}


def _kron(**fixed):
    """timm's Kron (its random draws from its own seeded generator: ``deterministic=True``), with the helpers it
    compiles (preconditioner update and application, no part of its decay) run eagerly: compiling them costs seconds
    per test process."""

    def make(model, wd, lr, params=None):
        optimizer = opt("timm.optim.kron.Kron", deterministic=True, **fixed)(model, wd, lr, params)
        module = _import("timm.optim.kron")
        for name in ("_calc_A_and_conjB", "_q_terms", "_precond_grad", "_balance_Q"):
            setattr(optimizer, name, getattr(module, name))
        return optimizer

    return make


CASES: list[Case] = [
    # torch.optim
    Case("torch SGD (momentum)", "torch", opt("torch.optim.SGD", momentum=0.9), L2_NATIVE),
    Case("torch Adam", "torch", opt("torch.optim.Adam"), _flagged("torch.optim.Adam", DWD)),
    Case("torch AdamW", "torch", opt("torch.optim.AdamW"),
         {**_decoupled_default("torch.optim.Adam", {}), "coupled": native(opt("torch.optim.Adam"))}),
    Case("torch NAdam", "torch", opt("torch.optim.NAdam"),
         _flagged("torch.optim.NAdam", DWD)),
    Case("torch RAdam", "torch", opt("torch.optim.RAdam"),
         _flagged("torch.optim.RAdam", DWD)),
    Case("torch RMSprop", "torch", opt("torch.optim.RMSprop"), L2_NATIVE),
    Case("torch Adagrad", "torch", opt("torch.optim.Adagrad"), L2_NATIVE),
    Case("torch Adamax", "torch", opt("torch.optim.Adamax"), L2_NATIVE),
    Case("torch ASGD", "torch", opt("torch.optim.ASGD"),
         {"coupled": native(), "decoupled": adapted(asgd_eta), "independent": adapted(),
          "corrected": adapted(asgd_eta)}, note="its step size is eta, which decays"),
    Case("torch Adadelta", "torch", opt("torch.optim.Adadelta"),
         {"coupled": native(), "decoupled": refused("Adadelta's lr multiplies an adaptive step"),
          "independent": adapted(), "corrected": refused("Adadelta's lr multiplies an adaptive step")}, lr=1.0),
    Case("torch Adafactor", "torch", opt("torch.optim.Adafactor"),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}),
    Case("torch Muon", "torch", lambda m, wd, lr: cls("torch.optim.Muon")(
        [p for p in m.parameters() if p.ndim == 2], lr=lr, weight_decay=wd),
         _decoupled_default("torch.optim.Muon", None)),
    Case("torch Rprop", "torch", lambda m, wd, lr: cls("torch.optim.Rprop")(m.parameters(), lr=lr),
         {"coupled": adapted(), "decoupled": refused("Rprop's step size is per element"),
          "independent": refused("Rprop's step size is per element"),
          "corrected": refused("Rprop's step size is per element")}, wd_argument=True,
         note="no weight_decay of its own: give `WeightDecay(weight_decay=...)`"),
    Case("torch LBFGS", "torch", lambda m, wd, lr: cls("torch.optim.LBFGS")(m.parameters(), lr=lr),
         {mode: refused("evaluates its closure several times") for mode in MODES}, closure=True),
    # pytorch-optimizer
    Case("pytorch_optimizer Lion", "pytorch_optimizer", opt(_po("Lion")),
         _decoupled_default(_po("Lion"), {"weight_decouple": False})),
    Case("pytorch_optimizer AdaBelief", "pytorch_optimizer", opt(_po("AdaBelief")),
         _decoupled_default(_po("AdaBelief"), {"weight_decouple": False})),
    Case("pytorch_optimizer Lamb", "pytorch_optimizer", opt(_po("Lamb")),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}),
    Case("pytorch_optimizer LARS", "pytorch_optimizer", opt(_po("LARS")),
         {mode: refused("trust ratio") for mode in MODES}),
    Case("pytorch_optimizer AdamP", "pytorch_optimizer", opt(_po("AdamP")),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}),
    Case("pytorch_optimizer AdamMini", "pytorch_optimizer",
         lambda m, wd, lr: cls(_po("AdamMini"))(m, lr=lr, weight_decay=wd),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}),
    Case("pytorch_optimizer Adan", "pytorch_optimizer", opt(_po("Adan")),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}),
    Case("pytorch_optimizer MADGRAD", "pytorch_optimizer", opt(_po("MADGRAD")),
         {"coupled": native(), "decoupled": native(opt(_po("MADGRAD"), weight_decouple=True)),
          "independent": refused("dual averaging"), "corrected": refused("dual averaging")},
         note="its decoupled decay is scaled by lr + eps"),
    Case("pytorch_optimizer SophiaH", "pytorch_optimizer", opt(_po("SophiaH")),
         {"decoupled": native(), "coupled": native(opt(_po("SophiaH"), weight_decouple=False)),
          "independent": native(scaled=True), "corrected": native(scaled=True)},
         create_graph=True),
    Case("pytorch_optimizer Ranger21", "pytorch_optimizer",
         lambda m, wd, lr: cls(_po("Ranger21"))(m.parameters(), num_iterations=8, lr=lr, weight_decay=wd),
         {"decoupled": native(), "coupled": adapted(), "independent": adapted(),
          "corrected": refused("step size is relative")}),
    Case("pytorch_optimizer Prodigy", "pytorch_optimizer", opt(_po("Prodigy")),
         {"decoupled": native(), "coupled": adapted(), "independent": adapted(), "corrected": adapted(d_lr)},
         lr=1.0, note="its step size is d*lr"),
    Case("pytorch_optimizer DAdaptAdam", "pytorch_optimizer", opt(_po("DAdaptAdam")),
         {"coupled": native(), "decoupled": native(opt(_po("DAdaptAdam"), weight_decouple=True)),
          "independent": adapted(), "corrected": adapted(d_lr)}, lr=1.0),
    Case("pytorch_optimizer AdaFactor", "pytorch_optimizer", opt(_po("AdaFactor")),
         {"decoupled": native(), "coupled": native(opt(_po("AdaFactor"), weight_decouple=False)),
          "independent": adapted(), "corrected": refused("step size is relative")}),
    Case("pytorch_optimizer ScheduleFreeAdamW", "pytorch_optimizer", opt(_po("ScheduleFreeAdamW")),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}),
    Case("pytorch_optimizer SGDW", "pytorch_optimizer", opt(_po("SGDW"), momentum=0.9),
         _decoupled_default(_po("SGDW"), {"weight_decouple": False}, momentum=0.9)),
    Case("pytorch_optimizer StableAdamW", "pytorch_optimizer", opt(_po("StableAdamW")),
         {"decoupled": native(), "coupled": native(opt(_po("StableAdamW"), weight_decouple=False)),
          "independent": adapted(), "corrected": refused("step size is relative")}),
    Case("pytorch_optimizer Ranger", "pytorch_optimizer", opt(_po("Ranger")),
         _decoupled_default(_po("Ranger"), {"weight_decouple": False})),
    Case("pytorch_optimizer Muon", "pytorch_optimizer",
         lambda m, wd, lr, params=None: cls(_po("Muon"))(_muon_groups(m), lr=lr, weight_decay=wd),
         {"decoupled": native(), "coupled": native(lambda m, wd, lr: cls(_po("Muon"))(
             _muon_groups(m), lr=lr, weight_decay=wd, weight_decouple=False)),
          "independent": native(scaled=True), "corrected": native(scaled=True)}),
    # timm
    Case("timm Lion", "timm.optim.lion", opt("timm.optim.lion.Lion"),
         {**_decoupled_default("timm.optim.lion.Lion", None),
          "corrected": native(opt("timm.optim.lion.Lion", corrected_weight_decay=True))}),
    Case("timm NAdamW", "timm.optim.nadamw", opt("timm.optim.nadamw.NAdamW"),
         {**_decoupled_default("timm.optim.nadamw.NAdamW", None),
          "corrected": native(opt("timm.optim.nadamw.NAdamW", corrected_weight_decay=True), exact=False)}),
    Case("timm Lamb", "timm.optim.lamb", opt("timm.optim.lamb.Lamb"),
         {"decoupled": native(opt("timm.optim.lamb.Lamb", decoupled_decay=True)),
          "coupled": refused("turn LAMB into Adam"),
          "independent": native(opt("timm.optim.lamb.Lamb", decoupled_decay=True), scaled=True),
          "corrected": native(opt("timm.optim.lamb.Lamb", decoupled_decay=True, corrected_weight_decay=True),
                              exact=False)}),
    Case("timm Lars", "timm.optim.lars", opt("timm.optim.lars.Lars"), {mode: refused("trust ratio") for mode in MODES}),
    Case("timm AdamP", "timm.optim.adamp", opt("timm.optim.adamp.AdamP"),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}),
    Case("timm Adan", "timm.optim.adan", opt("timm.optim.adan.Adan"),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}),
    Case("timm Adafactor (lr=None)", "timm.optim.adafactor",
         lambda m, wd, lr: cls("timm.optim.adafactor.Adafactor")(m.parameters(), lr=None, weight_decay=wd),
         {"decoupled": native(), "coupled": adapted(), "independent": refused("lr is None"),
          "corrected": refused("lr is None")}, lr=None),
    Case("timm RMSpropTF", "timm.optim.rmsprop_tf", opt("timm.optim.rmsprop_tf.RMSpropTF"),
         {"coupled": native(), "decoupled": native(opt("timm.optim.rmsprop_tf.RMSpropTF", decoupled_decay=True)),
          "independent": native(opt("timm.optim.rmsprop_tf.RMSpropTF", decoupled_decay=True), scaled=True),
          "corrected": native(opt("timm.optim.rmsprop_tf.RMSpropTF", decoupled_decay=True,
                                  corrected_weight_decay=True), exact=False)}),
    Case("timm LaProp", "timm.optim.laprop", opt("timm.optim.laprop.LaProp"),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(opt("timm.optim.laprop.LaProp", corrected_weight_decay=True), exact=False)}),
    Case("timm AdafactorBigVision", "timm.optim.adafactor_bv", opt("timm.optim.adafactor_bv.AdafactorBigVision"),
         {"decoupled": native(), "coupled": adapted(),
          "independent": native(opt("timm.optim.adafactor_bv.AdafactorBigVision", unscaled_wd=True,
                                    corrected_weight_decay=True)),
          "corrected": native(opt("timm.optim.adafactor_bv.AdafactorBigVision", corrected_weight_decay=True))}),
    Case("timm Kron", "timm.optim.kron", _kron(),
         {"decoupled": native(_kron(decoupled_decay=True)), "coupled": adapted(),
          "independent": native(_kron(decoupled_decay=True), scaled=True),
          "corrected": native(_kron(decoupled_decay=True, corrected_weight_decay=True))},
         note="preconditioned, then `wd*p` added: not L2"),
    Case("timm Adopt", "timm.optim.adopt", opt("timm.optim.adopt.Adopt"),
         {"coupled": native(), "decoupled": native(opt("timm.optim.adopt.Adopt", decoupled=True)),
          "independent": native(opt("timm.optim.adopt.Adopt", decoupled=True), scaled=True),
          "corrected": native(opt("timm.optim.adopt.Adopt", decoupled=True, corrected_weight_decay=True))}),
    # torch-optimi
    Case("optimi AdamW", "optimi", opt("optimi.AdamW"),
         {"decoupled": native(), "coupled": adapted(), "independent": native(opt("optimi.AdamW", decouple_lr=True)),
          "corrected": native(scaled=True)}),
    Case("optimi AdamW (decouple_lr)", "optimi", opt("optimi.AdamW", decouple_lr=True),
         {"decoupled": native(opt("optimi.AdamW")), "coupled": adapted(), "independent": native(),
          "corrected": native(opt("optimi.AdamW"), scaled=True)}),
    Case("optimi Adam", "optimi", opt("optimi.Adam"), _flagged("optimi.Adam", {"decouple_wd": True})),
    Case("optimi Lion", "optimi", opt("optimi.Lion"), _decoupled_default("optimi.Lion", None)),
    Case("optimi StableAdamW", "optimi", opt("optimi.StableAdamW"),
         {"decoupled": native(), "coupled": adapted(), "independent": adapted(),
          "corrected": refused("step size is relative")}),
    Case("optimi Ranger", "optimi", opt("optimi.Ranger"),
         {"decoupled": native(), "coupled": native(opt("optimi.Ranger", decouple_wd=False)),
          "independent": native(opt("optimi.Ranger", decouple_lr=True)), "corrected": native(scaled=True)}),
    Case("optimi Adan", "optimi", opt("optimi.Adan"),
         {"decoupled": native(), "coupled": adapted(), "independent": native(opt("optimi.Adan", decouple_lr=True)),
          "corrected": native(scaled=True)}),
    # lion-pytorch
    Case("lion_pytorch Lion", "lion_pytorch", opt("lion_pytorch.Lion"), _decoupled_default("lion_pytorch.Lion", None)),
    Case("lion_pytorch Lion (decoupled_weight_decay)", "lion_pytorch",
         opt("lion_pytorch.Lion", decoupled_weight_decay=True),
         {"decoupled": adapted(), "coupled": adapted(), "independent": native(), "corrected": adapted()},
         note="wd / init_lr: independent decay"),
    # prodigyopt, dadaptation
    Case("prodigyopt Prodigy", "prodigyopt", opt("prodigyopt.Prodigy"),
         {"decoupled": native(), "coupled": native(opt("prodigyopt.Prodigy", decouple=False)),
          "independent": adapted(), "corrected": adapted(d_lr)}, lr=1.0, note="its step size is d*lr"),
    Case("dadaptation DAdaptAdam", "dadaptation", opt("dadaptation.DAdaptAdam"),
         {"coupled": native(), "decoupled": native(opt("dadaptation.DAdaptAdam", decouple=True)),
          "independent": adapted(), "corrected": adapted(d_lr)}, lr=1.0),
    Case("dadaptation DAdaptLion", "dadaptation", opt("dadaptation.DAdaptLion"),
         {"decoupled": native(), "coupled": adapted(), "independent": adapted(), "corrected": adapted(d_lr)}, lr=1.0),
    Case("dadaptation DAdaptAdaGrad", "dadaptation", opt("dadaptation.DAdaptAdaGrad"),
         {"coupled": native(), "decoupled": refused("dual averaging"), "independent": refused("dual averaging"),
          "corrected": refused("dual averaging")}, lr=1.0),
    Case("dadaptation DAdaptSGD", "dadaptation", opt("dadaptation.DAdaptSGD"),
         {"coupled": native(), "decoupled": refused("dual averaging"), "independent": refused("dual averaging"),
          "corrected": refused("dual averaging")}, lr=1.0),
    # schedulefree
    Case("schedulefree AdamWScheduleFree", "schedulefree", opt("schedulefree.AdamWScheduleFree"),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}, prepare=lambda o: o.train()),
    Case("schedulefree SGDScheduleFree", "schedulefree", opt("schedulefree.SGDScheduleFree"),
         {"coupled": native(), "decoupled": refused("second sequence z"), "independent": refused("second sequence z"),
          "corrected": refused("second sequence z")}, prepare=lambda o: o.train()),
    Case("schedulefree AdamWScheduleFreeReference", "schedulefree",
         opt("schedulefree.adamw_schedulefree_reference.AdamWScheduleFreeReference"),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}, prepare=lambda o: o.train()),
    # transformers
    Case("transformers Adafactor (defaults, lr=None)", "transformers",
         lambda m, wd, lr: cls("transformers.optimization.Adafactor")(m.parameters(), lr=None, weight_decay=wd),
         {"decoupled": native(), "coupled": adapted(), "independent": refused("lr is None"),
          "corrected": refused("lr is None")}, lr=None),
    Case("transformers Adafactor (lr, no relative step or scaling)", "transformers",
         opt("transformers.optimization.Adafactor", relative_step=False, scale_parameter=False),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}),
    # heavyball
    Case("heavyball AdamW", "heavyball", opt("heavyball.AdamW"),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}, schedule=False),
    # bitsandbytes (runs on CPU)
    Case("bitsandbytes AdamW8bit", "bitsandbytes", opt("bitsandbytes.optim.AdamW8bit", min_8bit_size=1),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}),
    Case("bitsandbytes Adam8bit", "bitsandbytes", opt("bitsandbytes.optim.Adam8bit", min_8bit_size=1),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}),
    Case("bitsandbytes Lion8bit", "bitsandbytes", opt("bitsandbytes.optim.Lion8bit", min_8bit_size=1),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True)}),
    Case("bitsandbytes SGD8bit (momentum)", "bitsandbytes", opt("bitsandbytes.optim.SGD8bit", momentum=0.9,
                                                                min_8bit_size=1), L2_NATIVE),
    # torchao (runs on CPU through torch.compile)
    Case("torchao _AdamW", "torchao.optim", opt("torchao.optim._AdamW"),
         {"decoupled": native(), "coupled": adapted(), "independent": native(scaled=True),
          "corrected": native(scaled=True, exact=False)}),
    Case("torchao Adam8bit", "torchao.optim", opt("torchao.optim.Adam8bit"), L2_NATIVE),
]


# --- the table of docs/compatibility.md -------------------------------------------------------------------------------
TABLE_START, TABLE_END = "<!-- compatibility table: start -->", "<!-- compatibility table: end -->"
CELL = {"native": "native", "adapted": "adapted", "refused": "refused"}


def own_rule(case: Case) -> str:
    """The registry's description of the case's optimizer: its own rule, in words."""
    import warnings

    from lightning_wd.optimizers import rule_for

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rule, _ = rule_for(type(case.make(model, WD, case.lr)))
    return rule.description


def render_table(cases: list[Case] = CASES) -> str:
    """The compatibility table, as markdown."""
    lines = [
        "| optimizer | its own decay | decoupled | coupled | independent | corrected |",
        "|---|---|---|---|---|---|",
    ]
    for case in cases:
        cells = []
        for mode in MODES:
            e = case.expect[mode]
            cells.append(CELL[e.status] + ("≈" if e.status == "native" and not e.exact else ""))
        own = own_rule(case) + (f" ({case.note})" if case.note else "")
        lines.append(f"| {case.id} | {own} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_with_table(readme: str, table: str) -> str:
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(readme):
        raise ValueError(f"the page has no {TABLE_START} ... {TABLE_END} section")
    return pattern.sub(lambda _: f"{TABLE_START}\n{table}\n{TABLE_END}", readme)


if __name__ == "__main__":  # rewrite the table of docs/compatibility.md from the cases
    path = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"
    path.write_text(readme_with_table(path.read_text(), render_table()))
    print(f"wrote the compatibility table ({len(CASES)} optimizers) into {path}")
