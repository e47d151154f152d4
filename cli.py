"""Command line: ``python cli.py {fit,validate,test,predict,masks,...} --config configs/<task>.yaml``.

LightningCLI builds the model, the datamodule and the trainer from YAML (``class_path``/``init_args``)
and the command line (``--data.subset_mask=masks/mask_000.npy``). The project's own subcommands are
methods of ``AttributionTrainer`` (``commands/trainer.py``); their signatures are their arguments.

Errors: a bad input (any :class:`attribution.errors.AttributionInputError`, a missing file, a bad
argument, a ``ValueError`` a constructor raises while the config is instantiated) is reported as ONE
line ``error: ...`` on stderr with exit code 2; anything else is a bug and keeps its traceback. ``--debug`` (first argument) or ``JOURNEY_DEBUG=1`` shows the traceback of input
errors too.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from jsonargparse import ArgumentError  # noqa: E402
from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from attribution.errors import AttributionInputError, CorruptFileError, SettingsError  # noqa: E402
from commands.trainer import PROJECT_SUBCOMMANDS, AttributionTrainer  # noqa: E402

USER_ERRORS = (AttributionInputError, FileNotFoundError, ArgumentError)
EXIT_INPUT_ERROR = 2


class AttributionCLI(LightningCLI):
    """LightningCLI with the project's subcommands (see ``AttributionTrainer``)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), **PROJECT_SUBCOMMANDS}

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads the hyperparameters of ``ckpt_path`` here: an unreadable file is a bad input."""
        try:
            super()._parse_ckpt_path()
        except Exception as err:  # noqa: BLE001 - torch.load of a file that is not a checkpoint
            if user_error(err) is not None:
                raise
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise CorruptFileError(f"Expected `ckpt_path` {path} to be a readable checkpoint, but loading it failed "
                                   f"({type(err).__name__}: {one_line(err)[:200]})") from err

    def instantiate_classes(self) -> None:
        """Build the classes of the config; a ``ValueError`` a constructor raises is a refused setting."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            if user_error(err) is not None:
                raise
            raise SettingsError(f"{one_line(innermost(err))} (refused while building the configured classes)") from err


def main(args: Optional[list[str]] = None, run: bool = True) -> AttributionCLI:
    return AttributionCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        trainer_class=AttributionTrainer, save_config_kwargs={"overwrite": True}, args=args, run=run,
        parser_kwargs={"exit_on_error": False},  # argument errors raise, and `run` reports them in one line
    )


def user_error(err: BaseException) -> Optional[BaseException]:
    """The user-input error behind ``err`` (jsonargparse wraps errors raised while instantiating), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def innermost(err: BaseException) -> BaseException:
    """The first error of the chain (what a constructor raised, before jsonargparse wrapped it)."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return err


def one_line(err: BaseException) -> str:
    """The error's message on one line (jsonargparse messages span several)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def run(argv: Optional[list[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    0 on success; 2 for a bad input, reported as one line ``error: ...`` on stderr (a traceback only
    with ``--debug`` as the first argument or ``JOURNEY_DEBUG=1``, and then the error propagates).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("JOURNEY_DEBUG", "") not in ("", "0")
    if argv[:1] == ["--debug"]:
        argv, debug = argv[1:], True
    try:
        main(argv)
    except Exception as exc:  # a mistake in the user's input: say what, without a traceback
        cause = user_error(exc)
        if cause is None or debug:
            raise
        print(f"error: {one_line(cause)}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(run())
