"""``FeaturizeRunner``: runs ``cli.py featurize`` inside ``Trainer.predict`` so Lightning launches DDP.

The runner's predict loop has one item per rank; its single ``predict_step`` featurizes, for each
checkpoint in turn, this rank's share of the rows still missing from that checkpoint's store.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader

from attribution.featurize import CheckpointFeaturizer
from attribution.identity import data_identity
from attribution.pretrained import read_pretrained


class FeaturizeRunner(LightningModule):
    """Featurize ``jobs`` = [(checkpoint path, store folder), ...] with ``module`` on ``datamodule``."""

    def __init__(self, module: LightningModule, datamodule: Any, jobs: list[tuple[Path, Path]],
                 featurizer: CheckpointFeaturizer) -> None:
        super().__init__()
        self.module = module
        self.data = datamodule
        self.jobs = jobs
        self.featurizer = featurizer
        self.results: list[dict] = []

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(list(range(self.trainer.world_size)), batch_size=1)

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        with torch.inference_mode(False):
            for ckpt_path, store_dir in self.jobs:
                self.results.append(self._featurize_one(ckpt_path, store_dir))

    def _featurize_one(self, ckpt_path: Path, store_dir: Path) -> dict:
        checkpoint = read_pretrained(ckpt_path) if Path(ckpt_path).is_dir() else torch.load(
            ckpt_path, map_location=self.device, weights_only=False)  # a diffusers pipeline folder, or a file
        self.module.load_state_dict(checkpoint["state_dict"])
        info = checkpoint_info(ckpt_path, checkpoint)
        loader = self.featurizer.rows_loader(self.data)
        store, stats = self.featurizer.run(self.module, loader, data_identity(self.data), store_dir, info,
                                           rank=self.global_rank, world_size=self.trainer.world_size,
                                           barrier=self.trainer.strategy.barrier, device=self.device,
                                           progress=self.trainer.is_global_zero)
        return {"store": str(store.path), **stats}


def checkpoint_info(ckpt_path: Path, checkpoint: dict) -> dict:
    """What a store records about the checkpoint it was made from: the file (or pipeline folder) as an absolute
    path, so that it resolves from any working directory; global step, epoch."""
    return {"file": str(Path(ckpt_path).absolute()), "global_step": int(checkpoint.get("global_step", -1)),
            "epoch": int(checkpoint.get("epoch", -1))}
