"""The optimizer registry: unknown classes warn once naming the assumption, a declaration silences it and is obeyed,
and a run through the Trainer with an optimizer whose lr is None (a relative step size) trains as its own decay."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import compat_cases
import pytest
import torch
from helpers import assert_same_weights, fit, flat_parameters, tiny_module
from reference import decoupled
from torch import nn

from lightning_wd import WeightDecay, attach_weight_decay
from lightning_wd.optimizers import OptimizerRule, register_optimizer, registry, rule_for


class HomeMadeAdamW(torch.optim.Optimizer):
    """A hand-written AdamW-like optimizer (no torch base other than Optimizer): `p *= 1 - lr*wd` before a
    sign-of-gradient step."""

    def __init__(self, params, lr=1e-2, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    decoupled(p, group["lr"], group["weight_decay"])
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def train(opt, m, steps=5):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    return flat_parameters(m)


@pytest.fixture
def clean_registry():
    saved = dict(registry._BY_CLASS), dict(registry._BY_PATH), set(registry._UNRESOLVED)
    yield
    registry._BY_CLASS.clear(), registry._BY_CLASS.update(saved[0])
    registry._BY_PATH.clear(), registry._BY_PATH.update(saved[1])
    registry._UNRESOLVED.clear(), registry._UNRESOLVED.update(saved[2])


def test_an_unknown_class_warns_once_naming_it_and_the_assumption(clean_registry):
    m = model()
    with pytest.warns(UserWarning, match=r"HomeMadeAdamW is not in lightning_wd's optimizer registry; assuming that its"
                                         r" `weight_decay` only adds a decay .* step size is the group's lr"):
        handle = attach_weight_decay(HomeMadeAdamW(m.parameters(), weight_decay=0.1))
    handle.detach()
    assert rule_for(HomeMadeAdamW)[1] is None


@pytest.mark.parametrize("how", ["class", "path"])
def test_a_declaration_silences_the_warning_and_gives_native_handoff(clean_registry, how):
    key = HomeMadeAdamW if how == "class" else f"{__name__}.HomeMadeAdamW"
    register_optimizer(key, OptimizerRule(own="decoupled", description="p *= 1 - lr*wd before a sign step"))
    m = model()
    opt = HomeMadeAdamW(m.parameters(), weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach_weight_decay(opt, mode="decoupled")
    ours = train(opt, m)
    m2 = model()
    ref = train(HomeMadeAdamW(m2.parameters(), weight_decay=0.1), m2)  # its own decay, nothing attached
    assert torch.equal(ours, ref)


def test_a_subclass_of_a_registered_class_warns_naming_its_base():
    class MyAdam(torch.optim.Adam):
        pass

    with pytest.warns(UserWarning, match=r"MyAdam is a subclass of torch.optim.adam.Adam, whose entry it gets"):
        attach_weight_decay(MyAdam(model().parameters(), weight_decay=0.1)).detach()


def test_transformers_adafactor_with_lr_none_trains_through_the_trainer_as_its_own_decay():
    adafactor = pytest.importorskip("transformers.optimization").Adafactor

    def make(m):
        return adafactor(m.parameters(), lr=None, weight_decay=0.1)  # relative step, scale_parameter: the defaults

    ref = tiny_module(make)
    fit(ref, max_steps=6)
    got = tiny_module(make)
    t = fit(got, [WeightDecay(log_weight_decay=True)], max_steps=6)  # the TypeError at the first step
    assert_same_weights(got, ref)
    assert t.optimizers[0].param_groups[0]["lr"] is None
    with pytest.raises(Exception, match="lr is None"):
        fit(tiny_module(make), [WeightDecay("independent")], max_steps=1)


# ---------------------------------------------------------------------------------------------------------------------
# every registry entry is exercised: by a case of compat_cases.py, or named below with the reason it has none
# ---------------------------------------------------------------------------------------------------------------------
def _paths(prefix: str, *names: str) -> list[str]:
    return [f"{prefix}.{name}" for name in names]


_BNB_ADAMW8 = "bitsandbytes.optim.adamw.AdamW8bit"
_BNB_LION8 = "bitsandbytes.optim.lion.Lion8bit"
_BNB_SGD8 = "bitsandbytes.optim.sgd.SGD8bit"
_TORCHAO = "torchao.optim.adam._AdamW"
_TORCHAO_L2 = "torchao.optim.adam.Adam8bit"
_SF_ADAMW = "schedulefree.adamw_schedulefree.AdamWScheduleFree"
_SF_SGD = "schedulefree.sgd_schedulefree.SGDScheduleFree"

#: entry -> the entry with a case to which the same registration loop gave the same decay rule (checked: the same
#: description); they differ from it in their update, their state (32-bit, paged, 4-bit, fp8) or their closure form,
#: not in their decay (bitsandbytes' PagedAdamW8bit and torchao's AdamW8bit/AdamW4bit also train in test_gpu.py)
VARIANTS: dict[str, str] = {
    **{p: _BNB_ADAMW8 for p in _paths("bitsandbytes.optim", "adam.Adam", "adam.Adam32bit", "adam.PagedAdam",
                                      "adam.PagedAdam8bit", "adam.PagedAdam32bit", "adamw.AdamW", "adamw.AdamW32bit",
                                      "adamw.PagedAdamW", "adamw.PagedAdamW8bit", "adamw.PagedAdamW32bit")},
    **{p: _BNB_LION8 for p in _paths("bitsandbytes.optim.lion", "Lion", "Lion32bit", "PagedLion", "PagedLion8bit",
                                     "PagedLion32bit")},
    **{p: _BNB_SGD8 for p in _paths("bitsandbytes.optim.sgd", "SGD", "SGD32bit")},
    **{p: _TORCHAO for p in _paths("torchao.optim.adam", "AdamW8bit", "AdamW4bit", "AdamWFp8")},
    **{p: _TORCHAO_L2 for p in _paths("torchao.optim.adam", "Adam4bit", "AdamFp8")},
    "heavyball.SGD": "heavyball.AdamW",
    "optimi.sgd.SGD": "optimi.adam.Adam",
    "optimi.radam.RAdam": "optimi.adam.Adam",
    "timm.optim.adamw.AdamWLegacy": "timm.optim.lion.Lion",
    **{p: _SF_ADAMW for p in _paths("schedulefree", "radam_schedulefree.RAdamScheduleFree",
                                    "adamw_schedulefree_closure.AdamWScheduleFreeClosure",
                                    "radam_schedulefree_closure.RAdamScheduleFreeClosure")},
    **{p: _SF_SGD for p in _paths("schedulefree", "sgd_schedulefree_closure.SGDScheduleFreeClosure",
                                  "sgd_schedulefree_reference.SGDScheduleFreeReference")},
}

#: wrappers (checked: their entry names the optimizer they step, `inner`): the decay goes to that optimizer, whose own
#: entry says how; the hand-off is trained with the Lookahead wrappers in test_holes.py
WRAPPERS: list[str] = [
    *_paths("pytorch_optimizer.optimizer", "lookahead.Lookahead", "orthograd.OrthoGrad",
            "schedulefree.ScheduleFreeWrapper", "trac.TRAC", "magma.Magma", "pcgrad.PCGrad", "sam.SAM", "sam.WSAM",
            "sam.BSAM", "sam.LookSAM", "sam.FriendlySAM", "sam.GSAM"),
    *_paths("schedulefree", "wrap_schedulefree.ScheduleFreeWrapper",
            "wrap_schedulefree_reference.ScheduleFreeWrapperReference"),
    "timm.optim.lookahead.Lookahead",
]

#: entry -> the test file that trains it instead (checked: the file names the class)
ELSEWHERE: dict[str, str] = {
    "torch.optim.SparseAdam": "test_bad_input.py",  # sparse gradients: the compat runs' dense MLP has none
    "timm.optim.mars.Mars": "test_holes.py",  # its 1-D parameters step at lr * lr_1d_factor: a model of its own
}

#: entries no test trains yet, with what they are: each wants a case in compat_cases.py (a new row of the table in
#: docs/compatibility.md, rendered from the cases)
NO_CASE_YET: dict[str, str] = {}

TESTS = Path(__file__).resolve().parent


def _resolve(path: str) -> type | None:
    """The class an import path names; None where its package is not installed (or this version lacks it)."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(compat_cases._import(module), name)
    except (ImportError, AttributeError):
        return None


@pytest.fixture(scope="module")
def cased() -> set[type]:
    """The class each installed case of compat_cases.py builds, and the class whose entry that one gets (itself, or
    a base class)."""
    classes = set()
    for case in compat_cases.CASES:
        try:
            compat_cases._import(case.package)
        except ImportError:
            continue  # a package not installed: its classes are skipped below
        net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls = type(case.make(net, compat_cases.WD, case.lr))
        classes |= {cls, rule_for(cls)[1]}
    return classes - {None}


def _defined_in_the_tests(cls: type) -> bool:
    try:
        return Path(inspect.getsourcefile(cls) or "").resolve().is_relative_to(TESTS)
    except TypeError:
        return False


def registry_entries() -> dict[str, type | None]:
    """Every entry, by its import path: the class it names, None where its package is not installed here. A class
    registered as a class (not by path) is named by its module and qualified name; classes the tests define and
    register for themselves are left out."""
    entries = {path: _resolve(path) for path in registry._BY_PATH}
    path_rules = {id(rule) for rule in registry._BY_PATH.values()}
    for cls, rule in registry._BY_CLASS.items():
        if id(rule) not in path_rules and not _defined_in_the_tests(cls):  # else: a path entry, resolved
            entries[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return entries


def test_every_registry_entry_has_a_compatibility_case_or_a_reason(cased):
    named = [*VARIANTS, *WRAPPERS, *ELSEWHERE, *NO_CASE_YET]
    assert len(named) == len(set(named)), "an entry named twice"
    installed = {path: cls for path, cls in registry_entries().items() if cls is not None}  # the others: skipped
    missing = [path for path, cls in installed.items() if cls not in cased and path not in named]
    assert not missing, f"registered without a case in tests/compat_cases.py or a reason in this test: {missing}"
    needless = [path for path, cls in installed.items() if cls in cased and path in named]
    assert not needless, f"these have a case now: take them out of this test's lists: {needless}"
    assert not set(named) - set(registry._BY_PATH), "named here but not registered"
    uncased = [path for path in set(VARIANTS.values()) if path in installed and installed[path] not in cased]
    assert not uncased, f"VARIANTS name these as cased, but they have no case: {uncased}"


def test_the_reasons_for_entries_without_a_case_hold():
    entry = registry._BY_PATH
    for path, sibling in VARIANTS.items():
        assert entry[path].description == entry[sibling].description, path
    assert all(entry[path].inner is not None for path in WRAPPERS)
    assert "Lookahead" in (TESTS / "test_holes.py").read_text()
    for path, test_file in ELSEWHERE.items():
        assert path.rpartition(".")[2] in (TESTS / test_file).read_text(), (path, test_file)
