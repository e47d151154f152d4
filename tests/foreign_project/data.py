"""The project's datamodule: sklearn's digits as 1x8x8 floats in [-1, 1], batches {"pixels", "idx"}."""
from __future__ import annotations

import hashlib

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset


class Rows(Dataset):
    def __init__(self, pixels: torch.Tensor, indices) -> None:
        self.pixels, self.indices = pixels, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.pixels[self.indices[i]], "idx": self.indices[i]}


class DigitsData(LightningDataModule):
    def __init__(self, n: int = 48, batch_size: int = 16, channels: int = 1) -> None:
        super().__init__()
        from sklearn.datasets import load_digits

        self.batch_size = batch_size
        images = torch.tensor(load_digits().images[:n], dtype=torch.float32) / 8 - 1
        self.pixels = images.unsqueeze(1).repeat(1, channels, 1, 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Rows(self.pixels, range(len(self.pixels))), batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    @property  # protocol
    def num_examples(self) -> int:  # protocol
        return len(self.pixels)  # protocol

    @property  # protocol
    def fingerprint(self) -> str:  # protocol
        return hashlib.sha256(self.pixels.numpy().tobytes()).hexdigest()  # protocol

    def featurize_dataloader(self, indices, batch_size=None) -> DataLoader:  # protocol
        return DataLoader(Rows(self.pixels, indices), batch_size=batch_size or self.batch_size)  # protocol


class TrainOnlyData(LightningDataModule):
    """The same data with nothing of the protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = DigitsData()

    def train_dataloader(self) -> DataLoader:
        return self.inner.train_dataloader()
