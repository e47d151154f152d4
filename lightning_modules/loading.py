"""Rebuild a diffusion LightningModule from a checkpoint file, whatever its class."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import LightningModule

from lightning_modules.ddpm import _import


def load_diffusion_module(path: str | Path, class_path: Optional[str] = None,
                          map_location: str | torch.device = "cpu") -> LightningModule:
    """The module saved in checkpoint ``path``, in eval mode.

    The class comes from ``class_path``, the ``module_class`` our modules record in their checkpoints,
    or the ``_class_path`` that LightningCLI records in the hyperparameters. It is rebuilt with its
    ``from_checkpoint`` classmethod when it has one (our modules: the UNet configuration is stored in the
    checkpoint; it gets the dict loaded here, so the file is read once), else ``load_from_checkpoint``.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    class_path = (class_path or checkpoint.get("module_class")
                  or checkpoint.get("hyper_parameters", {}).get("_class_path"))
    if class_path is None:
        raise ValueError(f"Cannot tell which LightningModule checkpoint {path} holds: pass `class_path` "
                         f"(e.g. 'lightning_modules.DDPMModule')")
    cls = _import(class_path)
    if hasattr(cls, "from_checkpoint"):
        module = cls.from_checkpoint(checkpoint, map_location=map_location)
    else:
        module = cls.load_from_checkpoint(path, map_location=map_location)
    return module.eval()
