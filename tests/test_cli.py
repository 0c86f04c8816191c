"""``lightning_wd.cli``: the top-level ``weight_decay`` section of a LightningCLI config (and its Hydra recipe).

``--trainer.callbacks.mode=coupled`` reaches a WeightDecay in ``trainer.callbacks`` only when it is the last callback
(jsonargparse's rule for lists); the section is reached by its own key, whatever that list holds. Each test builds a
``WeightDecayCLI`` with ``run=False`` around Lightning's ``BoringModel`` and checks the callbacks its Trainer got:
exactly one WeightDecay, with the arguments given, and every other callback as configured (a ``ModelCheckpoint``
keeps its own ``mode``).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import typing
from pathlib import Path

import pytest

jsonargparse = pytest.importorskip("jsonargparse")

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

import lightning_wd  # noqa: E402
from lightning_wd import WeightDecay  # noqa: E402
from lightning_wd.cli import WeightDecayCLI, add_weight_decay_arguments  # noqa: E402

MODES = typing.get_args(typing.get_type_hints(WeightDecay.__init__)["mode"])
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
MC, LRM = "lightning.pytorch.callbacks.ModelCheckpoint", "lightning.pytorch.callbacks.LearningRateMonitor"


@pytest.fixture(autouse=True)
def _no_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when it is given ``args`` while ``sys.argv`` holds pytest's own."""
    monkeypatch.setattr(sys, "argv", ["train.py"])


def make_cli(args: list[str], cli_class: type[LightningCLI] = WeightDecayCLI, **kwargs) -> LightningCLI:
    return cli_class(BoringModel, BoringDataModule, run=False, args=[*QUIET, *args], **kwargs)


def _version(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def the_weight_decay(trainer: Trainer) -> WeightDecay:
    """The Trainer's one WeightDecay (and no ``None`` among its callbacks)."""
    assert all(isinstance(cb, Callback) for cb in trainer.callbacks), trainer.callbacks
    (wd,) = [cb for cb in trainer.callbacks if isinstance(cb, WeightDecay)]
    return wd


def assert_weight_decay(trainer: Trainer, **args) -> None:
    """The Trainer's WeightDecay is ``WeightDecay(**args)``: the arguments given, every other one at its default."""
    wd = the_weight_decay(trainer)
    assert repr(wd) == repr(WeightDecay(**args))
    for name, value in args.items():
        assert getattr(wd, name) == value, name


def user_callbacks(trainer: Trainer) -> list[Callback]:
    """The Trainer's ModelCheckpoints and LearningRateMonitors, in order."""
    return [cb for cb in trainer.callbacks if isinstance(cb, (ModelCheckpoint, LearningRateMonitor))]


# the callbacks of the tests: ModelCheckpoints with a `mode` of their own, and a LearningRateMonitor, which the
# `weight_decay` section must leave alone, whichever order they come in
CALLBACKS = {
    "checkpoint first": f"""
  callbacks:
    - class_path: {MC}
      init_args: {{monitor: val_acc, mode: max}}
    - class_path: {LRM}
      init_args: {{logging_interval: step}}
    - class_path: {MC}
      init_args: {{monitor: val_loss, filename: best-loss}}
""",
    "checkpoint last": f"""
  callbacks:
    - class_path: {LRM}
      init_args: {{logging_interval: step}}
    - class_path: {MC}
      init_args: {{monitor: val_loss, filename: best-loss}}
    - class_path: {MC}
      init_args: {{monitor: val_acc, mode: max}}
""",
}


def assert_callbacks_untouched(trainer: Trainer, layout: str) -> None:
    got = [(type(cb).__name__, getattr(cb, "monitor", None), getattr(cb, "mode", None),
            getattr(cb, "logging_interval", None)) for cb in user_callbacks(trainer)]
    mc_max = ("ModelCheckpoint", "val_acc", "max", None)
    mc_min = ("ModelCheckpoint", "val_loss", "min", None)  # its default mode
    lrm = ("LearningRateMonitor", None, None, "step")
    # in the order of the config, but for the Trainer's own rule: checkpoint callbacks last
    assert got == ([lrm, mc_max, mc_min] if layout == "checkpoint first" else [lrm, mc_min, mc_max])
    # the section's WeightDecay comes after the other callbacks of `trainer.callbacks` (then the checkpoints)
    position = {id(cb): i for i, cb in enumerate(trainer.callbacks)}
    lrm_cb, *checkpoints = user_callbacks(trainer)
    assert position[id(lrm_cb)] < position[id(the_weight_decay(trainer))] < min(position[id(cb)] for cb in checkpoints)


# --- the section toggles the mode, whatever else the config holds -------------------------------------------------
@pytest.mark.parametrize("layout", list(CALLBACKS))
@pytest.mark.parametrize("mode", MODES)
def test_the_section_of_a_config_file(tmp_path: Path, mode: str, layout: str) -> None:
    section = f"weight_decay:\n  mode: {mode}\n  exclude_bias_and_norm: true\n"
    trainer = f"trainer:{CALLBACKS[layout]}"
    # the section before the trainer's in one layout, after it in the other
    text = section + trainer if layout == "checkpoint first" else trainer + section
    cli = make_cli(["--config", write(tmp_path / "config.yaml", text)])
    assert_weight_decay(cli.trainer, mode=mode, exclude_bias_and_norm=True)
    assert_callbacks_untouched(cli.trainer, layout)


@pytest.mark.parametrize("layout", list(CALLBACKS))
@pytest.mark.parametrize("mode", MODES)
def test_the_command_line_overrides_a_config_file(tmp_path: Path, mode: str, layout: str) -> None:
    """``--weight_decay.mode`` changes the mode of the file's section and keeps its other arguments."""
    other = "decoupled" if mode != "decoupled" else "coupled"
    text = f"trainer:{CALLBACKS[layout]}weight_decay:\n  mode: {other}\n  exclude_bias_and_norm: true\n"
    cli = make_cli(["--config", write(tmp_path / "config.yaml", text), f"--weight_decay.mode={mode}"])
    assert_weight_decay(cli.trainer, mode=mode, exclude_bias_and_norm=True)
    assert_callbacks_untouched(cli.trainer, layout)


@pytest.mark.parametrize("mode", MODES)
def test_the_command_line_alone(mode: str) -> None:
    """Callbacks appended on the command line, before and after the section's options: each ``mode`` goes to its own
    callback (``--trainer.callbacks.mode`` to the last callback of the list, ``--weight_decay.mode`` to WeightDecay)."""
    checkpoint = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor=val_acc",
                  "--trainer.callbacks.mode=max"]
    monitor = ["--trainer.callbacks+=LearningRateMonitor", "--trainer.callbacks.logging_interval=step"]
    section = [f"--weight_decay.mode={mode}", "--weight_decay.weight_decay=0.05"]
    for args in ([*checkpoint, *section, *monitor], [*section, *monitor, *checkpoint]):
        cli = make_cli(args)
        assert_weight_decay(cli.trainer, mode=mode, weight_decay=0.05)
        lrm, mc = user_callbacks(cli.trainer)  # the Trainer puts checkpoint callbacks last
        assert (lrm.logging_interval, mc.monitor, mc.mode) == ("step", "val_acc", "max")


def test_the_section_with_a_class_path(tmp_path: Path) -> None:
    """The section may also be written as a callback of ``trainer.callbacks`` is (``class_path``, ``init_args``),
    which is how LightningCLI saves it."""
    text = "weight_decay:\n  class_path: lightning_wd.WeightDecay\n  init_args:\n    mode: coupled\n"
    cli = make_cli(["--config", write(tmp_path / "config.yaml", text)])
    assert_weight_decay(cli.trainer, mode="coupled")


# --- without the section: no WeightDecay ---------------------------------------------------------------------------
def test_no_section_no_weight_decay(tmp_path: Path) -> None:
    cli = make_cli([])
    assert not [cb for cb in cli.trainer.callbacks if isinstance(cb, WeightDecay) or cb is None]
    cli = make_cli(["--config", write(tmp_path / "config.yaml", f"trainer:{CALLBACKS['checkpoint first']}")])
    assert not [cb for cb in cli.trainer.callbacks if isinstance(cb, WeightDecay) or cb is None]
    assert len(user_callbacks(cli.trainer)) == 3


def test_null_removes_the_section_of_a_config_file(tmp_path: Path) -> None:
    config = write(tmp_path / "config.yaml", "weight_decay:\n  mode: coupled\n")
    cli = make_cli(["--config", config, "--weight_decay=null"])
    assert not [cb for cb in cli.trainer.callbacks if isinstance(cb, WeightDecay) or cb is None]


def test_an_empty_section_gives_the_defaults(tmp_path: Path) -> None:
    cli = make_cli(["--config", write(tmp_path / "config.yaml", "weight_decay: {}\n")])
    assert_weight_decay(cli.trainer)


@pytest.mark.parametrize("section", [None, "coupled"])
def test_fit(tmp_path: Path, section: str | None) -> None:
    """A fit through the CLI's ``fit`` subcommand, with the section and without it (no ``None`` callback)."""
    args = ["fit", *QUIET, "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
            "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}"]
    if section:
        args += [f"--weight_decay.mode={section}", "--weight_decay.weight_decay=0.01"]
    cli = WeightDecayCLI(BoringModel, BoringDataModule, args=args)
    assert cli.trainer.global_step == 2
    assert [repr(cb) for cb in cli.trainer.callbacks if isinstance(cb, WeightDecay)] == (
        [repr(WeightDecay(mode="coupled", weight_decay=0.01))] if section else [])


# --- bad values, help -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["command line", "config file"])
def test_a_bad_mode_names_the_accepted_values(tmp_path: Path, where: str, capsys: pytest.CaptureFixture) -> None:
    if where == "command line":
        args = ["--weight_decay.mode=bogus"]
    else:
        args = ["--config", write(tmp_path / "config.yaml", "weight_decay:\n  mode: bogus\n")]
    with pytest.raises(SystemExit) as exc:
        make_cli(args)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "bogus" in err, err[-2000:]
    if _version(jsonargparse.__version__) >= (4, 43):  # before, "Cannot take a Union of no types"
        assert all(repr(mode) in err for mode in MODES), err[-2000:]


def test_an_unknown_argument_is_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        make_cli(["--weight_decay.mood=coupled"])
    assert "mood" in capsys.readouterr().err


def test_help(capsys: pytest.CaptureFixture) -> None:
    """``--help`` shows the section and how to list its arguments; ``--weight_decay.help`` lists them."""
    with pytest.raises(SystemExit):
        make_cli(["--help"])
    out = capsys.readouterr().out
    assert "--weight_decay.help" in out and "WeightDecay" in out
    parameters = list(inspect.signature(WeightDecay).parameters)
    for args in (["--weight_decay.help"], ["--weight_decay.help", "WeightDecay"]):
        with pytest.raises(SystemExit):
            make_cli(args)
        out = capsys.readouterr().out
        for name in parameters:
            assert f"--weight_decay.{name} " in out, name
        assert "{" + ",".join(MODES) + "}" in out


# --- one WeightDecay -----------------------------------------------------------------------------------------------
def test_a_weight_decay_in_trainer_callbacks_too_is_refused(tmp_path: Path) -> None:
    text = f"trainer:{CALLBACKS['checkpoint first']}    - class_path: lightning_wd.WeightDecay\n"
    config = write(tmp_path / "config.yaml", text)
    with pytest.raises(MisconfigurationException, match=r"configured twice(.|\n)*`weight_decay` section"
                                                        r"(.|\n)*trainer.callbacks") as exc:
        make_cli(["--config", config, "--weight_decay.mode=coupled"])
    assert "WeightDecay(mode='coupled')" in str(exc.value) and "WeightDecay(mode='decoupled')" in str(exc.value)
    with pytest.raises(MisconfigurationException, match="configured twice"):
        make_cli(["--weight_decay.mode=coupled"], trainer_defaults={"callbacks": [WeightDecay()]})
    # without the section, a WeightDecay in `trainer.callbacks` is the Trainer's one WeightDecay, as before
    cli = make_cli(["--config", config])
    assert_weight_decay(cli.trainer)


def test_the_fit_start_refuses_two_weight_decays(tmp_path: Path) -> None:
    """A CLI of one's own that adds the section with ``add_weight_decay_arguments`` (without WeightDecayCLI's check):
    WeightDecay refuses the second one at fit start, with both in the message."""

    class MyCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            add_weight_decay_arguments(parser)

    cli = make_cli(["--trainer.callbacks+=WeightDecay", "--weight_decay.mode=coupled", "--trainer.max_steps=1",
                    f"--trainer.default_root_dir={tmp_path}"], MyCLI)
    with pytest.raises(MisconfigurationException) as exc:
        cli.trainer.fit(cli.model, cli.datamodule)
    assert "WeightDecay(mode='coupled')" in str(exc.value) and "WeightDecay(mode='decoupled')" in str(exc.value)


def test_the_helper_in_a_cli_of_ones_own() -> None:
    """``add_weight_decay_arguments`` under another key, in a plain LightningCLI; and WeightDecayCLI's own key."""

    class MyCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--note", default="")
            add_weight_decay_arguments(parser, "wd")

    cli = make_cli(["--wd.mode=coupled", "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.mode=max"],
                   MyCLI)
    assert_weight_decay(cli.trainer, mode="coupled")
    assert [cb.mode for cb in user_callbacks(cli.trainer)] == ["max"]

    class KeyedCLI(WeightDecayCLI):
        weight_decay_key = "decay"

        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            parser.add_argument("--note", default="")

    cli = make_cli(["--decay.mode=independent", "--note=x"], KeyedCLI)
    assert_weight_decay(cli.trainer, mode="independent")
    assert not [cb for cb in make_cli([], KeyedCLI).trainer.callbacks if isinstance(cb, WeightDecay) or cb is None]


# --- an optional dependency ----------------------------------------------------------------------------------------
def test_lightning_wd_does_not_import_the_cli() -> None:
    tree = ast.parse(Path(lightning_wd.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name and ("cli" in name.split(".") or "jsonargparse" in name)}


def test_without_jsonargparse_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jsonargparse", None)  # `import jsonargparse` raises ImportError
    monkeypatch.delitem(sys.modules, "lightning_wd.cli")
    with pytest.raises(ImportError, match=r'pip install "lightning-wd\[examples\]"'):
        importlib.import_module("lightning_wd.cli")


def test_an_old_jsonargparse_names_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_utilities.core.imports

    class Missing:
        def __init__(self, requirement: str) -> None:
            self.requirement = requirement

        def __bool__(self) -> bool:
            return False

        def __str__(self) -> str:
            return f"Requirement {self.requirement!r} not met"

    monkeypatch.setattr(lightning_utilities.core.imports, "RequirementCache", Missing)
    monkeypatch.delitem(sys.modules, "lightning_wd.cli")
    with pytest.raises(ImportError, match=r"jsonargparse\[signatures\]>=4\.33\.1(.|\n)*lightning-wd\[examples\]"):
        importlib.import_module("lightning_wd.cli")


# --- Hydra: the same toggle, a top-level node instantiated on its own ---------------------------------------------
HYDRA_CONFIG = """\
trainer:
  max_steps: 10
callbacks:
  - _target_: lightning.pytorch.callbacks.ModelCheckpoint
    monitor: val_acc
    mode: max
  - _target_: lightning.pytorch.callbacks.LearningRateMonitor
    logging_interval: step
  - _target_: lightning.pytorch.callbacks.ModelCheckpoint
    monitor: val_loss
    filename: best-loss
weight_decay:
  _target_: lightning_wd.WeightDecay
  mode: decoupled
  exclude_bias_and_norm: true
"""


def hydra_callbacks(cfg) -> list[Callback]:
    """The recipe of the README: the ``callbacks`` list, then the ``weight_decay`` node when there is one."""
    from hydra.utils import instantiate

    callbacks = [instantiate(c) for c in cfg.callbacks]
    if cfg.get("weight_decay") is not None:
        callbacks.append(instantiate(cfg.weight_decay))
    return callbacks


@pytest.mark.parametrize("mode", MODES)
def test_hydra_override(tmp_path: Path, mode: str) -> None:
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir

    write(tmp_path / "train.yaml", HYDRA_CONFIG)
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        cfg = compose(config_name="train", overrides=[f"weight_decay.mode={mode}"])
        removed = compose(config_name="train", overrides=["~weight_decay"])
    trainer = Trainer(accelerator="cpu", callbacks=hydra_callbacks(cfg), logger=False, enable_progress_bar=False,
                      enable_model_summary=False, **cfg.trainer)
    assert_weight_decay(trainer, mode=mode, exclude_bias_and_norm=True)
    assert_callbacks_untouched(trainer, "checkpoint first")
    assert not [cb for cb in hydra_callbacks(removed) if isinstance(cb, WeightDecay)]
