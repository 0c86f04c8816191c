"""``WeightDecay`` in a ``LightningCLI`` config: a top-level ``weight_decay`` section, beside ``trainer`` and ``model``.

The section holds the arguments of one :class:`~lightning_wd.WeightDecay` callback, which the CLI adds to the
Trainer's callbacks. Unlike an entry of ``trainer.callbacks``, it is reached by its own key whatever that list holds:
``--weight_decay.mode=coupled`` on the command line, or in a config file::

    weight_decay:
      mode: coupled
      exclude_bias_and_norm: true

(``--trainer.callbacks.mode=coupled`` sets the ``mode`` of the *last* callback of that list, jsonargparse's rule for
lists: it fails when that callback has no ``mode``, and reaches ``ModelCheckpoint`` when that one comes last.)

The section is optional: without it, no WeightDecay is added; an empty one (``weight_decay: {}``) adds
``WeightDecay()`` with its defaults; ``--weight_decay=null`` removes one that a config file gave.

This module needs ``jsonargparse[signatures]``, as ``LightningCLI`` does (``pip install "lightning-wd[examples]"``),
so ``import lightning_wd`` does not import it.
"""

from __future__ import annotations

from typing import Any

from lightning_utilities.core.imports import RequirementCache

# 4.29: an init argument given without a `class_path` (`--weight_decay.mode=coupled`, a section without
# `class_path:`) takes the section's own class; 4.33.1: an absent section, or `--weight_decay=null`, parses as None
# (before, an AttributeError). From 4.43, a bad value's error message lists the accepted ones.
_REQUIREMENT = "jsonargparse[signatures]>=4.33.1"
_INSTALL = f'pip install "lightning-wd[examples]" (or: pip install "{_REQUIREMENT}")'

try:
    import jsonargparse  # noqa: F401
except ImportError as err:
    raise ImportError(
        f"lightning_wd.cli needs jsonargparse, which LightningCLI parses its configs with; install it with: {_INSTALL}"
    ) from err
if not RequirementCache(_REQUIREMENT):
    raise ImportError(
        f"lightning_wd.cli needs {_REQUIREMENT}, extra included ({RequirementCache(_REQUIREMENT)})."
        f' Upgrade it with: pip install -U "{_REQUIREMENT}" (the extra of lightning-wd: "lightning-wd[examples]")'
    )

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

from lightning_wd.weight_decay import WeightDecay  # noqa: E402

__all__ = ["WeightDecayCLI", "add_weight_decay_arguments"]


def add_weight_decay_arguments(parser: LightningArgumentParser, key: str = "weight_decay") -> None:
    """Add an optional section ``key`` to a ``LightningCLI`` parser: the arguments of one ``WeightDecay`` callback.

    The section is Lightning's own callback section (``parser.add_lightning_class_args(WeightDecay, key,
    subclass_mode=True, required=False)``): when a config file or the command line gives it, the CLI instantiates
    the callback and appends it to the Trainer's callbacks. Its arguments need no ``class_path``
    (``--weight_decay.mode=coupled``, or a section holding ``mode: coupled``); ``--weight_decay.help WeightDecay``
    lists them; ``--weight_decay=null`` removes a section that a config file gave.

    When the section is absent, its value is ``None``, and ``LightningCLI`` (Lightning 2.6) appends that ``None`` to
    the Trainer's callbacks too, where the fit fails on it. :class:`WeightDecayCLI` drops it: derive your CLI from
    ``WeightDecayCLI`` (it calls this function in ``add_arguments_to_parser``, and combines with another
    ``LightningCLI`` subclass: ``class MyCLI(WeightDecayCLI, OtherCLI)``). Call this function yourself to add the
    section to a parser of your own, in which every run gives the section or whose CLI drops the ``None``.

    Args:
        parser: the parser that ``LightningCLI`` passes to ``add_arguments_to_parser`` (one per subcommand).
        key: the section's name in the config, and the prefix of its command-line options.

    Example::

        >>> from lightning.pytorch.cli import LightningArgumentParser
        >>> from lightning_wd.cli import add_weight_decay_arguments
        >>> parser = LightningArgumentParser()
        >>> add_weight_decay_arguments(parser)
        >>> config = parser.parse_args(["--weight_decay.mode=coupled"])
        >>> parser.instantiate_classes(config).weight_decay
        WeightDecay(mode='coupled')
        >>> print(parser.parse_args([]).weight_decay)
        None
    """
    parser.add_lightning_class_args(WeightDecay, key, subclass_mode=True, required=False)


class WeightDecayCLI(LightningCLI):
    """A ``LightningCLI`` with an optional ``weight_decay`` section: a ``WeightDecay`` callback for the Trainer.

    It takes ``LightningCLI``'s arguments. Its parsers get the section of :func:`add_weight_decay_arguments`: a
    config file's

    .. code-block:: yaml

        weight_decay:
          mode: coupled            # or: decoupled (the default), independent, corrected
          exclude_bias_and_norm: true

    or ``--weight_decay.mode=coupled`` on the command line configures one ``WeightDecay``, which is added to the
    Trainer's callbacks after those of ``trainer.callbacks``; the option reaches it whatever that list holds. Without
    the section (or with ``--weight_decay=null``) the CLI adds no WeightDecay. A WeightDecay given both in the section
    and in ``trainer.callbacks`` (or ``trainer_defaults``) is refused when the Trainer is built, with a message that
    says where each one came from.

    To combine it with a ``LightningCLI`` subclass of your own, derive from it (``class MyCLI(WeightDecayCLI)``, or
    ``class MyCLI(WeightDecayCLI, OtherCLI)``), and call ``super()`` in the ``add_arguments_to_parser`` and
    ``instantiate_trainer`` you override. ``weight_decay_key`` names the section.

    Raises:
        MisconfigurationException: when the Trainer is built, for a WeightDecay in the section and another one among
            the Trainer's other callbacks.

    Example::

        >>> from lightning.pytorch.callbacks import ModelCheckpoint
        >>> from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
        >>> from lightning_wd import WeightDecay
        >>> from lightning_wd.cli import WeightDecayCLI
        >>> cli = WeightDecayCLI(BoringModel, BoringDataModule, run=False, args=[
        ...     "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.mode=max", "--weight_decay.mode=coupled"])
        >>> [cb for cb in cli.trainer.callbacks if isinstance(cb, WeightDecay)]
        [WeightDecay(mode='coupled')]
        >>> [cb.mode for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
        ['max']

        As a script (``train.py``), run as ``python train.py fit --config config.yaml --weight_decay.mode=coupled``::

            from lightning_wd.cli import WeightDecayCLI

            if __name__ == "__main__":
                WeightDecayCLI(MyModel, MyDataModule)
    """

    #: the name of the section in the config, and the prefix of its command-line options
    weight_decay_key: str = "weight_decay"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the ``weight_decay`` section (see :func:`add_weight_decay_arguments`) to each parser; a subclass that
        overrides this method calls ``super().add_arguments_to_parser(parser)``."""
        super().add_arguments_to_parser(parser)
        add_weight_decay_arguments(parser, self.weight_decay_key)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # an absent optional callback section is None, which LightningCLI would append to the Trainer's callbacks
        # (Lightning-AI/pytorch-lightning#21527)
        return super()._instantiate_trainer(config, [cb for cb in callbacks if cb is not None])

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Build the Trainer as ``LightningCLI`` does, with the section's WeightDecay; refuse a second WeightDecay."""
        trainer = super().instantiate_trainer(**kwargs)
        section = self._get(self.config_init, self.weight_decay_key)
        others = [cb for cb in trainer.callbacks if isinstance(cb, WeightDecay) and cb is not section]
        if section is not None and others:
            key = self.weight_decay_key
            raise MisconfigurationException(
                f"WeightDecay is configured twice: in the `{key}` section ({section!r}) and among the Trainer's other"
                f" callbacks, from `trainer.callbacks` or the CLI's `trainer_defaults`"
                f" ({', '.join(map(repr, others))})."
                " Each optimizer step takes one decay: keep the section (its options, e.g."
                f" `--{key}.mode=coupled`, reach it whatever `trainer.callbacks` holds) and remove"
                f" lightning_wd.WeightDecay from `trainer.callbacks`, or remove the section (`--{key}=null`)."
            )
        return trainer
