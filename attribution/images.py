"""Image helpers: [-1, 1] tensors to grids and PNG files, and the one square resizer of the data paths (torchvision)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from attribution.atomic import atomic_write


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
    atomic_write(path, lambda f: save_image(grid, f, format="png"))
    return grid


def square_resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 ``(..., C, H, W)`` -> ``(..., C, image_size, image_size)``: center crop to a square, then an
    antialiased bicubic resize. The one resizer of every data path (arrays, image folders, shards)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    side = min(images.shape[-2:])
    images = TF.center_crop(images, [side, side])
    if side != image_size:
        images = TF.resize(images, [image_size, image_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return images


def square_resize_hwc(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """:func:`square_resize` of one uint8 picture ``(H, W)`` or ``(H, W, C)``, returned in the same layout."""
    array = np.asarray(pixels, dtype=np.uint8)
    chw = torch.from_numpy(np.array(array if array.ndim == 3 else array[..., None], copy=True)).permute(2, 0, 1)
    out = square_resize(chw, image_size).permute(1, 2, 0).contiguous().numpy()
    return out if array.ndim == 3 else out[..., 0]
