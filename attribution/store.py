"""``FeatureStore``: a resumable, multi-writer store of projected features for one checkpoint.

Layout of a store folder (one per (experiment, checkpoint))::

    meta.json       N, d, dtype, projector.describe(), output settings, checkpoint identity,
                    dataset fingerprint, ... (written atomically: temp file + os.replace)
    features.npy    (N, d) float16/float32 numpy memmap (a real .npy file)
    done.npy        (N,) uint8: 1 once a row's features are on disk
    weights.npy     (N,) float32, only with ``meta["with_weights"]``: TRAK's Q per row
    kernel_*.npy    written by :func:`attribution.scoring.finalize`
    kernel.json     written last by ``finalize``: marks the store finalized and records the sha256 of
                    every file above (features, done flags, weights, kernel)

Writes put the features first and flush them, then set the done flags and flush, so a kill
never marks a row done without its features. Creation is serialized with a lock file. Re-opening an
existing store with different metadata is refused, naming the differing keys.

Several writers (ranks, nodes): no two processes ever write the same file. Each rank featurizes a
*contiguous* share of the missing rows (:meth:`FeatureStore.rank_share`) into its own *part*, a small
store of its row range in ``parts/rows_<start>_<stop>/`` (:meth:`FeatureStore.part`; same layout, the
rows are global); after a barrier rank 0 copies the finished rows of every part into the store and
deletes the part (:meth:`FeatureStore.merge_parts`, also at the start of a run, so rows of a killed run
are kept). A single process writes the store directly. File-system assumption: a file written and
flushed (``msync``/``fsync``) by one process before a barrier is read correctly by another process that
*opens* it after the barrier (close-to-open consistency: local disks, NFS, Lustre, GPFS). Nothing relies
on two clients sharing cached pages of one file, which NFS does not keep coherent.

Integrity: every open checks that each ``.npy`` file has exactly the shape, dtype and byte size the
metadata implies (a truncated file is refused naming the file and both sizes, never extended).
A store opened for reading (``writable=False``; :func:`open_feature_stores`) maps its files read-only
and creates nothing (no lock file); :meth:`FeatureStore.verify` compares a finalized store's files with
the checksums in ``kernel.json``, so a flipped byte is caught before any score is computed.

Reading (:meth:`FeatureStore.read`) uses plain positioned reads (``preadv``) into a buffer, not the memory
map: a pass over a store larger than memory keeps the resident set at one block (pages of a mapping would
stay counted in the process until unmapped).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from . import _checks
from .atomic import atomic_save_npy, atomic_write_json
from .errors import CorruptFileError, SettingsError, StoreMismatchError
from .integrity import check_file_sha256, check_npy_file, file_sha256, npy_layout

__all__ = ["FeatureStore", "StoreMismatchError", "atomic_write_json", "atomic_save_npy", "open_feature_stores",
           "read_json"]

log = logging.getLogger(__name__)
_DTYPES = ("float16", "float32")
KERNEL_FORMAT = 2  # kernel.json records the checksums of the store's files


def read_json(path: Path, what: str = "metadata") -> dict:
    """A JSON object from ``path``; an unreadable or non-object file is refused naming it."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise CorruptFileError(f"Expected {path} to be a JSON {what} file, but it is unreadable ({err})") from None
    if not isinstance(value, dict):
        raise CorruptFileError(f"Expected {path} to hold a JSON object ({what}), but got {type(value).__name__}")
    return value


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _normalize(meta: dict) -> dict:
    """JSON round trip, so given and stored metadata compare alike (tuples -> lists, ...)."""
    return json.loads(json.dumps(meta, sort_keys=True))


def _flatten_meta(meta: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in meta.items():
        if isinstance(v, dict):
            flat.update(_flatten_meta(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _meta_diff(stored: dict, given: dict) -> list[str]:
    a, b = _flatten_meta(stored), _flatten_meta(given)
    return [f"{k}: stored {a.get(k, '<missing>')!r} vs given {b.get(k, '<missing>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]


def _check_meta(meta: dict) -> dict:
    if not isinstance(meta, dict):
        raise TypeError(f"Expected `meta` to be a dict, but got {type(meta).__name__}")
    if meta.get("with_weights") is not None and not isinstance(meta.get("with_weights"), bool):
        raise SettingsError(f"Expected `meta['with_weights']` to be a bool, but got {meta['with_weights']!r}")
    for key in ("N", "d"):
        _checks.positive_int(f"meta['{key}']", meta.get(key))
    _checks.one_of("meta['dtype']", meta.get("dtype"), _DTYPES)
    return _normalize(meta)


class FeatureStore:
    """Projected features ``Phi`` (N x d) for one checkpoint, on disk. Use :meth:`open`."""

    def __init__(self, path: Path, meta: dict, writable: bool = True) -> None:
        self.path = Path(path)
        self.meta = meta
        self.N, self.d = int(meta["N"]), int(meta["d"])
        self.row_offset = int(meta["part"]["start"]) if isinstance(meta.get("part"), dict) else 0
        self.writable = writable
        for name, shape, dtype in self._layout():  # before mapping: "r+" would silently extend a short file
            check_npy_file(self.path / name, shape, dtype, f"{self.path / 'meta.json'}")
        mode = "r+" if writable else "r"
        self._features = np.load(self.path / "features.npy", mmap_mode=mode)
        self._done = np.load(self.path / "done.npy", mmap_mode=mode)
        self._weights = np.load(self.path / "weights.npy", mmap_mode=mode) if self.has_weights else None
        self._data_offset = npy_layout(self.path / "features.npy")[2]
        self._reader: Optional[int] = None

    def _layout(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(file, shape, dtype) of the store's arrays, as the metadata implies."""
        layout = [("features.npy", (self.N, self.d), self.meta["dtype"]), ("done.npy", (self.N,), "uint8")]
        return layout + ([("weights.npy", (self.N,), "float32")] if self.has_weights else [])

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path, meta: dict, create: bool = True, writable: bool = True) -> "FeatureStore":
        """Open (or create) the store in folder ``path``.

        Args:
            path: the store folder.
            meta: must hold ``N`` (rows), ``d`` (feature width) and ``dtype`` (``"float16"`` or
                ``"float32"``); optional ``with_weights`` (bool) adds a per-row weight array. Any
                other JSON-serializable keys (projector, output settings, checkpoint, dataset
                fingerprint, ...) are recorded and compared on re-open.
            create: create the store when ``path`` has none; otherwise raise ``FileNotFoundError``.
            writable: map the files for writing (featurizing); ``False`` reads only: the files are mapped
                read-only and nothing is created in the folder (``create`` must then be False).

        Raises:
            StoreMismatchError: the folder holds a store whose metadata differs (lists the keys).
            CorruptFileError: meta.json is unreadable, or an array file has another shape or size.
        """
        meta = _check_meta(meta)
        path = Path(path)
        if not create and not (path / "meta.json").exists():
            raise FileNotFoundError(f"Expected a feature store at `path` {path}, but found no meta.json")
        if not writable:
            if create:
                raise SettingsError("Expected `create` False when `writable` is False, but got create=True")
            cls._check_stored_meta(path, meta)
            return cls(path, meta, writable=False)
        path.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            if (path / "meta.json").exists():
                cls._check_stored_meta(path, meta)
            else:
                cls._create(path, meta)
        return cls(path, meta)

    @staticmethod
    def _check_stored_meta(path: Path, meta: dict) -> None:
        diff = _meta_diff(read_json(path / "meta.json", "feature store metadata"), meta)
        if diff:
            raise StoreMismatchError(f"Feature store at {path} was made with different metadata: " + "; ".join(diff))

    @staticmethod
    def _create(path: Path, meta: dict) -> None:
        N, d = meta["N"], meta["d"]
        np.lib.format.open_memmap(path / "features.npy", mode="w+", dtype=meta["dtype"], shape=(N, d)).flush()
        np.lib.format.open_memmap(path / "done.npy", mode="w+", dtype=np.uint8, shape=(N,)).flush()
        if meta.get("with_weights", False):
            np.lib.format.open_memmap(path / "weights.npy", mode="w+", dtype=np.float32, shape=(N,)).flush()
        atomic_write_json(path / "meta.json", meta)  # last: its presence marks a valid store
        log.info("created feature store %s (N=%d, d=%d, %s)", path, N, d, meta["dtype"])

    # ------------------------------------------------------------------ writing
    @property
    def has_weights(self) -> bool:
        """Whether the store keeps a per-row weight (TRAK's Q)."""
        return bool(self.meta.get("with_weights", False))

    def write(self, rows: Tensor, features: Tensor, weights: Optional[Tensor] = None) -> None:
        """Write ``features (R, d)`` (and ``weights (R,)`` if the store has them) to ``rows (R,)``.

        Rows are global example indices (also in a part, which holds ``[start, stop)``). Features and weights
        are flushed before the done flags are set and flushed.
        """
        if not self.writable:
            raise SettingsError(f"Expected a store opened with `writable` True to write to, but {self.path} was "
                                "opened for reading")
        rows_np = self._check_rows(rows)
        if tuple(features.shape) != (len(rows_np), self.d):
            raise ValueError(f"Expected `features` of shape ({len(rows_np)}, {self.d}), but got {tuple(features.shape)}")
        if self.has_weights != (weights is not None):
            raise ValueError(f"Expected `weights` {'(R,)' if self.has_weights else 'None'} for this store "
                             f"(with_weights={self.has_weights}), but got {None if weights is None else tuple(weights.shape)}")
        self._put(rows_np - self.row_offset, features.detach().cpu().numpy(),
                  None if weights is None else weights.detach().cpu().reshape(-1).numpy())

    def _put(self, local: np.ndarray, features: np.ndarray, weights: Optional[np.ndarray]) -> None:
        """Store rows at local positions: features (and weights) flushed, then the done flags set and flushed."""
        self._features[local] = features.astype(self._features.dtype, copy=False)
        self._features.flush()
        if weights is not None:
            self._weights[local] = weights.astype(np.float32, copy=False)
            self._weights.flush()
        self._done[local] = 1
        self._done.flush()

    def _check_rows(self, rows: Tensor) -> np.ndarray:
        rows = _checks.long_vector("rows", torch.as_tensor(rows))
        low, high = self.row_offset, self.row_offset + self.N
        if len(rows) and (int(rows.min()) < low or int(rows.max()) >= high):
            raise ValueError(f"Expected `rows` in [{low}, {high}), but got min {int(rows.min())}, max {int(rows.max())}")
        return rows.cpu().numpy()

    # ------------------------------------------------------------------ several writers
    def rank_share(self, rank: int, world_size: int) -> Tensor:
        """``(R,)`` int64: this rank's contiguous share of the missing rows (shares differ by at most one row)."""
        if not 0 <= rank < world_size:
            raise SettingsError(f"Expected 0 <= `rank` < `world_size`, but got rank {rank}, world_size {world_size}")
        return torch.tensor_split(self.missing_rows(), world_size)[rank]

    def _part_meta(self, start: int, stop: int) -> dict:
        return {**self.meta, "N": int(stop - start), "part": {"start": int(start), "stop": int(stop)}}

    def part(self, rows: Tensor) -> "FeatureStore":
        """A writable part for global ``rows`` (non-empty): a store of the row range ``[min, max + 1)`` in
        ``parts/rows_<start>_<stop>/`` that only its rank writes; :meth:`merge_parts` copies it back."""
        if self.row_offset or "part" in self.meta:
            raise SettingsError(f"Expected a whole store to take parts from, but {self.path} is a part itself")
        rows = self._check_rows(rows)
        if not len(rows):
            raise ValueError("Expected at least one row for a part, but got none")
        start, stop = int(rows.min()), int(rows.max()) + 1
        return FeatureStore.open(self.path / "parts" / f"rows_{start:010d}_{stop:010d}", self._part_meta(start, stop))

    def merge_parts(self, block_rows: int = 8192) -> int:
        """Copy the finished rows of every part into this store (only this process writes it), then delete the
        parts; returns the rows copied. A kill part-way leaves the part in place, and merging again is harmless.

        Raises:
            StoreMismatchError: a part was made with other metadata than this store.
        """
        folder = self.path / "parts"
        if not folder.is_dir():
            return 0
        if not self.writable:
            raise SettingsError(f"Expected a store opened with `writable` True to merge parts into, but {self.path} "
                                "was opened for reading")
        copied = 0
        for part_dir in sorted(folder.iterdir()):
            if not (part_dir / "meta.json").exists():  # killed while being created: it holds no finished row
                shutil.rmtree(part_dir, ignore_errors=True)
                continue
            stored = read_json(part_dir / "meta.json", "feature store part metadata").get("part") or {}
            part = FeatureStore.open(part_dir, self._part_meta(stored.get("start", -1), stored.get("stop", -1)),
                                     create=False, writable=False)
            done = np.flatnonzero(np.asarray(part._done, dtype=bool))
            for i in range(0, len(done), block_rows):
                local = done[i:i + block_rows]
                weights = None if part._weights is None else np.asarray(part._weights[local])
                self._put(local + part.row_offset, np.asarray(part._features[local]), weights)
            copied += len(done)
            del part
            shutil.rmtree(part_dir)
        shutil.rmtree(folder, ignore_errors=True)
        if copied:
            log.info("merged %d rows from the parts of %s", copied, self.path)
        return copied

    # ------------------------------------------------------------------ reading
    def done_mask(self) -> Tensor:
        """``(N,)`` bool: rows whose features are on disk (re-read from the shared file)."""
        return torch.from_numpy(np.array(self._done, dtype=bool))

    def missing_rows(self) -> Tensor:
        """``(R,)`` int64: rows not done yet, ascending."""
        return torch.nonzero(~self.done_mask()).reshape(-1)

    @property
    def is_complete(self) -> bool:
        """True when every row is done."""
        return bool(self.done_mask().all())

    @property
    def features(self) -> np.ndarray:
        """Read-only ``(N, d)`` memmap of the features."""
        return np.load(self.path / "features.npy", mmap_mode="r")

    def read(self, start: int = 0, stop: Optional[int] = None, dtype=torch.float32,
             out: Optional[np.ndarray] = None) -> Tensor:
        """Rows ``[start, stop)`` as a tensor ``(stop - start, d)`` of ``dtype`` (None: the stored dtype).

        One positioned read of the file (no memory map); ``out``: a reused ``(>= rows, d)`` numpy buffer of the
        stored dtype to read into (the result is then a view of it).
        """
        start, stop, _ = slice(start, stop).indices(self.N)
        rows = max(stop - start, 0)
        stored = np.dtype(self.meta["dtype"])
        if out is None:
            buffer = np.empty((rows, self.d), dtype=stored)
        elif out.dtype != stored or out.ndim != 2 or out.shape[1] != self.d or out.shape[0] < rows:
            raise ValueError(f"Expected `out` of dtype {stored} and shape (>= {rows}, {self.d}), but got "
                             f"{out.dtype} {out.shape}")
        else:
            buffer = out[:rows]
        if rows:
            view, offset = memoryview(buffer).cast("B"), self._data_offset + start * self.d * stored.itemsize
            while view.nbytes:
                got = os.preadv(self._fd(), [view], offset)
                if got <= 0:
                    raise CorruptFileError(f"Expected {self.path / 'features.npy'} to hold rows up to {stop}, but "
                                           f"it ended at byte {offset}")
                view, offset = view[got:], offset + got
        tensor = torch.from_numpy(buffer)
        return tensor if dtype is None else tensor.to(dtype)

    def _fd(self) -> int:
        if self._reader is None:
            self._reader = os.open(self.path / "features.npy", os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._reader, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return self._reader

    def __del__(self) -> None:
        if getattr(self, "_reader", None) is not None:
            os.close(self._reader)
            self._reader = None

    def weights(self, start: int = 0, stop: Optional[int] = None) -> Optional[Tensor]:
        """``(stop - start,)`` float32 per-row weights (default all N), or None when the store has none."""
        return None if self._weights is None else torch.from_numpy(np.array(self._weights[start:stop],
                                                                            dtype=np.float32))

    def row_blocks(self, block_rows: int) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` row ranges of at most ``block_rows`` rows."""
        _checks.positive_int("block_rows", block_rows)
        for s in range(0, self.N, block_rows):
            yield s, min(s + block_rows, self.N)

    # ------------------------------------------------------------------ integrity
    def kernel_record(self) -> Optional[dict]:
        """The contents of ``kernel.json`` (written by ``finalize``), or None before finalizing."""
        file = self.path / "kernel.json"
        return read_json(file, "kernel record") if file.exists() else None

    @property
    def is_finalized(self) -> bool:
        """Finalized by this version: ``kernel.json`` exists and records the files' checksums."""
        record = self.kernel_record()
        return bool(record) and record.get("format") == KERNEL_FORMAT and "checksums" in record

    def file_checksums(self) -> dict[str, str]:
        """sha256 of each array file of the store (features, done flags, weights)."""
        return {name: file_sha256(self.path / name) for name, _, _ in self._layout()}

    def verify(self) -> None:
        """Compare every file recorded in ``kernel.json`` with its checksum (refuse a non-finalized store)."""
        record = self.kernel_record()
        if not record or record.get("format") != KERNEL_FORMAT or "checksums" not in record:
            state = "not finalized" if not record else "finalized without checksums (by an older version)"
            raise CorruptFileError(f"Expected a finalized feature store with checksums at {self.path}, but it is "
                                   f"{state}; rerun `cli.py featurize` on its checkpoint (finished rows are kept)")
        for name, digest in record["checksums"].items():
            check_file_sha256(self.path / name, digest, str(self.path / "kernel.json"),
                              fix=f"delete the store {self.path} and featurize its checkpoint again")

    @classmethod
    def check_folder(cls, path, meta: dict) -> str:
        """Check a store folder before featurizing into it, writing nothing: ``"absent"``, ``"partial"``,
        ``"complete"`` (not finalized yet) or ``"finalized"`` (checksums verified).

        Raises:
            StoreMismatchError: the folder holds a store made with other metadata.
            CorruptFileError: unreadable metadata, wrong-sized arrays, or files that fail their checksums.
        """
        path = Path(path)
        if not (path / "meta.json").exists():
            return "absent"
        store = cls.open(path, meta, create=False, writable=False)
        if store.is_finalized:
            store.verify()
            return "finalized"
        return "complete" if store.is_complete else "partial"

    def identity(self) -> dict:
        """What identifies the features (for results made from them): their metadata and file checksums."""
        record = self.kernel_record() or {}
        checkpoint = self.meta.get("checkpoint")
        return {"meta": hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:16],
                "weights_hash": checkpoint.get("weights_hash") if isinstance(checkpoint, dict) else None,
                "checksums": record.get("checksums")}

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, N={self.N}, d={self.d}, dtype={self.meta['dtype']})"


def open_feature_stores(features: str, argument: str = "features", verify: bool = True) -> list[FeatureStore]:
    """The complete, finalized stores of one dataset in ``features`` (a store, or a folder of them), in name order.

    Opened read-only (nothing in the folders changes, no lock file). Every store is checked before any is
    used: sizes against its metadata, complete, finalized, and (``verify``) its files against the checksums
    in ``kernel.json``. ``argument`` is how error messages name the setting that gave the folder (e.g.
    ``plan.features``).
    """
    root = Path(features)
    folders = [root] if (root / "meta.json").exists() else sorted(p.parent for p in root.glob("*/meta.json"))
    if not folders:
        raise FileNotFoundError(f"Expected `{argument}` to be a feature store or a folder of them (each with a "
                                f"meta.json), but {str(root)!r} holds none; run `cli.py featurize` first")
    stores = [FeatureStore.open(f, read_json(f / "meta.json", "feature store metadata"), create=False,
                                writable=False) for f in folders]
    for store in stores:
        finalized = store.kernel_record() is not None
        if finalized and verify:  # checksums first: a flipped done flag is corruption, not a missing row
            store.verify()
        if not store.is_complete:
            raise CorruptFileError(f"Expected `{argument}` to hold complete feature stores, but {store.path} misses "
                                   f"{len(store.missing_rows())} of {store.N} rows; rerun `cli.py featurize`")
        if not finalized:
            store.verify()  # refuses, saying the store is not finalized
    fingerprints = {(s.meta["N"], s.meta.get("dataset_fingerprint")) for s in stores}
    if len(fingerprints) != 1:
        raise StoreMismatchError(f"Expected `{argument}` to hold feature stores of one dataset, but got (N, "
                                 f"fingerprint) pairs {sorted(fingerprints, key=str)}")
    return stores
