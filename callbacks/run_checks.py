"""``RunChecks``: a training run fails (never only stops) when its loss is not finite, and stamps its checkpoints.

``AttributionTrainer`` (the trainer of ``cli.py``) adds it to every run. Lightning's
``EarlyStopping(check_finite=True)`` ends a diverged run quietly with exit code 0 and checkpoints of NaN
weights; here the first non-finite loss raises :class:`attribution.errors.NonFiniteError` before its
backward pass, so no optimizer step and no checkpoint ever uses it. Every checkpoint saved gets the
checksum of its weights (:func:`attribution.integrity.stamp_checkpoint`), which featurize, sample and
score check before any work, so a bit-flipped checkpoint is refused.
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from attribution.errors import NonFiniteError
from attribution.integrity import stamp_checkpoint


class RunChecks(Callback):
    """Refuse a non-finite training loss; stamp each checkpoint with the checksum of its weights."""

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        check_finite_loss(loss, trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        stamp_checkpoint(checkpoint)


def check_finite_loss(loss: torch.Tensor, trainer: Trainer) -> None:
    """Raise :class:`NonFiniteError` when ``loss`` holds NaN or inf, naming the step (on every rank at once)."""
    bad = not bool(torch.isfinite(loss.detach()).all())
    if trainer.world_size > 1:  # one rank's bad loss stops every rank, so none waits in a collective
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
    if not bad:
        return
    raise NonFiniteError(f"Expected a finite training loss, but got {loss.detach().float().flatten()[:4].tolist()} at "
                         f"global step {trainer.global_step} (epoch {trainer.current_epoch}): the training diverged; "
                         "lower `model.lr` (or check the data) and train again")
