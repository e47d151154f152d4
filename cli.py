"""Command line: ``python cli.py {fit,validate,test,predict,masks,...} --config configs/<task>.yaml``.

LightningCLI builds the model, the datamodule and the trainer from YAML (``class_path``/``init_args``)
and the command line (``--data.subset_mask=masks/mask_000.npy``). The project's own subcommands are
methods of ``AttributionTrainer`` (``commands/trainer.py``); their signatures are their arguments.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from attribution.masks import SubsetMaskError  # noqa: E402
from attribution.identity import CheckpointMismatchError  # noqa: E402
from commands.trainer import PROJECT_SUBCOMMANDS, AttributionTrainer  # noqa: E402

USER_ERRORS = (SubsetMaskError, CheckpointMismatchError, FileNotFoundError)


class AttributionCLI(LightningCLI):
    """LightningCLI with the project's subcommands (see ``AttributionTrainer``)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), **PROJECT_SUBCOMMANDS}


def main(args: Optional[list[str]] = None, run: bool = True) -> AttributionCLI:
    return AttributionCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        trainer_class=AttributionTrainer, save_config_kwargs={"overwrite": True}, args=args, run=run,
    )


def user_error(err: BaseException) -> Optional[BaseException]:
    """The user-input error behind ``err`` (jsonargparse wraps errors raised while instantiating), or None."""
    while err is not None:
        if isinstance(err, USER_ERRORS):
            return err
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # a mistake in the user's input: say what, without a traceback
        cause = user_error(exc)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
