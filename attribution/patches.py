"""Patch attribution: a binary pixel mask restricts the step output f_t to a region of the image.

``patch`` is a rectangle ``"y0:y1,x0:x1"`` (integer pixels, half-open, like Python slices) applied to
every target, or a ``.npy``/``.pt``/``.pth`` file holding one mask ``(H, W)`` for every target or one per
target ``(num_targets, H, W)`` in the order of the targets. A mask has the size of the targets' pictures
(the final image) or exactly that of the recorded ``x_t`` grid; for a latent model a picture-sized mask is
resized (nearest) to the latent grid. Nothing is guessed: a mask of another size, with values other than
0/1, or that selects no pixel (also after resizing) is refused.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import PatchError

Masks = Union[None, torch.Tensor, dict]
MASK_SUFFIXES = (".npy", ".pt", ".pth")
_RECTANGLE_CHARS = re.compile(r"^[\s0-9.:,+\-eE]*$")  # what a rectangle (even a malformed one) is made of


def parse_rectangle(text: str, height: int, width: int) -> torch.Tensor:
    """``"y0:y1,x0:x1"`` -> a float mask (1, H, W) with ones inside the rectangle."""
    try:
        (y0, y1), (x0, x1) = [tuple(_pixel(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError as err:
        raise PatchError(f"Expected `patch` as 'y0:y1,x0:x1' with integer pixel bounds (or a .npy/.pt mask file), "
                         f"but got {text!r} ({err})") from None
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise PatchError(f"Expected `patch` rectangle inside the {height}x{width} image with y0 < y1 and x0 < x1, "
                         f"but got {text!r}")
    mask = torch.zeros(1, height, width)
    mask[:, y0:y1, x0:x1] = 1.0
    return mask


def _pixel(value: str) -> int:
    value = value.strip()
    if not re.fullmatch(r"[+-]?\d+", value):
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


def _resize(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    return F.interpolate(mask.unsqueeze(0), size=(height, width), mode="nearest")[0]


def _read_file(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise FileNotFoundError(f"Expected `patch` to be a rectangle 'y0:y1,x0:x1' or an existing mask file, "
                                f"but {str(path)!r} does not exist")
    try:
        array = np.load(path, allow_pickle=False) if path.suffix == ".npy" else torch.load(path, weights_only=True)
        mask = torch.as_tensor(np.asarray(array), dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - any reader failure: the file is not a mask
        raise PatchError(f"Expected `patch` file {path} to hold a mask array, but it is unreadable "
                         f"({type(err).__name__}: {err})") from None
    other = mask[(mask != 0) & (mask != 1)]
    if other.numel():
        raise PatchError(f"Expected `patch` file {path} to hold a binary mask (0/1), but found the values "
                         f"{sorted(set(other.tolist()))[:5]}")
    return mask


def _fit(mask: torch.Tensor, picture: tuple[int, int], grid: tuple[int, int], source: str) -> torch.Tensor:
    """One mask ``(h, w)`` -> ``(1, H_grid, W_grid)``: only picture- or grid-sized masks, never empty."""
    if tuple(mask.shape) not in (picture, grid):
        sizes = f"{picture}" + (f" (the pictures) or {grid} (the x_t grid)" if grid != picture else " (the pictures)")
        raise PatchError(f"Expected the `patch` mask {source} to have shape {sizes}, but got {tuple(mask.shape)}")
    if not bool(mask.any()):
        raise PatchError(f"Expected the `patch` mask {source} to select at least one pixel, but it is all zero")
    fitted = _resize(mask.unsqueeze(0), *grid)
    if not bool(fitted.any()):
        raise PatchError(f"Expected the `patch` mask {source} to select at least one cell of the {grid} x_t grid, "
                         f"but it selects none once resized (make it larger)")
    return fitted


def load_patch(patch: Optional[str], targets: list) -> Masks:
    """None, one mask ``(1, h, w)`` on the targets' latent grid, or {target_id: mask} for per-target masks."""
    if patch is None:
        return None
    if not targets:
        raise PatchError("Expected targets to apply the `patch` to, but got none")
    grid = tuple(targets[0].x_t.shape[-2:])
    picture = tuple(targets[0].pictures()[1].shape[-2:])
    text = str(patch)
    if _RECTANGLE_CHARS.match(text) and ":" in text:  # a rectangle in the pixels of the final image
        return _fit(parse_rectangle(text, *picture)[0], picture, grid, f"{text!r}")
    if Path(text).suffix.lower() not in MASK_SUFFIXES:
        raise PatchError(f"Expected `patch` as a rectangle 'y0:y1,x0:x1' or a mask file ({', '.join(MASK_SUFFIXES)}), "
                         f"but got {text!r}")
    mask = _read_file(Path(text))
    if mask.ndim == 2:
        return _fit(mask, picture, grid, f"in {text}")
    if mask.ndim == 3 and mask.shape[0] == len(targets):
        return {t.target_id: _fit(m, picture, grid, f"{i} in {text}") for i, (t, m) in enumerate(zip(targets, mask))}
    raise PatchError(f"Expected the `patch` mask in {text} to have shape {picture} or ({len(targets)}, "
                     f"{picture[0]}, {picture[1]}) (one per target), but got {tuple(mask.shape)}")
