"""Diffusers pipeline folders (``save_pretrained``) accepted wherever a checkpoint file is.

A folder written by ``DDPMPipeline.save_pretrained`` holds ``unet/`` (``config.json`` + weights) and
``scheduler/`` (``scheduler_config.json``); a Stable Diffusion snapshot adds ``vae/``, ``text_encoder/`` and
``tokenizer/``. Nothing is downloaded: folders are read from local disk only.

:func:`read_pretrained` reads such a folder as a *checkpoint*: a dict whose ``state_dict`` holds the UNet's
weights as a module that keeps its UNet under ``unet`` (``DDPMModule``, ``LDMModule``) would save them, and
whose ``"pretrained"`` entry names the folder. So the checks made on checkpoint files apply unchanged (finite
weights, weights fitting the model). The folder records no data identity: the datamodule given with it names
the data (stores record that identity beside the folder's weights hash), and :func:`check_pretrained_task`
refuses a model whose noise schedule or prediction type differ from the folder's scheduler.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import CheckpointMismatchError, CorruptFileError

__all__ = ["PRETRAINED_KEY", "is_pretrained_folder", "check_pretrained_folder", "pretrained_unet_class",
           "load_pretrained_unet",
           "load_pretrained_scheduler", "read_pretrained", "check_pretrained_task", "is_stable_diffusion_layout"]

PRETRAINED_KEY = "pretrained"
_REQUIRED = ("unet/config.json", "scheduler/scheduler_config.json")


def is_pretrained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with a diffusers ``unet/`` sub-folder (a pipeline's ``save_pretrained``)."""
    path = Path(path)
    return path.is_dir() and (path / "unet" / "config.json").is_file()


def is_stable_diffusion_layout(path: str | Path) -> bool:
    """Whether the pipeline folder also holds ``vae/`` and ``text_encoder/`` (the latent, text-conditional layout)."""
    path = Path(path)
    return (path / "vae" / "config.json").is_file() and (path / "text_encoder" / "config.json").is_file()


def check_pretrained_folder(path: str | Path, argument: str = "checkpoint") -> Path:
    """Return ``path`` if it holds ``unet/config.json`` and ``scheduler/scheduler_config.json``, else refuse it."""
    path = Path(path)
    missing = [rel for rel in _REQUIRED if not (path / rel).is_file()]
    if missing:
        raise CorruptFileError(f"Expected `{argument}` {path} to be a diffusers pipeline folder (written by "
                               f"save_pretrained, with unet/ and scheduler/), but it lacks {', '.join(missing)}")
    return path


def _diffusers_class(folder: Path, sub: str, config_name: str):
    import diffusers

    file = folder / sub / config_name
    try:
        name = json.loads(file.read_text()).get("_class_name")
    except (ValueError, OSError) as err:
        raise CorruptFileError(f"Expected {file} to be a diffusers JSON configuration, but it is unreadable "
                               f"({err})") from None
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise CorruptFileError(f"Expected {file} to name a diffusers class in `_class_name`, but got {name!r}")
    return cls


def pretrained_unet_class(folder: str | Path) -> str:
    """The diffusers class name of the folder's UNet (``UNet2DModel``, ``UNet2DConditionModel``), from its config."""
    return _diffusers_class(check_pretrained_folder(folder), "unet", "config.json").__name__


def load_pretrained_unet(folder: str | Path) -> torch.nn.Module:
    """The folder's UNet (``UNet2DModel`` or ``UNet2DConditionModel``, the class its config names), eval mode."""
    folder = check_pretrained_folder(folder)
    cls = _diffusers_class(folder, "unet", "config.json")
    try:
        return cls.from_pretrained(folder, subfolder="unet", local_files_only=True).eval()
    except (OSError, ValueError, RuntimeError) as err:
        raise CorruptFileError(f"Expected the weights of {folder / 'unet'} to load into {cls.__name__}, but loading "
                               f"failed ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None


def load_pretrained_scheduler(folder: str | Path):
    """The folder's scheduler (the class and configuration in ``scheduler/scheduler_config.json``)."""
    folder = check_pretrained_folder(folder)
    cls = _diffusers_class(folder, "scheduler", "scheduler_config.json")
    return cls.from_pretrained(folder, subfolder="scheduler", local_files_only=True)


def read_pretrained(folder: str | Path, argument: str = "checkpoint") -> dict[str, Any]:
    """The folder as a checkpoint: ``{"state_dict": {"unet.<name>": tensor}, "pretrained": {...}}``.

    ``"pretrained"`` records the folder (absolute), the UNet's class and whether it has the Stable Diffusion
    layout. There is no ``"attribution"`` (data identity) entry: the folder names no training data.
    """
    folder = check_pretrained_folder(folder, argument)
    unet = load_pretrained_unet(folder)
    return {"state_dict": {f"unet.{k}": v for k, v in unet.state_dict().items()},
            PRETRAINED_KEY: {"folder": str(folder.absolute()), "unet_class": type(unet).__name__,
                             "stable_diffusion": is_stable_diffusion_layout(folder)}}


def check_pretrained_task(checkpoint: dict, task: Any, source: str = "checkpoint") -> None:
    """Refuse a model whose task (noise schedule, prediction type) is not the pretrained folder's scheduler's.

    ``task`` is the model's :class:`~attribution.task.DiffusionTask`; nothing is checked for a checkpoint
    file (only folders carry their scheduler).
    """
    info: Optional[dict] = checkpoint.get(PRETRAINED_KEY)
    if not info:
        return
    from .task import DiffusionTask

    expected = DiffusionTask.from_scheduler(load_pretrained_scheduler(info["folder"]))
    if expected.prediction_type != task.prediction_type:
        raise CheckpointMismatchError(
            f"Expected the model's prediction_type to be the one of {source}'s scheduler "
            f"({expected.prediction_type!r}), but the model has {task.prediction_type!r}")
    if expected.num_train_timesteps != task.num_train_timesteps or not torch.allclose(
            expected.alphas_cumprod, task.alphas_cumprod, rtol=1e-6, atol=0):
        raise CheckpointMismatchError(
            f"Expected the model's noise schedule to be the one of {source}'s scheduler (T = "
            f"{expected.num_train_timesteps}), but the model has T = {task.num_train_timesteps} or other "
            "betas; build the model from the folder (lightning_modules.PretrainedDiffusion)")
