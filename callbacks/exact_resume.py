"""``ExactResume``: a fit resumed from a checkpoint continues exactly as the uninterrupted run would.

Lightning restores weights, optimizer, scheduler and loop counters, but not the global random state that the
training step draws its noise and timesteps from, nor the position in a shuffled epoch. This callback saves the
CPU (and CUDA) torch random state in every checkpoint and puts it back before the resumed run's first batch;
the project's datamodules (``datamodules.base.EpochSampler``) resume the epoch's order where it stopped.
``AttributionTrainer.fit`` adds it to every run.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

KEY = "rng_states"


class ExactResume(Callback):
    """Save the torch random states with each checkpoint; restore them when a resumed fit starts."""

    def __init__(self) -> None:
        self._pending: Optional[dict] = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[KEY] = states

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(KEY)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # the first batch of the resumed run: after the data iterator was created (which draws a seed from the
        # global generator), right where the uninterrupted run drew its next training noise
        states, self._pending = self._pending, None
        if not states:
            return
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
