"""CIFAR10DataModule: CIFAR-10 from the extracted python-pickle batches in a local folder.

This project never downloads data: download ``cifar-10-python.tar.gz`` yourself and extract it;
``root`` is the resulting ``cifar-10-batches-py`` folder.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.base import ImageDataModule

__all__ = ["CIFAR10DataModule", "CIFAR10_CLASSES"]

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
_SPLIT_FILES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}


def _get(batch: dict, key: str):
    """Pickled CIFAR dicts use bytes keys under ``encoding='bytes'``; accept str keys too."""
    return batch[key] if key in batch else batch[key.encode()]


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch -> uint8 ``(n, 32, 32, 3)`` images and int64 ``(n,)`` labels."""
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    try:
        data = np.asarray(_get(batch, "data"))
        labels = np.asarray(_get(batch, "labels"), dtype=np.int64)
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"CIFAR10DataModule: '{path}' is not a CIFAR-10 python batch (expected a dict with "
            f"'data' and 'labels', missing {err})"
        ) from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(
            f"CIFAR10DataModule: '{path}': expected uint8 'data' of shape (n, 3072) and n labels, "
            f"but got {data.dtype} {tuple(data.shape)} and {len(labels)} labels"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (N = 50000 for ``split="train"``, 10000 for ``"test"``), 3x32x32, 10 classes.

    Args:
        root: the extracted ``cifar-10-batches-py`` folder holding ``data_batch_1`` ...
            ``data_batch_5`` (and ``test_batch``, ``batches.meta``). Never downloaded.
        split: ``"train"`` (the five data batches, in order) or ``"test"``.
        Other arguments: see :class:`~datamodules.base.ImageDataModule`.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        **kwargs: Any,
    ) -> None:
        if split not in _SPLIT_FILES:
            raise ValueError(
                f"CIFAR10DataModule: expected `split` in {sorted(_SPLIT_FILES)}, but got {split!r}"
            )
        self.root = root
        self.split = split
        self._check_files()
        self.label_names = self._read_label_names()
        super().__init__(**kwargs)

    def _check_files(self) -> None:
        root = Path(self.root)
        names = _SPLIT_FILES[self.split]
        missing = [name for name in names if not (root / name).is_file()]
        if missing:
            listed = " ... ".join([names[0], names[-1]]) if len(names) > 1 else names[0]
            detail = "the folder does not exist" if not root.is_dir() else f"missing: {', '.join(missing)}"
            raise FileNotFoundError(
                f"CIFAR10DataModule: root '{self.root}' does not contain {listed} ({detail}). "
                "Download cifar-10-python.tar.gz "
                f"yourself and extract it so that <root>/{names[0]} exists (the folder is usually "
                "named cifar-10-batches-py). This project never downloads data."
            )

    def _read_label_names(self) -> list[str]:
        meta = Path(self.root) / "batches.meta"
        if not meta.is_file():
            return list(CIFAR10_CLASSES)
        with open(meta, "rb") as handle:
            names = _get(pickle.load(handle, encoding="bytes"), "label_names")
        return [name.decode() if isinstance(name, bytes) else str(name) for name in names]

    def _fingerprint_extra(self) -> str:
        return super()._fingerprint_extra() + f":split={self.split}"

    def _load_source(self) -> tuple[np.ndarray, np.ndarray]:
        batches = [_read_batch(Path(self.root) / name) for name in _SPLIT_FILES[self.split]]
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
