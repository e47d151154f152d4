"""``FeatureStore``: a resumable, multi-writer store of projected features for one checkpoint.

Layout of a store folder (one per (experiment, checkpoint))::

    meta.json       N, d, dtype, projector.describe(), output settings, checkpoint identity,
                    dataset fingerprint, ... (written atomically: temp file + os.replace)
    features.npy    (N, d) float16/float32 numpy memmap (a real .npy file)
    done.npy        (N,) uint8: 1 once a row's features are on disk
    weights.npy     (N,) float32, only with ``meta["with_weights"]``: TRAK's Q per row
    kernel_*.npy    written by :func:`attribution.scoring.finalize`

Writes put the features first and flush them, then set the done flags and flush, so a kill
never marks a row done without its features. Several processes may write disjoint rows of the
same store at once (each maps the files ``r+``); creation is serialized with a lock file.
Re-opening an existing store with different metadata is refused, naming the differing keys.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from . import _checks
from .atomic import atomic_save_npy, atomic_write_json

__all__ = ["FeatureStore", "StoreMismatchError", "atomic_write_json", "atomic_save_npy"]

log = logging.getLogger(__name__)
_DTYPES = ("float16", "float32")


class StoreMismatchError(ValueError):
    """The folder holds a store made with different metadata."""


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
    for key in ("N", "d"):
        _checks.positive_int(f"meta['{key}']", meta.get(key))
    _checks.one_of("meta['dtype']", meta.get("dtype"), _DTYPES)
    return _normalize(meta)


class FeatureStore:
    """Projected features ``Phi`` (N x d) for one checkpoint, on disk. Use :meth:`open`."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = Path(path)
        self.meta = meta
        self.N, self.d = int(meta["N"]), int(meta["d"])
        self._features = np.load(self.path / "features.npy", mmap_mode="r+")
        self._done = np.load(self.path / "done.npy", mmap_mode="r+")
        self._weights = np.load(self.path / "weights.npy", mmap_mode="r+") if self.has_weights else None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path, meta: dict, create: bool = True) -> "FeatureStore":
        """Open (or create) the store in folder ``path``.

        Args:
            path: the store folder.
            meta: must hold ``N`` (rows), ``d`` (feature width) and ``dtype`` (``"float16"`` or
                ``"float32"``); optional ``with_weights`` (bool) adds a per-row weight array. Any
                other JSON-serializable keys (projector, output settings, checkpoint, dataset
                fingerprint, ...) are recorded and compared on re-open.
            create: create the store when ``path`` has none; otherwise raise ``FileNotFoundError``.

        Raises:
            StoreMismatchError: the folder holds a store whose metadata differs (lists the keys).
        """
        meta = _check_meta(meta)
        path = Path(path)
        if not create and not (path / "meta.json").exists():
            raise FileNotFoundError(f"Expected a feature store at `path` {path}, but found no meta.json")
        path.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            if (path / "meta.json").exists():
                stored = json.loads((path / "meta.json").read_text())
                diff = _meta_diff(stored, meta)
                if diff:
                    raise StoreMismatchError(f"Feature store at {path} was made with different metadata: "
                                             + "; ".join(diff))
            else:
                cls._create(path, meta)
        return cls(path, meta)

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

        Features and weights are flushed before the done flags are set and flushed.
        """
        rows_np = self._check_rows(rows)
        if tuple(features.shape) != (len(rows_np), self.d):
            raise ValueError(f"Expected `features` of shape ({len(rows_np)}, {self.d}), but got {tuple(features.shape)}")
        if self.has_weights != (weights is not None):
            raise ValueError(f"Expected `weights` {'(R,)' if self.has_weights else 'None'} for this store "
                             f"(with_weights={self.has_weights}), but got {None if weights is None else tuple(weights.shape)}")
        self._features[rows_np] = features.detach().cpu().numpy().astype(self._features.dtype)
        self._features.flush()
        if weights is not None:
            self._weights[rows_np] = weights.detach().cpu().reshape(-1).numpy().astype(np.float32)
            self._weights.flush()
        self._done[rows_np] = 1
        self._done.flush()

    def _check_rows(self, rows: Tensor) -> np.ndarray:
        rows = _checks.long_vector("rows", torch.as_tensor(rows))
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= self.N):
            raise ValueError(f"Expected `rows` in [0, {self.N}), but got min {int(rows.min())}, max {int(rows.max())}")
        return rows.cpu().numpy()

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

    def read(self, start: int = 0, stop: Optional[int] = None, dtype=torch.float32) -> Tensor:
        """Rows ``[start, stop)`` as a tensor ``(stop - start, d)``."""
        return torch.from_numpy(np.array(self._features[start:stop], dtype=np.float32)).to(dtype)

    def weights(self) -> Optional[Tensor]:
        """``(N,)`` float32 per-row weights, or None when the store has none."""
        return None if self._weights is None else torch.from_numpy(np.array(self._weights, dtype=np.float32))

    def row_blocks(self, block_rows: int) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` row ranges of at most ``block_rows`` rows."""
        _checks.positive_int("block_rows", block_rows)
        for s in range(0, self.N, block_rows):
            yield s, min(s + block_rows, self.N)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, N={self.N}, d={self.d}, dtype={self.meta['dtype']})"


def open_feature_stores(features: str, argument: str = "features") -> list[FeatureStore]:
    """The complete, finalized stores of one dataset in ``features`` (a store, or a folder of them), in name order.

    ``argument`` is how error messages name the setting that gave the folder (e.g. ``plan.features``).
    """
    root = Path(features)
    folders = [root] if (root / "meta.json").exists() else sorted(p.parent for p in root.glob("*/meta.json"))
    if not folders:
        raise FileNotFoundError(f"Expected `{argument}` to be a feature store or a folder of them (each with a "
                                f"meta.json), but {str(root)!r} holds none; run `cli.py featurize` first")
    stores = [FeatureStore.open(f, json.loads((f / "meta.json").read_text()), create=False) for f in folders]
    for store in stores:
        if not store.is_complete or not (store.path / "kernel.json").exists():
            raise ValueError(f"Expected complete, finalized feature stores, but {store.path} is "
                             f"{'incomplete' if not store.is_complete else 'not finalized'}; rerun `cli.py featurize`")
    fingerprints = {(s.meta["N"], s.meta["dataset_fingerprint"]) for s in stores}
    if len(fingerprints) != 1:
        raise ValueError(f"Expected feature stores of one dataset, but got (N, fingerprint) pairs {sorted(fingerprints)}")
    return stores
