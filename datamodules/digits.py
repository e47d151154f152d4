"""DigitsDataModule: scikit-learn's 1797 real 8x8 handwritten digits (ships with the package)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from datamodules.base import ImageDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(ImageDataModule):
    """``sklearn.datasets.load_digits()``: N = 1797, 1x8x8, labels 0..9; the embedded default.

    Pixel values 0..16 are scaled to uint8 by ``round(v * 255 / 16)``. ``image_size`` resizes
    (default 8: no resize), ``pad`` adds zero pixels after resizing. With ``caption_template``
(e.g. ``"a handwritten digit {label}"``) items carry captions such as "a handwritten digit seven". Other arguments: see
    :class:`~datamodules.base.ImageDataModule`.
    """

    label_names = [str(digit) for digit in range(10)]
    caption_names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

    def __init__(self, image_size: Optional[int] = 8, **kwargs: Any) -> None:
        super().__init__(image_size=image_size, **kwargs)

    def _load_source(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        return images, digits.target.astype(np.int64)
