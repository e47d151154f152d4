"""In-memory uint8 image arrays: the common representation behind every datamodule.

Images are held once as a uint8 tensor ``(N, C, H, W)`` (already resized/padded) and converted to
float ``[-1, 1]`` on access, so ``__getitem__`` is a slice, a cast and an optional flip.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from attribution.images import square_resize

__all__ = ["ArrayImageDataset", "check_uint8_images", "to_float", "resize_and_pad"]


def check_uint8_images(images: np.ndarray, name: str) -> np.ndarray:
    """Validate ``(N, H, W)`` or ``(N, H, W, C)`` uint8 images; returns ``(N, H, W, C)``."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"{name}: expected uint8 images (values 0..255), but got dtype {images.dtype}; "
            "convert first, e.g. `(x * 255).round().clip(0, 255).astype(np.uint8)` for floats in [0, 1]"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(
            f"{name}: expected images of shape (N, H, W) or (N, H, W, C) with C in (1, 3) and "
            f"N >= 1, but got shape {tuple(np.asarray(images).shape)}"
        )
    return images


def resize_and_pad(images_nhwc: np.ndarray, image_size: Optional[int], pad: int) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` -> uint8 ``(N, C, H', W')``: ``attribution.images.square_resize`` to
    ``image_size`` (center crop, antialiased bicubic) when the images are not that size already, then
    ``pad`` zero pixels each side."""
    images = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).contiguous()
    if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
        images = square_resize(images, image_size)
    if pad:
        images = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=0)
    return images.contiguous()


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in ``[-1, 1]`` (0 -> -1, 255 -> 1)."""
    return images_uint8.to(torch.float32).div_(127.5).sub_(1.0)


class ArrayImageDataset(Dataset):
    """A view of in-memory images restricted to some global indices.

    Args:
        images: uint8 ``(N, C, H, W)`` tensor of the full dataset.
        labels: int64 ``(N,)`` tensor, or ``None`` (labels are then -1).
        indices: global indices this dataset exposes, in order; ``None`` means all ``N``.
        augment: random horizontal flip (global torch RNG, seeded by the worker/Lightning seed).
        captions: one caption per global index (``N`` strings), or ``None``.

    Each item is ``{"image": float (C, H, W) in [-1, 1], "index": int, "label": int}``, plus
    ``"caption": str`` when ``captions`` are given.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        indices: Optional[np.ndarray] = None,
        augment: bool = False,
        captions: Optional[list[str]] = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"Expected `images` to be a uint8 (N, C, H, W) tensor, but got {images.dtype} "
                f"of shape {tuple(images.shape)}"
            )
        self.images = images
        self.labels = labels
        num = images.shape[0]
        if indices is None:
            indices = np.arange(num, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= num):
            raise IndexError(
                f"Expected indices in [0, {num}), but got min {self.indices.min()} max {self.indices.max()}"
            )
        self.augment = augment
        if captions is not None and len(captions) != num:
            raise ValueError(f"Expected one caption per image ({num}), but got {len(captions)}")
        self.captions = captions

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = int(self.indices[position])
        image = to_float(self.images[index])
        if self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        label = -1 if self.labels is None else int(self.labels[index])
        item = {"image": image, "index": index, "label": label}
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item
