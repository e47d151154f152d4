"""``ScoreWriter``: saves the AttributionModule's predictions, then per target the scores and pictures.

Each (target, step) pair is written atomically to ``<out_dir>/pairs/`` as soon as its batch ends (so
a killed run resumes with the pairs still missing, and DDP ranks never write the same file). When
the predict loop ends, rank 0 assembles per target ``<out_dir>/target_XXXX.pt`` holding the scores
(N x steps, float32), the timesteps and the top-k positive and negative influencers per step, draws
the Figure-1-like picture (PNG + TensorBoard) and writes the index page.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from attribution.atomic import atomic_torch_save
from callbacks.report import influencer_figure, write_index


def pair_file(out_dir: Path, target_id: int, t: int) -> Path:
    """The file of one scored (target, timestep) pair: ``<out_dir>/pairs/target_XXXX_tYYYY.pt``."""
    return Path(out_dir) / "pairs" / f"target_{int(target_id):04d}_t{int(t):04d}.pt"


class ScoreWriter(BasePredictionWriter):
    """Write AttributionModule predictions (added by ``AttributionModule.configure_callbacks``)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: dict,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        for j, (target, t) in enumerate(zip(prediction["target"].tolist(), prediction["t"].tolist())):
            atomic_torch_save(prediction["scores"][:, j].clone(), pair_file(pl_module.out_dir, target, t))

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.assemble(trainer, pl_module)
        trainer.strategy.barrier()

    def assemble(self, trainer: Trainer, pl_module: LightningModule) -> list[Path]:
        """Per-target score files, pictures and the index page, from the per-pair files."""
        datamodule = pl_module.data
        entries = []
        for traj in pl_module.trajectories:
            result = self._target_result(pl_module, traj)
            if result is None:
                continue
            atomic_torch_save(result, pl_module.out_dir / f"target_{traj.target_id:04d}.pt")
            picture = None
            if datamodule is not None and hasattr(datamodule, "images"):
                picture = influencer_figure(traj, result, datamodule.images,
                                            pl_module.out_dir / f"target_{traj.target_id:04d}.png",
                                            k=min(4, pl_module.hparams.topk), logger=trainer.logger)
            entries.append({"trajectory": traj, "result": result, "picture": picture})
        index = write_index(entries, pl_module.out_dir)
        rank_zero_info(f"scores of {len(entries)} targets in {pl_module.out_dir}; open {index}")
        return [e["picture"] for e in entries]

    @staticmethod
    def _target_result(pl_module: LightningModule, traj) -> Optional[dict]:
        steps = [t for _, t in pl_module.selected_steps(traj)]
        files = [pair_file(pl_module.out_dir, traj.target_id, t) for t in steps]
        if not steps or not all(f.exists() for f in files):
            return None
        scores = torch.stack([torch.load(f, weights_only=False) for f in files], dim=1)  # (N, S)
        k = min(pl_module.hparams.topk, scores.shape[0])
        pos_v, pos_i = scores.topk(k, dim=0)
        neg_v, neg_i = scores.topk(k, dim=0, largest=False)
        return {"target_id": traj.target_id, "timesteps": torch.tensor(steps), "scores": scores,
                "positive_indices": pos_i, "positive_values": pos_v,
                "negative_indices": neg_i, "negative_values": neg_v,
                "settings": dict(pl_module.hparams)}
