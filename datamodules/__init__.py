"""Datamodules: in-memory uint8 images, subset masks, deterministic loaders (see ``base``)."""

from datamodules.array import ArrayDataModule
from datamodules.array_dataset import ArrayImageDataset
from datamodules.base import ImageDataModule
from datamodules.cifar10 import CIFAR10DataModule
from datamodules.digits import DigitsDataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.mnist import MNIST5kDataModule

__all__ = [
    "ArrayDataModule",
    "ArrayImageDataset",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "MNIST5kDataModule",
]

from datamodules.webdataset import WebDatasetDataModule  # noqa: E402 - appended export

__all__ += ["WebDatasetDataModule"]
