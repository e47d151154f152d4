"""Patch attribution: a binary pixel mask restricts the step output f_t to a region of the image.

``patch`` is a rectangle ``"y0:y1,x0:x1"`` (pixels, half-open, like Python slices) applied to every
target, or a ``.npy``/``.pt`` file holding one mask ``(H, W)`` for every target or one per target
``(num_targets, H, W)`` in the order of the targets. For a latent model the mask is resized (nearest)
to the latent grid of the recorded ``x_t``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

Masks = Union[None, torch.Tensor, dict]


def parse_rectangle(text: str, height: int, width: int) -> torch.Tensor:
    """``"y0:y1,x0:x1"`` -> a float mask (1, H, W) with ones inside the rectangle."""
    try:
        (y0, y1), (x0, x1) = [tuple(int(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"Expected `patch` as 'y0:y1,x0:x1' or a mask file, but got {text!r}") from None
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise ValueError(f"Expected `patch` rectangle inside the {height}x{width} image with y0 < y1 and x0 < x1, "
                         f"but got {text!r}")
    mask = torch.zeros(1, height, width)
    mask[:, y0:y1, x0:x1] = 1.0
    return mask


def _resize(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    return F.interpolate(mask.unsqueeze(0), size=(height, width), mode="nearest")[0]


def _read_file(path: Path) -> torch.Tensor:
    if not path.exists():
        raise FileNotFoundError(f"Expected `patch` to be a rectangle 'y0:y1,x0:x1' or an existing mask file, "
                                f"but {str(path)!r} does not exist")
    array = np.load(path) if path.suffix == ".npy" else torch.load(path, weights_only=False)
    mask = torch.as_tensor(np.asarray(array), dtype=torch.float32)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"Expected `patch` file {path} to hold a binary mask (0/1), but found other values")
    return mask


def load_patch(patch: Optional[str], targets: list) -> Masks:
    """None, one mask ``(1, h, w)`` on the targets' latent grid, or {target_id: mask} for per-target masks."""
    if patch is None:
        return None
    height, width = targets[0].x_t.shape[-2:]
    if not Path(patch).suffix:  # a rectangle in the pixels of the final image, mapped to the x_t grid
        return _resize(parse_rectangle(patch, *targets[0].pictures()[1].shape[-2:]), height, width)
    mask = _read_file(Path(patch))
    if mask.ndim == 2:
        return _resize(mask.unsqueeze(0), height, width)
    if mask.ndim == 3 and mask.shape[0] == len(targets):
        return {t.target_id: _resize(m.unsqueeze(0), height, width) for t, m in zip(targets, mask)}
    raise ValueError(f"Expected the `patch` mask to have shape (H, W) or ({len(targets)}, H, W) (one per target), "
                     f"but got {tuple(mask.shape)}")
