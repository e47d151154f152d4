"""ImageDataModule: the shared behaviour of every datamodule (subset mask, loaders, fingerprint).

A subclass sets its own source arguments, calls ``super().__init__`` (which validates the subset
mask against ``num_examples``) and implements :meth:`_load_source` returning uint8 images
``(N, H, W, C)`` and int64 labels ``(N,)`` or ``None``. It may override :meth:`_count_examples`
when ``N`` is cheaper to know than the pixels (then the data is only loaded on first use).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler

from attribution.errors import AttributionInputError, CheckpointMismatchError, DataSourceError, SettingsError
from attribution.identity import read_identity
from attribution.masks import dataset_fingerprint, load_subset_mask, mask_hash
from attribution.seeding import cpu_generator
from datamodules.array_dataset import ArrayImageDataset, check_uint8_images, resize_and_pad, to_float

__all__ = ["ImageDataModule"]


class ImageDataModule(LightningDataModule):
    """Base class: in-memory uint8 images, an optional subset mask, deterministic loaders.

    Args:
        subset_mask: ``.npy``/``.pt`` file with a boolean mask of length N or integer global
            indices (see ``attribution.masks``); ``None`` trains on all N examples.
        batch_size: batch size of every loader.
        num_workers: DataLoader worker processes.
        augment: random horizontal flip in ``train_dataloader`` only.
        seed: seeds the ``torch.Generator`` of the training shuffle (the data order).
        image_size: resize (antialiased; shorter side, then center crop) to this square size;
            ``None`` keeps the source size.
        pad: zero pixels added on each side after resizing.
        caption_template: give every item a ``"caption"`` made from its label, e.g.
            ``"a handwritten digit {label}"`` (``{label}`` is the label's name in ``caption_names``);
            for text-conditional models. ``None``: no captions.
    """

    label_names: Optional[list[str]] = None
    caption_names: Optional[list[str]] = None  # the words captions use for labels (default: label_names)

    def __init__(
        self,
        subset_mask: Optional[str] = None,
        batch_size: int = 128,
        num_workers: int = 0,
        augment: bool = False,
        seed: int = 0,
        image_size: Optional[int] = None,
        pad: int = 0,
        caption_template: Optional[str] = None,
    ) -> None:
        super().__init__()
        self._check_args(batch_size, num_workers, image_size, pad)
        self.save_hyperparameters()  # collects the subclass's __init__ arguments too
        self.subset_mask = subset_mask
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.seed = seed
        self.image_size = image_size
        self.pad = pad
        self.caption_template = caption_template
        self._captions: Optional[list[str]] = None
        self._images: Optional[torch.Tensor] = None
        self._labels: Optional[torch.Tensor] = None
        self._fingerprint: Optional[str] = None
        self._num_examples = self._count_examples()
        if subset_mask is None:
            self.subset_indices = np.arange(self._num_examples, dtype=np.int64)
        else:
            self.subset_indices = load_subset_mask(subset_mask, self._num_examples)
        self.mask_hash = mask_hash(None if subset_mask is None else self.subset_indices, self._num_examples)

    @staticmethod
    def _check_args(batch_size: int, num_workers: int, image_size: Optional[int], pad: int) -> None:
        if batch_size < 1:
            raise SettingsError(f"Expected `batch_size` >= 1, but got {batch_size}")
        if num_workers < 0:
            raise SettingsError(f"Expected `num_workers` >= 0, but got {num_workers}")
        if image_size is not None and image_size < 1:
            raise SettingsError(f"Expected `image_size` >= 1 or None, but got {image_size}")
        if pad < 0:
            raise SettingsError(f"Expected `pad` >= 0, but got {pad}")

    # ----------------------------------------------------------------------- subclass interface
    def _load_source(self) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` and int64 labels ``(N,)`` or ``None``."""
        raise NotImplementedError

    def _count_examples(self) -> int:
        """N; the default loads the data. Override when N is cheaper to know."""
        self._ensure_loaded()
        return int(self._images.shape[0])

    def _fingerprint_extra(self) -> str:
        """Settings that change what the model sees (pixels, captions), mixed into the fingerprint."""
        extra = f"{type(self).__name__}:image_size={self.image_size}:pad={self.pad}"
        return extra + (f":caption_template={self.caption_template}" if self.caption_template else "")

    # ------------------------------------------------------------------------------ loading
    def _ensure_loaded(self) -> None:
        if self._images is not None:
            return
        name = type(self).__name__
        source, labels = self._read_source()
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            if labels.shape[0] != source.shape[0]:
                raise DataSourceError(f"{name} ({self._source_arguments()}): expected {source.shape[0]} labels, "
                                      f"but got {labels.shape[0]}")
        self._fingerprint = dataset_fingerprint(source, labels, extra=self._fingerprint_extra())
        self._images = resize_and_pad(source, self.image_size, self.pad)
        self._labels = None if labels is None else torch.from_numpy(labels)
        self._captions = self._make_captions(labels)

    def _read_source(self) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The subclass's source, checked; a file it cannot read is a :class:`DataSourceError` naming it."""
        name = type(self).__name__
        try:
            source, labels = self._load_source()
            return check_uint8_images(source, name), labels
        except (AttributionInputError, FileNotFoundError, NotImplementedError):
            raise
        except (ValueError, TypeError, OSError, EOFError, KeyError) as err:  # numpy/zip/pickle/PIL readers
            message = " ".join(str(err).split()) or type(err).__name__
            if message.startswith(f"{name}:"):  # the subclass's own check: say which source it read
                raise DataSourceError(f"{message} (reading {self._source_arguments()})") from err
            raise DataSourceError(f"{name}: expected readable training images from {self._source_arguments()}, "
                                  f"but got {type(err).__name__}: {message}") from err

    def _source_arguments(self) -> str:
        """The subclass's own arguments (what names its source), for messages: ``path='...'``."""
        own = {k: v for k, v in self.hparams.items() if not k.startswith("_") and k not in (
            "subset_mask", "batch_size", "num_workers", "augment", "seed", "pad", "caption_template", "image_size")}
        return ", ".join(f"`{k}`={v!r}" for k, v in own.items()) or "its source"

    def _make_captions(self, labels: Optional[np.ndarray]) -> Optional[list[str]]:
        if self.caption_template is None:
            return None
        names = self.caption_names or self.label_names
        if labels is None or names is None:
            raise ValueError(f"{type(self).__name__}: `caption_template` {self.caption_template!r} needs labelled "
                             f"data with label names, but this data has {'no labels' if labels is None else 'no names'}")
        try:
            return [self.caption_template.format(label=names[int(k)]) for k in labels]
        except (KeyError, IndexError) as error:
            raise ValueError(f"Expected `caption_template` to use only the field {{label}}, e.g. 'a photo of a "
                             f"{{label}}', but got {self.caption_template!r} ({error!r})") from None

    def prepare_data(self) -> None:
        """Nothing to download: every source is local (this project never downloads data)."""

    def setup(self, stage: Optional[str] = None) -> None:
        self._ensure_loaded()

    # --------------------------------------------------------------------------- properties
    @property
    def num_examples(self) -> int:
        """N, the size of the full dataset (not of the subset)."""
        return self._num_examples

    @property
    def fingerprint(self) -> str:
        """``dataset_fingerprint`` of the uint8 source data, labels and resize settings."""
        self._ensure_loaded()
        return self._fingerprint

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the model sees (after resize and pad)."""
        self._ensure_loaded()
        return tuple(self._images.shape[1:])

    # ----------------------------------------------------------------------------- datasets
    def full_dataset(self) -> ArrayImageDataset:
        """All N examples in global index order, never augmented."""
        self._ensure_loaded()
        return ArrayImageDataset(self._images, self._labels, None, augment=False, captions=self._captions)

    def _check_indices(self, indices: Optional[Sequence[int]]) -> np.ndarray:
        if indices is None:
            return np.arange(self.num_examples, dtype=np.int64)
        array = torch.as_tensor(indices).cpu().numpy() if torch.is_tensor(indices) else np.asarray(indices)
        array = array.astype(np.int64).reshape(-1)
        if array.size and (array.min() < 0 or array.max() >= self.num_examples):
            bad = array[(array < 0) | (array >= self.num_examples)][:5].tolist()
            raise IndexError(f"Expected global indices in [0, {self.num_examples}), but got {bad}")
        return array

    def _loader(self, dataset: ArrayImageDataset, batch_size: int, sampler: Optional[Sampler] = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """The subset only, in a new order each epoch (a function of ``seed`` and the epoch). A fit resumed in
        the middle of an epoch continues that epoch's order after the batches already trained on."""
        self._ensure_loaded()
        dataset = ArrayImageDataset(self._images, self._labels, self.subset_indices, self.augment, self._captions)
        sampler = EpochSampler(len(dataset), self.seed)
        trainer = self.trainer
        if trainer is not None and trainer.fit_loop.restarting:
            # batches of the current epoch already trained on (the checkpoint is saved in the batch-end hook,
            # before Lightning counts that batch as completed, so its own counter is one short)
            per_epoch = math.ceil(len(dataset) / self.batch_size)
            done = trainer.global_step * trainer.accumulate_grad_batches - trainer.current_epoch * per_epoch
            sampler.resume(trainer.current_epoch, max(0, done) * self.batch_size)
        return self._loader(dataset, self.batch_size, sampler)

    def featurize_dataloader(
        self, indices: Optional[Sequence[int]] = None, batch_size: Optional[int] = None
    ) -> DataLoader:
        """Deterministic order over ``indices`` (global; default all N); no shuffle, no augment."""
        self._ensure_loaded()
        dataset = ArrayImageDataset(self._images, self._labels, self._check_indices(indices), False,
                                    self._captions)
        return self._loader(dataset, batch_size or self.batch_size)

    def images(self, indices: Sequence[int]) -> torch.Tensor:
        """Float ``(k, C, H, W)`` in ``[-1, 1]`` for global ``indices`` (pictures, pixel similarity)."""
        self._ensure_loaded()
        return to_float(self._images[torch.from_numpy(self._check_indices(indices))])

    def captions(self, indices: Sequence[int]) -> list[str]:
        """The caption of each global index (``caption_template`` must be set)."""
        self._ensure_loaded()
        if self._captions is None:
            raise ValueError(f"{type(self).__name__} has no captions: set `caption_template` (e.g. "
                             f"'a handwritten digit {{label}}') to train or score a text-conditional model")
        return [self._captions[int(i)] for i in self._check_indices(indices)]

    # ------------------------------------------------------------------- checkpoint identity
    def state_dict(self) -> dict:
        """Identity of the data this run trained on; checked again on resume."""
        return {
            "num_examples": self.num_examples,
            "fingerprint": self.fingerprint,
            "mask_hash": self.mask_hash,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        mine = self.state_dict()
        for key, value in state_dict.items():
            if key in mine and mine[key] != value:
                raise CheckpointMismatchError(
                    f"{type(self).__name__}: the checkpoint was trained with {key}={value!r}, but this "
                    f"datamodule has {key}={mine[key]!r}; resume with the same data and subset_mask"
                )

    def check_resume(self, checkpoint: dict, source: str = "checkpoint") -> None:
        """Refuse to resume training from a checkpoint made on other data, whatever datamodule class made it.

        Compares N, the dataset fingerprint and the subset mask's hash with the identity the checkpoint
        records (the ``"attribution"`` stamp of our modules, or any project datamodule's saved state;
        Lightning restores a datamodule's state only for the same class name).
        """
        recorded = self._recorded_identity(checkpoint)
        if recorded is None:
            raise CheckpointMismatchError(f"Cannot check {source} against the data: it records no data identity "
                                          "(N, fingerprint, mask hash); resume only checkpoints of this project")
        mine = self.state_dict()
        for key in ("num_examples", "fingerprint", "mask_hash"):
            if key in recorded and recorded[key] != mine[key]:
                raise CheckpointMismatchError(
                    f"Expected {source} to have been trained on the data given now ({type(self).__name__}: {key} = "
                    f"{mine[key]!r}), but it records {key} = {recorded[key]!r}; resume with the same data and "
                    "subset_mask, or start a new run")

    @staticmethod
    def _recorded_identity(checkpoint: dict) -> Optional[dict]:
        stamped = read_identity(checkpoint)
        if stamped:
            return {"num_examples": stamped.get("num_examples"), "fingerprint": stamped.get("dataset_fingerprint"),
                    "mask_hash": stamped.get("mask_hash")}
        for value in checkpoint.values():  # a project datamodule's state_dict, saved under its class name
            if isinstance(value, dict) and {"num_examples", "fingerprint", "mask_hash"} <= set(value):
                return dict(value)
        return None


class EpochSampler(Sampler[int]):
    """Shuffled positions: epoch ``e``'s order is a permutation drawn from ``(seed, e)`` alone, so any epoch can
    be replayed. Lightning calls :meth:`set_epoch` at each epoch start; :meth:`resume` skips the positions a
    resumed run already trained on in its first epoch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self._skip = int(size), int(seed), 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, skip: int) -> None:
        self.epoch, self._skip = int(epoch), int(skip)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = torch.randperm(self.size, generator=cpu_generator(self.seed, 0x5A3, self.epoch))
        skip, self._skip = self._skip, 0
        return iter(order[skip:].tolist())
