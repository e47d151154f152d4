"""``AttributionTrainer``: the Lightning Trainer plus the project's CLI subcommands.

LightningCLI looks a subcommand up with ``getattr`` on the trainer class and turns the method's
signature into the subcommand's arguments; ``model`` and ``datamodule`` are passed in by the CLI.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from attribution.masks import write_random_masks
from callbacks.featurizer import CheckpointFeaturizer, FeaturizeSettings
from callbacks.protocol import check_protocol
from callbacks.trak_featurize import TrakFeaturizeCallback
from lightning_modules.checkpoint_meta import CheckpointMismatchError, check_identity
from lightning_modules.featurize_runner import FeaturizeRunner

PROJECT_SUBCOMMANDS: dict[str, set[str]] = {
    "masks": {"model", "datamodule"},
    "featurize": {"model", "datamodule"},
}


class AttributionTrainer(Trainer):
    """A ``Trainer`` whose extra methods are the subcommands of ``cli.py``."""

    def masks(self, model: LightningModule, datamodule: LightningDataModule, out_dir: str = "masks",
              num_masks: int = 32, seed: int = 0, fraction: float = 0.5) -> list[Path]:
        """Write seeded random subset masks for the configured data (each example in with probability `fraction`).

        Args:
            out_dir: folder for mask_000.npy ... and masks.json.
            num_masks: how many masks (J).
            seed: seed of the masks; mask j depends only on (seed, j).
            fraction: probability that an example is in a mask.
        """
        paths = write_random_masks(out_dir, datamodule.num_examples, num_masks, seed=seed, p=fraction)
        rank_zero_info(f"wrote {len(paths)} masks over N={datamodule.num_examples} examples to {out_dir}")
        return paths

    def featurize(self, model: LightningModule, datamodule: LightningDataModule, checkpoints: str,
                  out_dir: Optional[str] = None, settings: Optional[FeaturizeSettings] = None) -> list[Path]:
        """Featurize saved checkpoints (one file or a folder of *.ckpt) over the whole training set, and finalize.

        Args:
            checkpoints: a checkpoint file, or a folder whose *.ckpt files are each featurized.
            out_dir: where stores go (default: features/ beside each checkpoints folder); one store per checkpoint.
            settings: featurize settings; default: those of the TrakFeaturizeCallback in the config, if any.
        """
        check_protocol(model)
        checkpoints = find_checkpoints(checkpoints)
        for path in checkpoints:  # every check before any work
            check_checkpoint(path, model, datamodule)
        settings = settings or self._callback_settings() or FeaturizeSettings()
        jobs = [(path, Path(out_dir) / path.stem if out_dir else path.parent.parent / "features" / path.stem)
                for path in checkpoints]
        runner = FeaturizeRunner(model, datamodule, jobs, CheckpointFeaturizer(settings))
        self.predict(runner, return_predictions=False)
        for result in runner.results:
            rank_zero_info(f"featurized {result['rows']} rows into {result['store']} in {result['seconds']:.1f} s")
        return [store for _, store in jobs]

    def _callback_settings(self) -> Optional[FeaturizeSettings]:
        for callback in self.callbacks:
            if isinstance(callback, TrakFeaturizeCallback):
                return callback.settings
        return None


def find_checkpoints(checkpoints: str) -> list[Path]:
    """A checkpoint file, or the sorted *.ckpt files of a folder (recursively); error when there are none."""
    path = Path(checkpoints)
    if path.is_file():
        return [path]
    found = sorted(p for p in path.rglob("*.ckpt") if not p.stem.startswith("last")) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"Expected `checkpoints` to be a checkpoint file or a folder holding *.ckpt files, "
                                f"but {str(path)!r} {'holds none' if path.is_dir() else 'does not exist'}")
    return found


def check_checkpoint(path: Path, model: LightningModule, datamodule: LightningDataModule) -> None:
    """Refuse a checkpoint made with other data (N, fingerprint) or for another model configuration."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    check_identity(checkpoint, datamodule, source=f"checkpoint {path}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
    if expected != given:
        missing = sorted(set(expected) - set(given))[:3]
        unexpected = sorted(set(given) - set(expected))[:3]
        shapes = [f"{k}: {given[k]} vs {expected[k]}" for k in sorted(set(expected) & set(given))
                  if given[k] != expected[k]][:3]
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match the model configuration: expected its state_dict to have the "
            f"model's parameters, but missing {missing}, unexpected {unexpected}, shape differences {shapes}")
