"""WebDatasetDataModule: stream captioned images from webdataset shards, honouring a subset mask.

Shards come from ``datamodules.shards`` (format: ``datamodules.shard_format``). ``manifest.json``
gives N, the index range of every shard and its size, so ``__init__`` validates the subset mask
and checks every shard's existence and size without reading a shard.

**Epoch plan (training).** Every rank and worker computes the same plan from
``(seed, epoch, subset, manifest)``: the shard order is a permutation drawn from
``default_rng([seed, epoch])``; the subset members of each shard, in that shard order, form the
epoch stream of ``k`` samples. Rank ``r`` of ``W`` takes the contiguous positions
``[k*r//W, k*(r+1)//W)`` (sizes differ by at most one), cut into the same number of batches on
every rank (DDP needs equal batch counts; a shorter rank gets one batch one sample smaller).
Worker ``w`` of ``nw`` takes a contiguous block of its rank's batches. So every subset example is
seen exactly once per epoch whatever the numbers of shards, ranks and workers, and each consumer
reads only the shards its block overlaps (webdataset's ``split_by_node``/``split_by_worker``
split whole shards: unequal counts across ranks, and nothing for a worker when shards are
fewer than consumers). Each worker shuffles through a ``shuffle_buffer``-sample buffer seeded by
``(seed, epoch, rank, worker)``. The caption (one of the sample's captions) and the flip are drawn
from ``default_rng([seed, epoch, index])``, so they do not depend on the worker layout. The
epoch is the trainer's ``current_epoch`` when a trainer is attached, else the number of passes
already started over this loader. ``len(train_dataloader())`` is the exact number of batches of
this rank. Resuming mid-epoch replays that epoch from its start (the stream has no position).

**Featurize order.** ``featurize_dataloader`` yields batches of consecutive entries of the sorted
indices, batch ``j`` from worker ``j % num_workers``; torch's DataLoader returns workers' batches
round-robin, so the output is in increasing index order for any ``num_workers``.

Items: ``{"image": float (C, H, W) in [-1, 1], "index": int, "label": int (-1 if none),
"caption": str}``. The full caption list is not in the items (default collate cannot batch
ragged lists of strings); use :meth:`WebDatasetDataModule.all_captions`.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from datamodules.array_dataset import resize_and_pad, to_float
from datamodules.base import ImageDataModule
from datamodules.shard_format import RawSample, ShardError, check_shard_files, iter_shard, read_manifest

__all__ = ["WebDatasetDataModule", "plan_epoch", "even_batch_sizes"]


def _rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` from ``torch.distributed`` when initialised (Lightning DDP), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ================================================================================ plan
def even_batch_sizes(count: int, num_batches: int, batch_size: int) -> list[int]:
    """``count`` samples in exactly ``num_batches`` non-empty batches of at most ``batch_size``
    (full batches first; the shortfall is taken from the last batches)."""
    if not num_batches <= count <= num_batches * batch_size:
        raise ValueError(f"cannot split {count} samples into {num_batches} non-empty batches of "
                         f"at most {batch_size}")
    sizes, excess, j = [batch_size] * num_batches, num_batches * batch_size - count, num_batches - 1
    while excess:
        take = min(excess, sizes[j] - 1)
        sizes[j], excess, j = sizes[j] - take, excess - take, j - 1
    return sizes


def batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields per epoch: ``ceil(ceil(k / W) / batch_size)``."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def plan_epoch(
    firsts: np.ndarray, counts: np.ndarray, subset: np.ndarray, seed: int, epoch: int,
    rank: int, world_size: int, worker: int, num_workers: int, batch_size: int,
) -> tuple[list[tuple[int, np.ndarray]], list[int]]:
    """This consumer's share of one epoch (see the module docstring).

    Returns:
        ``[(shard number, sorted global indices to keep), ...]`` in reading order, and the
        sizes of the batches to emit (they sum to the number of indices).
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(firsts))
    lo, hi = np.searchsorted(subset, firsts[order]), np.searchsorted(subset, firsts[order] + counts[order])
    stream = np.concatenate([subset[a:b] for a, b in zip(lo, hi)])
    shard_of = np.repeat(order, hi - lo)
    k = len(stream)
    start, stop = k * rank // world_size, k * (rank + 1) // world_size
    num_batches = batches_per_rank(k, world_size, batch_size)
    sizes = even_batch_sizes(stop - start, num_batches, batch_size)
    b0, b1 = num_batches * worker // num_workers, num_batches * (worker + 1) // num_workers
    p0 = start + sum(sizes[:b0])
    p1 = p0 + sum(sizes[b0:b1])
    shards, kept = shard_of[p0:p1], stream[p0:p1]
    cuts = np.flatnonzero(np.diff(shards)) + 1
    reads = [(int(shards[a]), kept[a:b]) for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(kept)]) if b > a]
    return reads, sizes[b0:b1]


# ============================================================================ decoding
def decode_image(png: bytes, channels: int, image_size: Optional[int]) -> torch.Tensor:
    """PNG bytes -> uint8 ``(C, H, W)`` (square-resized as ``ImageDataModule`` when ``image_size``)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        pixels = np.array(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)  # writable
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    return resize_and_pad(pixels[None], image_size, 0)[0]


class _Source:
    """Where the shards are and how to decode them (pickled into every worker)."""

    def __init__(self, path: str, manifest: dict, image_size: Optional[int]) -> None:
        self.path = Path(path)
        self.files = [entry["file"] for entry in manifest["shards"]]
        self.firsts = np.array([entry["first"] for entry in manifest["shards"]], dtype=np.int64)
        self.counts = np.array([entry["count"] for entry in manifest["shards"]], dtype=np.int64)
        self.channels = int(manifest["channels"])
        self.image_size = image_size

    def shard_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.firsts, indices, side="right") - 1

    def read(self, shard: int, wanted: np.ndarray) -> Iterator[RawSample]:
        """The samples of ``wanted`` (sorted global indices, all in ``shard``), in index order."""
        keep, found = set(wanted.tolist()), 0
        file = self.path / self.files[shard]
        first, count = int(self.firsts[shard]), int(self.counts[shard])
        for sample in iter_shard(file, first, count, stop_after=int(wanted[-1])):
            if sample.index in keep:
                found += 1
                yield sample
        if found != len(keep):
            raise ShardError(f"shard '{file}' holds indices [{first}, {first + count}), not all of "
                             f"{wanted[:5].tolist()}...")

    def read_sorted(self, indices: np.ndarray) -> Iterator[RawSample]:
        """The samples of sorted global ``indices``, shard by shard, in index order."""
        shards = self.shard_of(indices)
        cuts = np.flatnonzero(np.diff(shards)) + 1
        for part in np.split(indices, cuts):
            if len(part):
                yield from self.read(int(self.shard_of(part[:1])[0]), part)

    def item(self, raw: RawSample, caption: str, flip: bool = False) -> dict:
        image = to_float(decode_image(raw.png, self.channels, self.image_size))
        return {"image": image.flip(-1) if flip else image, "index": raw.index,
                "label": raw.label, "caption": caption}


def _caption(raw: RawSample, caption_index: int) -> str:
    if caption_index >= len(raw.captions):
        raise IndexError(f"sample {raw.index} has {len(raw.captions)} captions; caption_index "
                         f"{caption_index} is out of range")
    return raw.captions[caption_index]


def _shuffled(samples: Iterator[RawSample], size: int, rng: np.random.Generator) -> Iterator[RawSample]:
    """webdataset-style shuffle buffer over undecoded samples (``size <= 1``: no shuffle)."""
    if size <= 1:
        yield from samples
        return
    buffer: list[RawSample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], sample = sample, buffer[j]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


# ============================================================================ datasets
class _TrainStream(IterableDataset):
    """One epoch of this rank's share of the subset, as whole batches (see :func:`plan_epoch`)."""

    def __init__(self, source: _Source, subset: np.ndarray, batch_size: int, seed: int,
                 shuffle_buffer: int, augment: bool, rank: int, world_size: int) -> None:
        self.source, self.subset, self.batch_size, self.seed = source, subset, batch_size, seed
        self.shuffle_buffer, self.augment = shuffle_buffer, augment
        self.rank, self.world_size = rank, world_size
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by persistent workers

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return batches_per_rank(len(self.subset), self.world_size, self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = int(self._epoch)
        reads, sizes = plan_epoch(self.source.firsts, self.source.counts, self.subset, self.seed,
                                  epoch, self.rank, self.world_size, worker, num_workers, self.batch_size)
        raw = (s for shard, wanted in reads for s in self.source.read(shard, wanted))
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        samples = _shuffled(raw, self.shuffle_buffer, rng)
        for size in sizes:
            yield default_collate([self._item(next(samples), epoch) for _ in range(size)])

    def _item(self, raw: RawSample, epoch: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, raw.index])
        caption = raw.captions[int(rng.integers(len(raw.captions)))] if raw.captions else ""
        return self.source.item(raw, caption, flip=self.augment and bool(rng.random() < 0.5))


class _FeaturizeStream(IterableDataset):
    """Sorted indices in consecutive batches; batch ``j`` comes from worker ``j % num_workers``."""

    def __init__(self, source: _Source, indices: np.ndarray, batch_size: int, caption_index: int) -> None:
        self.source, self.indices = source, indices
        self.batch_size, self.caption_index = batch_size, caption_index

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = [self.indices[j * self.batch_size:(j + 1) * self.batch_size]
                   for j in range(worker, len(self), num_workers)]
        if not batches:
            return
        raw = self.source.read_sorted(np.concatenate(batches))
        for batch in batches:
            items = [next(raw) for _ in range(len(batch))]
            yield default_collate([self.source.item(r, _caption(r, self.caption_index)) for r in items])


class _ShardCache:
    """Random access by global index; keeps the last ``max_shards`` shards read in memory."""

    def __init__(self, source: _Source, max_shards: int = 8) -> None:
        self.source, self.max_shards = source, max_shards
        self._shards: OrderedDict[int, list[RawSample]] = OrderedDict()

    def get(self, index: int) -> RawSample:
        shard = int(self.source.shard_of(np.array([index]))[0])
        if shard not in self._shards:
            first, count = int(self.source.firsts[shard]), int(self.source.counts[shard])
            self._shards[shard] = list(self.source.read(shard, np.arange(first, first + count)))
            if len(self._shards) > self.max_shards:
                self._shards.popitem(last=False)
        self._shards.move_to_end(shard)
        return self._shards[shard][index - int(self.source.firsts[shard])]


class ShardMapDataset(Dataset):
    """Map-style view of all N samples in global index order (never augmented; ``caption_index``)."""

    def __init__(self, source: _Source, num_examples: int, caption_index: int) -> None:
        self.cache, self.num_examples, self.caption_index = _ShardCache(source), num_examples, caption_index

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        raw = self.cache.get(int(index))
        return self.cache.source.item(raw, _caption(raw, self.caption_index))


class _EpochLoader(DataLoader):
    """Tells its dataset the epoch before each pass: ``epoch_fn()`` (the trainer's epoch) when it
    returns a number, else how many passes were started before."""

    def __init__(self, dataset: _TrainStream, epoch_fn: Optional[Callable[[], Optional[int]]] = None,
                 **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch_fn, self._passes = epoch_fn, 0

    def __iter__(self):
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        self.dataset.set_epoch(self._passes if epoch is None else epoch)
        self._passes += 1
        return super().__iter__()


# ========================================================================== datamodule
class WebDatasetDataModule(ImageDataModule):
    """Captioned images streamed from webdataset shards written by ``datamodules.shards``.

    Args:
        path: folder with ``manifest.json`` and the ``shard-*.tar`` files.
        subset_mask: ``.npy``/``.pt`` mask or index list over the N examples (``attribution.masks``).
        batch_size: batch size of every loader.
        num_workers: DataLoader workers (any number; every example is still read once per pass).
        augment: random horizontal flip in ``train_dataloader`` (seeded per example and epoch).
        seed: seeds the shard order, the shuffle buffer, the caption choice and the flips.
        image_size: square resize (shorter side, then center crop); required when the shards hold
            images of different sizes.
        caption_index: which caption ``featurize_dataloader``, ``images``-side helpers and
            ``full_dataset`` use; training draws one of each example's captions at random.
        shuffle_buffer: samples in each worker's shuffle buffer (0 or 1: shard order only).
    """

    def __init__(
        self,
        path: str,
        image_size: Optional[int] = None,
        caption_index: int = 0,
        shuffle_buffer: int = 1000,
        **kwargs: Any,
    ) -> None:
        self.path, self.caption_index, self.shuffle_buffer = path, caption_index, shuffle_buffer
        self.manifest = read_manifest(path)
        check_shard_files(path, self.manifest)
        self._check_reading_args(image_size)
        self.label_names = self.manifest.get("label_names")
        for name in ("pad", "caption_template"):
            if kwargs.get(name):
                raise ValueError(f"Expected no `{name}` for webdataset shards (their images and captions are "
                                 f"stored as converted), but got {kwargs[name]!r}")
        super().__init__(image_size=image_size, **kwargs)
        self._source = _Source(path, self.manifest, image_size)
        self._cache = _ShardCache(self._source)

    def _check_reading_args(self, image_size: Optional[int]) -> None:
        available = self.manifest["min_captions"]
        if not 0 <= self.caption_index < max(available, 1):
            raise ValueError(f"Expected `caption_index` in [0, {max(available, 1)}) (some images in "
                             f"'{self.path}' have only {available} captions), but got {self.caption_index}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"Expected `shuffle_buffer` >= 0, but got {self.shuffle_buffer}")
        if self.manifest["image_shape"] is None and image_size is None:
            raise ValueError(f"the images in '{self.path}' have different sizes: expected "
                             "`image_size` (an int), but got None")

    # --------------------------------------------------------------------------- properties
    def _count_examples(self) -> int:
        return int(self.manifest["num_examples"])

    def _ensure_loaded(self) -> None:
        """Nothing to load: shards are streamed."""

    @property
    def fingerprint(self) -> str:
        """The manifest's fingerprint (source pixels, captions, labels) mixed with ``image_size``."""
        import hashlib

        text = f"{self.manifest['fingerprint']}:{self._fingerprint_extra()}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the model sees."""
        channels = int(self.manifest["channels"])
        if self.image_size is not None:
            return channels, self.image_size, self.image_size
        height, width, _ = self.manifest["image_shape"]
        return channels, height, width

    # ------------------------------------------------------------------------------ loaders
    def _current_epoch(self) -> Optional[int]:
        trainer = getattr(self, "trainer", None)
        return None if trainer is None else int(trainer.current_epoch)

    def train_dataloader(self) -> DataLoader:
        """This rank's share of the subset, shuffled per epoch (see the module docstring)."""
        rank, world_size = _rank_and_world_size()
        count = len(self.subset_indices)
        if world_size > 1 and count // world_size < batches_per_rank(count, world_size, self.batch_size):
            raise ValueError(f"cannot give {world_size} ranks the same number of non-empty batches "
                             f"from {count} examples with batch_size {self.batch_size}")
        stream = _TrainStream(self._source, self.subset_indices, self.batch_size, self.seed,
                              self.shuffle_buffer, self.augment, rank, world_size)
        return _EpochLoader(stream, self._current_epoch, batch_size=None, num_workers=self.num_workers,
                            persistent_workers=self.num_workers > 0)

    def featurize_dataloader(
        self, indices: Optional[Sequence[int]] = None, batch_size: Optional[int] = None
    ) -> DataLoader:
        """``indices`` (global, default all N; no duplicates) in increasing index order, never
        augmented, caption ``caption_index``; not split over ranks (the caller owns that)."""
        indices = np.sort(self._check_indices(indices))
        if np.any(np.diff(indices) == 0):
            raise ValueError("Expected `indices` without duplicates, but got repeated indices "
                             f"{np.unique(indices[1:][np.diff(indices) == 0])[:5].tolist()}")
        stream = _FeaturizeStream(self._source, indices, batch_size or self.batch_size, self.caption_index)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)

    def full_dataset(self) -> ShardMapDataset:
        """All N examples in global index order, never augmented (random access via shard cache)."""
        return ShardMapDataset(self._source, self.num_examples, self.caption_index)

    # -------------------------------------------------------------------------- random access
    def _raw(self, indices: Optional[Sequence[int]]) -> list[RawSample]:
        return [self._cache.get(int(i)) for i in self._check_indices(indices)]

    def images(self, indices: Sequence[int]) -> torch.Tensor:
        """Float ``(k, C, H, W)`` in ``[-1, 1]`` for global ``indices`` (given order)."""
        channels, size = int(self.manifest["channels"]), self.image_size
        return torch.stack([to_float(decode_image(r.png, channels, size)) for r in self._raw(indices)])

    def captions(self, indices: Sequence[int]) -> list[str]:
        """The ``caption_index``-th caption of each global index (given order)."""
        return [_caption(raw, self.caption_index) for raw in self._raw(indices)]

    def all_captions(self, indices: Sequence[int]) -> list[list[str]]:
        """Every caption of each global index, in source order."""
        return [list(raw.captions) for raw in self._raw(indices)]

    def labels(self, indices: Sequence[int]) -> torch.Tensor:
        """int64 ``(k,)`` labels (-1 where unknown)."""
        return torch.tensor([raw.label for raw in self._raw(indices)], dtype=torch.int64)
