"""Rebuild a diffusion LightningModule from a checkpoint file or a diffusers pipeline folder, whatever its class."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from jsonargparse import class_from_function
from lightning.pytorch import LightningModule

from attribution.errors import CheckpointMismatchError, SettingsError
from attribution.pretrained import check_pretrained_folder, is_stable_diffusion_layout, pretrained_unet_class
from lightning_modules.ddpm import DDPMModule, _import
from lightning_modules.ldm import LDMModule

__all__ = ["load_diffusion_module", "pretrained_module", "PretrainedDiffusion"]


def load_diffusion_module(path: str | Path, class_path: Optional[str] = None,
                          map_location: str | torch.device = "cpu") -> LightningModule:
    """The module saved in checkpoint ``path`` (or built around the diffusers pipeline folder ``path``), in eval mode.

    The class comes from ``class_path``, the ``module_class`` our modules record in their checkpoints,
    or the ``_class_path`` that LightningCLI records in the hyperparameters. It is rebuilt with its
    ``from_checkpoint`` classmethod when it has one (our modules: the UNet configuration is stored in the
    checkpoint; it gets the dict loaded here, so the file is read once), else ``load_from_checkpoint``.
    A folder is built with :func:`pretrained_module` (``class_path``: a class with ``from_pretrained``).
    """
    if Path(path).is_dir():
        return pretrained_module(str(path), class_path=class_path).eval()
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    class_path = (class_path or checkpoint.get("module_class")
                  or checkpoint.get("hyper_parameters", {}).get("_class_path"))
    if class_path is None:
        raise SettingsError(f"Cannot tell which LightningModule checkpoint {path} holds (it records no module_class "
                            "and no LightningCLI _class_path): pass the class, e.g. `--model.module_class="
                            "my_package.MyModule` for `cli.py score` (`module_class` of AttributionModule)")
    cls = _import(class_path)
    if hasattr(cls, "from_checkpoint"):
        module = cls.from_checkpoint(checkpoint, map_location=map_location)
    else:
        module = cls.load_from_checkpoint(path, map_location=map_location)
    return module.eval()


def pretrained_module(path: str, vae: Optional[str] = None, text_encoder: Optional[str] = None,
                      text_max_length: Optional[int] = None, guidance_scale: Optional[float] = None,
                      class_path: Optional[str] = None) -> DDPMModule:
    """The module around a diffusers pipeline folder (``save_pretrained``; local, nothing is downloaded).

    ``DDPMModule.from_pretrained`` for a ``UNet2DModel`` folder (``DDPMPipeline``: ``unet/``, ``scheduler/``);
    ``LDMModule.from_pretrained`` for a ``UNet2DConditionModel`` in the Stable Diffusion layout (``vae/``,
    ``text_encoder/``, ``tokenizer/``). The schedule and ``prediction_type`` are the folder scheduler's.

    Args:
        path: the pipeline folder.
        vae, text_encoder, text_max_length, guidance_scale: LDM only (default: the folder's VAE and text encoder,
            the text encoder's positions, 3.0).
        class_path: another module class with a ``from_pretrained(folder, **kwargs)`` classmethod.
    """
    folder = check_pretrained_folder(path)
    ldm_args = {k: v for k, v in (("vae", vae), ("text_encoder", text_encoder), ("text_max_length", text_max_length),
                                  ("guidance_scale", guidance_scale)) if v is not None}
    if class_path is not None:
        return _import(class_path).from_pretrained(folder, **ldm_args)
    conditional = pretrained_unet_class(folder) == "UNet2DConditionModel"
    if conditional and not is_stable_diffusion_layout(folder):
        raise CheckpointMismatchError(f"Expected the UNet2DConditionModel folder {folder} in the Stable Diffusion "
                                      "layout (vae/ and text_encoder/ + tokenizer/ beside unet/ and scheduler/), but "
                                      "it has no vae/ or no text_encoder/")
    if not conditional and ldm_args:
        raise SettingsError(f"Expected no {sorted(ldm_args)} for the unconditional UNet2DModel folder {folder} (they "
                            "are latent diffusion settings), but got them")
    return LDMModule.from_pretrained(folder, **ldm_args) if conditional else DDPMModule.from_pretrained(folder)


# `--model=lightning_modules.PretrainedDiffusion --model.path=<folder>`: the CLI's model built around a folder
PretrainedDiffusion = class_from_function(pretrained_module, DDPMModule, name="PretrainedDiffusion")
