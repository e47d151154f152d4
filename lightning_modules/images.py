"""Image helpers shared by the modules: [-1, 1] tensors to grids and PNG files (torchvision)."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to [0, 1], clamped."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> torch.Tensor:
    """Write a grid of (B,C,H,W) images in [-1, 1] to ``path`` (PNG); returns the grid (C,H',W') in [0, 1]."""
    nrow = nrow or max(1, int(len(images) ** 0.5))
    images = to_unit(images)
    if upscale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    grid = make_grid(images, nrow=nrow, padding=1, pad_value=1.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path))
    return grid
