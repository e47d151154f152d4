"""The small protocol a LightningModule implements to be featurized and scored.

Three methods, all cheap. Our ``DDPMModule`` and ``LDMModule`` implement them; a foreign
LightningModule plugs in by adding them (see the README "Plugging the callback into your own Lightning
project" and ``tests/callbacks/test_featurize.py``)::

    def attribution_task(self) -> attribution.DiffusionTask:
        return DiffusionTask.from_scheduler(self.scheduler)    # how to call the denoiser
    def attribution_denoiser(self, ema: bool = True) -> torch.nn.Module:
        return self.unet                                       # the network whose gradients are taken
    def attribution_inputs(self, batch) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        return batch["image"], batch["index"], None            # x0 (B,...), global index (B,), cond

``attribution_inputs`` turns one batch of the featurize loader into (clean sample x0 in the space the
denoiser works in, e.g. VAE latents for an LDM; the global training index; the conditioning or None).
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

import torch

from attribution import DiffusionTask

METHODS = ("attribution_task", "attribution_denoiser", "attribution_inputs")


@runtime_checkable
class AttributableDiffusion(Protocol):
    def attribution_task(self) -> DiffusionTask: ...

    def attribution_denoiser(self, ema: bool = True) -> torch.nn.Module: ...

    def attribution_inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]: ...


def check_protocol(module: Any) -> AttributableDiffusion:
    """Return ``module`` if it implements the protocol, else raise a TypeError naming what is missing."""
    missing = [name for name in METHODS if not callable(getattr(module, name, None))]
    if missing:
        raise TypeError(
            f"Expected the LightningModule to implement the attribution protocol ({', '.join(METHODS)}), but "
            f"{type(module).__name__} lacks {', '.join(missing)}. See attribution/protocol.py for the three methods.")
    return module
