"""ImageFolderDataModule: every image file under a local folder, loaded once with PIL."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from attribution.images import square_resize_hwc
from datamodules.base import ImageDataModule

__all__ = ["ImageFolderDataModule", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_images(root: Path) -> list[Path]:
    """All image files under ``root`` (recursive), sorted by relative POSIX path: the global index."""
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_square(path: Path, image_size: int, grayscale: bool) -> np.ndarray:
    """PIL load -> RGB/L -> ``attribution.images.square_resize`` (center crop, antialiased bicubic); uint8 (H, W[, C])."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if grayscale else "RGB")
    except OSError as err:
        raise ValueError(f"ImageFolderDataModule: cannot read image '{path}': {err}") from err
    return square_resize_hwc(np.asarray(image, dtype=np.uint8), image_size)


class ImageFolderDataModule(ImageDataModule):
    """Images under ``root`` (``.png``, ``.jpg``, ... any depth), global index = sorted path order.

    Labels: when images lie in sub-folders, the label is the index of the top-level sub-folder
    name among the sorted class names (``label_names``); images directly in ``root`` then get
    -1. Without sub-folders the data is unlabeled (``label_names`` is ``None``, labels -1).

    Args:
        root: local folder with the images.
        image_size: every image is center-cropped to a square and resized to this size.
        grayscale: convert to 1 channel instead of RGB.
        Other arguments: see :class:`~datamodules.base.ImageDataModule`.
    """

    def __init__(
        self,
        root: str,
        image_size: int,
        grayscale: bool = False,
        **kwargs: Any,
    ) -> None:
        self.root = root
        self.grayscale = grayscale
        self.files = self._find_files(Path(root))
        classes = sorted({self._class_of(p) for p in self.files} - {None})
        self.label_names = classes or None
        super().__init__(image_size=image_size, **kwargs)

    @staticmethod
    def _find_files(root: Path) -> list[Path]:
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolderDataModule: root '{root}' is not a directory")
        files = list_images(root)
        if not files:
            raise FileNotFoundError(
                f"ImageFolderDataModule: expected image files ({', '.join(IMAGE_EXTENSIONS)}) "
                f"under root '{root}', but found none"
            )
        return files

    def _class_of(self, path: Path) -> Optional[str]:
        parts = path.relative_to(self.root).parts
        return parts[0] if len(parts) > 1 else None

    def _count_examples(self) -> int:
        return len(self.files)

    def _fingerprint_extra(self) -> str:
        return super()._fingerprint_extra() + f":grayscale={self.grayscale}"

    def _load_source(self) -> tuple[np.ndarray, Optional[np.ndarray]]:
        images = np.stack([load_square(p, self.image_size, self.grayscale) for p in self.files])
        if self.label_names is None:
            return images, None
        lookup = {name: k for k, name in enumerate(self.label_names)}
        labels = np.array([lookup.get(self._class_of(p), -1) for p in self.files], dtype=np.int64)
        return images, labels
