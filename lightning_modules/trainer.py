"""``AttributionTrainer``: the Lightning Trainer plus the project's CLI subcommands.

LightningCLI looks a subcommand up with ``getattr`` on the trainer class and turns the method's
signature into the subcommand's arguments; ``model`` and ``datamodule`` are passed in by the CLI.
"""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from attribution.masks import write_random_masks

PROJECT_SUBCOMMANDS: dict[str, set[str]] = {
    "masks": {"model", "datamodule"},
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
