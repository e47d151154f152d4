"""ArrayDataModule: uint8 images from a local ``.npy`` or ``.npz`` file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from datamodules.base import ImageDataModule

__all__ = ["ArrayDataModule"]


class ArrayDataModule(ImageDataModule):
    """Images from ``path``: a ``.npy`` of uint8 ``(N, H, W)`` or ``(N, H, W, C)`` (C in 1, 3), or a
    ``.npz`` with ``images`` (same) and optional integer ``labels`` ``(N,)``.

    ``label_names`` is ``["0", ..., str(max label)]`` when labels are given, else ``None``.
    Other arguments: see :class:`~datamodules.base.ImageDataModule`.
    """

    def __init__(
        self,
        path: str,
        **kwargs: Any,
    ) -> None:
        self.path = path
        super().__init__(**kwargs)

    def _load_source(self) -> tuple[np.ndarray, Optional[np.ndarray]]:
        path = Path(self.path)
        if path.suffix.lower() not in (".npy", ".npz"):
            raise ValueError(f"ArrayDataModule: expected `path` to a .npy or .npz file, but got '{path}'")
        if not path.is_file():
            raise FileNotFoundError(f"ArrayDataModule: `path` '{path}' does not exist")
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive:
                raise ValueError(
                    f"ArrayDataModule: expected an 'images' array in '{path}', "
                    f"but it holds {sorted(archive.files)}"
                )
            labels = self._check_labels(archive["labels"] if "labels" in archive else None, path)
            if labels is not None and labels.size:
                self.label_names = [str(k) for k in range(int(labels.max()) + 1)]
            return archive["images"], labels

    @staticmethod
    def _check_labels(labels: Optional[np.ndarray], path: Path) -> Optional[np.ndarray]:
        if labels is None:
            return None
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
            raise ValueError(
                f"ArrayDataModule: expected 'labels' in '{path}' to be non-negative integers of "
                f"shape (N,), but got {labels.dtype} of shape {labels.shape}"
            )
        return labels
